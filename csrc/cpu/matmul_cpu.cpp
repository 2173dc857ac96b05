// SPDX-License-Identifier: Apache-2.0
// CPU entry of the small-batch 4-bit GEMV (the kernel loops are in matmul_kernels.h, one copy per instruction set).
#include "cpu/matmul_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/isa.h"

namespace fourbit::cpu {

void gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const BlockScales& scales, int64_t blocksize,
               QuantType quant_type, const at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  // Each 32-element group of x as its 16 even elements then its 16 odd ones: the order in which one 16-byte load of
  // codes decodes (see matmul_kernels.h).
  const at::Tensor xs = x.to(at::kFloat).reshape({M, K / 32, 16, 2}).transpose(2, 3).contiguous();
  const at::Tensor out = y.scalar_type() == at::kFloat ? y : at::empty({M, N}, y.options().dtype(at::kFloat));
  Gemv4bitArgs args{};
  args.x = xs.const_data_ptr<float>();
  args.M = M;
  args.N = N;
  args.K = K;
  args.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  args.scales = scales;
  args.blocksize = blocksize;
  const Codebook4 cb = make_codebook4(quant_type);
  for (int c = 0; c < 16; ++c) args.lut[c] = cb.value[c];
  args.y = out.mutable_data_ptr<float>();
  const QuantKernels& kernels = select_kernels();
  // About 64 KiB of packed weight per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { kernels.gemv_4bit(args, begin, end); });
  if (!out.is_same(y)) y.copy_(out);
}

}  // namespace fourbit::cpu
