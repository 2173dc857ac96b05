// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the CPU and CUDA implementations of the quantization ops. They look only at metadata
// (dtypes, devices, sizes), never at values, so they cost no device synchronisation. Each message names the argument
// and the value it got; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
// python/fourbit/_ops.py mirrors the shape rules in the fake implementations used by torch.compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "core/blockwise.h"
#include "core/codebook.h"

namespace fourbit {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline QuantType parse_quant_type(std::string_view quant_type) {
  if (quant_type == "nf4") return QuantType::kNF4;
  if (quant_type == "fp4") return QuantType::kFP4;
  TORCH_CHECK_VALUE(false, "quant_type must be 'nf4' or 'fp4', got '", quant_type, "'");
}

inline void check_blocksize(int64_t blocksize, const char* name = "blocksize") {
  TORCH_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, name,
                    " must be a power of two in [32, 4096], got ", blocksize);
}

inline void check_float_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

inline void check_quantize_4bit_args(const at::Tensor& A, int64_t blocksize) {
  check_float_dtype(A.scalar_type(), "A (the tensor to quantize)");
  check_blocksize(blocksize);
}

// Everything dequantize_4bit needs to know before touching memory. Returns the element count n.
struct Dequantize4bitPlan {
  int64_t n;
  int64_t blocks;
  bool nested;
};

// The double-quantized scales: qabsmax uint8 [blocks] with nested_absmax float32 [ceil(blocks / nested_blocksize)],
// nested_code float32 [256] and offset float32 (one value), all on `ref`'s device.
inline void check_nested_absmax_args(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                                     const at::Tensor& ref) {
  const int64_t blocks = absmax.numel();
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, "absmax must be uint8 under double quantization, got ",
                   absmax.scalar_type());
  TORCH_CHECK_VALUE(nested_blocksize > 0 && (nested_blocksize & (nested_blocksize - 1)) == 0,
                    "nested_blocksize must be a positive power of two, got ", nested_blocksize);
  const at::Tensor& na = *nested_absmax;
  const at::Tensor& nc = *nested_code;
  const at::Tensor& off = *offset;
  check_same_device(na, "nested_absmax", ref, "the packed data");
  check_same_device(nc, "nested_code", ref, "the packed data");
  check_same_device(off, "offset", ref, "the packed data");
  const int64_t nested_blocks = ceil_div(blocks, nested_blocksize);
  TORCH_CHECK_TYPE(na.scalar_type() == at::kFloat, "nested_absmax must be float32, got ", na.scalar_type());
  TORCH_CHECK_VALUE(na.dim() == 1 && na.numel() == nested_blocks && na.is_contiguous(), "nested_absmax must have ",
                    nested_blocks, " contiguous values (", blocks, " blocks / nested_blocksize ", nested_blocksize,
                    "), got shape ", na.sizes());
  TORCH_CHECK_TYPE(nc.scalar_type() == at::kFloat, "nested_code must be float32, got ", nc.scalar_type());
  TORCH_CHECK_VALUE(nc.dim() == 1 && nc.numel() == 256 && nc.is_contiguous(),
                    "nested_code must be 256 contiguous values, got shape ", nc.sizes());
  TORCH_CHECK_TYPE(off.scalar_type() == at::kFloat, "offset must be float32, got ", off.scalar_type());
  TORCH_CHECK_VALUE(off.numel() == 1, "offset must hold one value, got shape ", off.sizes());
}

inline Dequantize4bitPlan check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax,
                                                     int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype,
                                                     const std::optional<at::Tensor>& nested_absmax,
                                                     const std::optional<at::Tensor>& nested_code,
                                                     const std::optional<at::Tensor>& offset,
                                                     int64_t nested_blocksize) {
  check_blocksize(blocksize);
  check_float_dtype(dtype, "dtype (the output dtype)");
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, "shape must not have negative sizes, got ", shape);
    TORCH_CHECK_VALUE(d == 0 || n <= (int64_t{1} << 62) / d, "shape ", shape, " has too many elements");
    n *= d;
  }
  const int64_t blocks = ceil_div(n, blocksize);
  TORCH_CHECK_VALUE(packed.is_contiguous(), "packed must be contiguous, got strides ", packed.strides());
  const int64_t packed_bytes = packed.numel() * static_cast<int64_t>(packed.element_size());
  TORCH_CHECK_VALUE(packed_bytes >= (n + 1) / 2, "packed holds ", packed_bytes, " bytes but shape ", shape,
                    " needs ", (n + 1) / 2);
  check_same_device(absmax, "absmax", packed, "packed");
  TORCH_CHECK_VALUE(absmax.dim() == 1 && absmax.numel() == blocks, "absmax must have ", blocks,
                    " values (one per block of ", blocksize, " for shape ", shape, "), got shape ", absmax.sizes());
  TORCH_CHECK_VALUE(absmax.is_contiguous(), "absmax must be contiguous, got strides ", absmax.strides());
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value() && nested == offset.has_value(),
                    "nested_absmax, nested_code and offset must be given together (double quantization), got ",
                    nested_absmax.has_value() ? "" : "no ", "nested_absmax, ", nested_code.has_value() ? "" : "no ",
                    "nested_code, ", offset.has_value() ? "" : "no ", "offset");
  if (!nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type(),
                     " (a uint8 absmax needs nested_absmax, nested_code and offset)");
    return {n, blocks, false};
  }
  check_nested_absmax_args(absmax, nested_absmax, nested_code, offset, nested_blocksize, packed);
  return {n, blocks, true};
}

// The BlockScales view of checked scale tensors (see check_dequantize_4bit_args).
inline BlockScales block_scales(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                int64_t nested_blocksize) {
  if (!nested_absmax.has_value()) return {absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, 0};
  int shift = 0;
  while ((int64_t{1} << shift) < nested_blocksize) ++shift;
  return {nullptr, absmax.const_data_ptr<uint8_t>(), nested_absmax->const_data_ptr<float>(),
          nested_code->const_data_ptr<float>(), offset->const_data_ptr<float>(), shift};
}

inline void check_dequantize_out(const at::Tensor& out, const at::Tensor& packed, int64_t n) {
  check_float_dtype(out.scalar_type(), "out");
  check_same_device(out, "out", packed, "packed");
  TORCH_CHECK_VALUE(out.numel() == n && out.is_contiguous(), "out must be contiguous with ", n,
                    " elements, got shape ", out.sizes(), " and strides ", out.strides());
}

inline void check_double_quantize_args(const at::Tensor& absmax, int64_t nested_blocksize) {
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type());
  TORCH_CHECK_VALUE(absmax.dim() == 1, "absmax must be 1-D, got shape ", absmax.sizes());
  check_blocksize(nested_blocksize, "nested_blocksize");
}

}  // namespace fourbit
