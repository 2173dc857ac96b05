// SPDX-License-Identifier: Apache-2.0
// CPU implementations of the quantization ops: argument checks, allocation and threading. The element loops live in
// quant_kernels.h (one copy per instruction set, chosen at run time by isa.cpp).
//
// Threads split the work by whole blocks, and every block's bytes depend only on its own elements, so the output is
// the same for any thread count. The double-quantization offset is summed over fixed chunks for the same reason.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "core/blockwise.h"
#include "core/dynamic_map.h"
#include "cpu/isa.h"
#include "quant_checks.h"

namespace fourbit::cpu {
namespace {

constexpr Codebook4 kNF4 = make_codebook4(QuantType::kNF4);
constexpr Codebook4 kFP4 = make_codebook4(QuantType::kFP4);
constexpr DynamicMap kDynamicMap = make_dynamic_map();

const Codebook4& codebook(QuantType qt) { return qt == QuantType::kNF4 ? kNF4 : kFP4; }

ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    default: return ElemType::kBFloat16;  // the checks admit only these three
  }
}

// About 16K elements per task: large enough to amortise the task, small enough to balance two threads on small
// tensors.
int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU here, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     std::string_view quant_type) {
  const QuantType qt = parse_quant_type(quant_type);
  check_quantize_4bit_args(A, blocksize);
  const at::Tensor input = A.contiguous();
  const int64_t n = input.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const Quantize4bitArgs args{input.const_data_ptr(),   elem_type(input.scalar_type()), n, blocksize,
                              codebook(qt),             packed.mutable_data_ptr<uint8_t>(),
                              absmax.mutable_data_ptr<float>()};
  const QuantKernels& kernels = select_kernels();
  at::parallel_for(0, blocks, block_grain(blocksize),
                   [&](int64_t begin, int64_t end) { kernels.quantize_4bit(args, begin, end); });
  return {packed, absmax};
}

void dequantize_4bit_into_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              std::string_view quant_type, at::IntArrayRef shape, const at::Tensor& out,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                              int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(quant_type);
  const Dequantize4bitPlan plan = check_dequantize_4bit_args(packed, absmax, blocksize, shape, out.scalar_type(),
                                                             nested_absmax, nested_code, offset, nested_blocksize);
  check_dequantize_out(out, packed, plan.n);
  check_cpu(packed, "packed");
  if (plan.n == 0) return;
  Dequantize4bitArgs args{};
  args.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  args.scales = block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  args.n = plan.n;
  args.blocksize = blocksize;
  for (int c = 0; c < 16; ++c) args.lut[c] = codebook(qt).value[c];
  args.out = out.mutable_data_ptr();
  args.out_type = elem_type(out.scalar_type());
  const QuantKernels& kernels = select_kernels();
  at::parallel_for(0, plan.blocks, block_grain(blocksize),
                   [&](int64_t begin, int64_t end) { kernels.dequantize_4bit(args, begin, end); });
}

// float64 mean over fixed chunks (see kMeanChunk), rounded to float32.
float deterministic_mean(const float* values, int64_t n) {
  if (n == 0) return 0.0f;
  const int64_t chunks = ceil_div(n, kMeanChunk);
  std::vector<double> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0.0;
      for (int64_t i = c * kMeanChunk; i < std::min(n, (c + 1) * kMeanChunk); ++i) sum += values[i];
      partial[c] = sum;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return static_cast<float>(total / static_cast<double>(n));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cpu(const at::Tensor& absmax,
                                                                   int64_t nested_blocksize) {
  check_double_quantize_args(absmax, nested_blocksize);
  const at::Tensor values = absmax.contiguous();
  const int64_t n = values.numel();
  const int64_t nested_blocks = ceil_div(n, nested_blocksize);
  at::Tensor qabsmax = at::empty({n}, values.options().dtype(at::kByte));
  at::Tensor nested_absmax = at::empty({nested_blocks}, values.options());
  const float* in = values.const_data_ptr<float>();
  const float offset = deterministic_mean(in, n);
  uint8_t* q = qabsmax.mutable_data_ptr<uint8_t>();
  float* scales = nested_absmax.mutable_data_ptr<float>();
  // Blockwise 8-bit quantization of (absmax - offset) with the dynamic map, under the same two scaling rules as the
  // 4-bit kernels (full blocks multiply by a reciprocal, the partial last block divides).
  at::parallel_for(0, nested_blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * nested_blocksize;
      const int64_t count = std::min(nested_blocksize, n - start);
      float block_max = 0.0f;
      for (int64_t i = 0; i < count; ++i) {
        const float v = in[start + i] - offset;
        const float a = v < 0 ? -v : v;
        block_max = (a > block_max || a != a) ? a : block_max;
      }
      const bool full = count == nested_blocksize;
      const float stored = full ? block_max : clamp_absmax(block_max);
      scales[b] = stored;
      const float multiplier = full_block_multiplier(block_max);
      for (int64_t i = 0; i < count; ++i) {
        const float v = in[start + i] - offset;
        q[start + i] = encode_8bit(full ? v * multiplier : v / stored, kDynamicMap.midpoint);
      }
    }
  });
  return {qabsmax, nested_absmax, at::scalar_tensor(offset, values.options())};
}

at::Tensor dequantize_absmax_cpu(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                 const at::Tensor& nested_code, const at::Tensor& offset, int64_t nested_blocksize) {
  TORCH_CHECK_VALUE(qabsmax.dim() == 1 && qabsmax.is_contiguous(), "qabsmax must be 1-D and contiguous, got shape ",
                    qabsmax.sizes());
  check_nested_absmax_args(qabsmax, nested_absmax, nested_code, offset, nested_blocksize, qabsmax);
  check_cpu(qabsmax, "qabsmax");
  const int64_t n = qabsmax.numel();
  at::Tensor out = at::empty({n}, nested_absmax.options());
  const BlockScales scales = block_scales(qabsmax, nested_absmax, nested_code, offset, nested_blocksize);
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = scales(i);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit_into", &dequantize_4bit_into_cpu);
  m.impl("double_quantize", &double_quantize_cpu);
  m.impl("dequantize_absmax", &dequantize_absmax_cpu);
}

}  // namespace fourbit::cpu
