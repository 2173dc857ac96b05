// SPDX-License-Identifier: Apache-2.0
// CPU kernel of LinearInt's weight dequantization (the loops are in qat_kernels.h, one copy per instruction set);
// matmul_int and its gradient (linear_int.cpp) call it tile by tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "qat_checks.h"

namespace fourbit::cpu {
namespace {

void dequantize_int_into_cpu(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t bits, int64_t group_size, at::IntArrayRef shape, const at::Tensor& out) {
  check_int_weight_args(qweight, scale, zero_point, bits, group_size, shape);
  check_dequantize_out(out, qweight, shape[0] * shape[1]);
  TORCH_CHECK_VALUE(qweight.is_cpu(), "qweight must be on the CPU here, got ", qweight.device());
  if (out.numel() == 0) return;
  DequantizeIntArgs args{};
  args.qweight = qweight.const_data_ptr<uint8_t>();
  args.scale = scale.const_data_ptr<float>();
  args.zero_point = zero_point.const_data_ptr<uint8_t>();
  args.K = shape[1];
  args.group_size = group_size;
  args.bits = static_cast<int>(bits);
  args.out = out.mutable_data_ptr();
  args.out_type = out.scalar_type() == at::kFloat  ? ElemType::kFloat32
                  : out.scalar_type() == at::kHalf ? ElemType::kFloat16
                                                   : ElemType::kBFloat16;
  const QuantKernels& kernels = select_kernels();
  const int64_t grain = std::max<int64_t>(1, 16384 / shape[1]);
  at::parallel_for(0, shape[0], grain, [&](int64_t begin, int64_t end) { kernels.dequantize_int(args, begin, end); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CPU, m) { m.impl("dequantize_int_into", &dequantize_int_into_cpu); }

}  // namespace fourbit::cpu
