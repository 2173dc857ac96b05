// SPDX-License-Identifier: Apache-2.0
// Every fourbit operator schema, declared once. Kernels are registered per backend (cpu/*_cpu.cpp,
// cuda/*_cuda.cu); fake (meta) implementations and autograd formulas live in python/fourbit/_ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "core/codebook.h"
#include "core/dynamic_map.h"
#include "quant_checks.h"

namespace fourbit {
namespace {

// The codebooks as tensors (float32, CPU): "nf4" and "fp4" (16 values, indexed by code) and "dynamic" (256 values,
// the double-quantization map). QuantState.code and the state-dict quant maps come from here.
at::Tensor quant_map(std::string_view name) {
  if (name == "dynamic") {
    static constexpr DynamicMap kMap = make_dynamic_map();
    return at::tensor(at::ArrayRef<float>(kMap.value, 256), at::TensorOptions().dtype(at::kFloat));
  }
  const Codebook4 cb = make_codebook4(parse_quant_type(name));
  return at::tensor(at::ArrayRef<float>(cb.value, 16), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(fourbit, m) {
  m.set_python_module("fourbit._ops");

  // ---- blockwise 4-bit quantization (bitsandbytes layout) ----
  // A: any shape, float32/float16/bfloat16. packed: uint8 [(n + 1) // 2, 1]; absmax: float32 [ceil(n / blocksize)].
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor packed, Tensor absmax)");
  // packed: ceil(n / 2) bytes in any dtype (viewed as bytes); absmax: float32 [blocks], or uint8 [blocks] with
  // nested_absmax float32 [ceil(blocks / nested_blocksize)], nested_code float32 [256] and offset float32 (one
  // value) under double quantization. Returns `shape` in `dtype`.
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "ScalarType dtype, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> Tensor");
  // The same, written into `out` (contiguous, `shape`'s element count, float32/float16/bfloat16; its dtype is the
  // output dtype). Reusing a buffer avoids the page faults of a fresh allocation, which dominate on the CPU.
  m.def(
      "dequantize_4bit_into(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "Tensor(a!) out, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> ()");

  // ---- double quantization of the absmax values ----
  // absmax: float32 [blocks]. Returns qabsmax uint8 [blocks], nested_absmax float32 [ceil(blocks /
  // nested_blocksize)] and offset float32 [] (the float64 mean of absmax, rounded to float32).
  m.def(
      "double_quantize(Tensor absmax, int nested_blocksize=256) -> (Tensor qabsmax, Tensor nested_absmax, "
      "Tensor offset)");
  // The float32 absmax values that double quantization encodes: nested_code[qabsmax] * nested_absmax + offset.
  m.def(
      "dequantize_absmax(Tensor qabsmax, Tensor nested_absmax, Tensor nested_code, Tensor offset, "
      "int nested_blocksize=256) -> Tensor");

  // ---- codebooks ----
  m.def("quant_map(str name) -> Tensor");
}

TORCH_LIBRARY_IMPL(fourbit, CompositeExplicitAutograd, m) { m.impl("quant_map", &quant_map); }

}  // namespace fourbit
