// SPDX-License-Identifier: Apache-2.0
// Every fourbit operator schema, declared once. Kernels are registered per backend (cpu/*_cpu.cpp,
// cuda/*_cuda.cu); fake (meta) implementations and autograd formulas live in python/fourbit/_ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "core/codebook.h"
#include "core/dynamic_map.h"
#include "huge_pages.h"
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

// dequantize_4bit for every backend: validate, allocate, then the backend's dequantize_4bit_into.
at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                           std::string_view quant_type, c10::SymIntArrayRef shape, at::ScalarType dtype,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(shape);
  // Validate before allocating, so a bad shape is a ValueError rather than an allocation failure.
  check_dequantize_4bit_args(packed, absmax, blocksize, sizes, dtype, nested_absmax, nested_code, offset,
                             nested_blocksize);
  at::Tensor out = at::empty(sizes, packed.options().dtype(dtype));
  advise_huge_pages(out);
  static const auto into = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fourbit::dequantize_4bit_into", "")
                               .typed<void(const at::Tensor&, const at::Tensor&, int64_t, std::string_view,
                                           c10::SymIntArrayRef, const at::Tensor&, const std::optional<at::Tensor>&,
                                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                           int64_t)>();
  into.call(packed, absmax, blocksize, quant_type, shape, out, nested_absmax, nested_code, offset, nested_blocksize);
  return out;
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

  // ---- 4-bit matmul (matmul.cpp) ----
  // x [..., K] (float32/float16/bfloat16/float64) @ W.T + bias, with W [N, K] = `shape` given as dequantize_4bit's
  // arguments. Returns [..., N] in x's dtype.
  m.def(
      "matmul_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "Tensor? bias=None, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> Tensor");
  // grad_y [..., N] @ W -> [..., K]: the input gradient of matmul_4bit, W dequantized tile by tile.
  m.def(
      "matmul_4bit_grad_x(Tensor grad_y, Tensor packed, Tensor absmax, int blocksize, str quant_type, "
      "SymInt[] shape, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> Tensor");

  // ---- QLoRA linear (matmul.cpp) ----
  // y = x @ W.T + scaling * (lora_x @ lora_A.T) @ lora_B.T + bias, lora_x defaulting to x (pass dropout(x) for LoRA
  // dropout). lora_A [r, K], lora_B [N, r] in one float dtype; the LoRA branch computes in the adapters' dtype (the
  // input cast to it, as PEFT does) and is added to the 4-bit result in x's dtype.
  m.def(
      "lora_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias=None, Tensor? lora_x=None, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256) -> Tensor");

  // ---- fake quantization for QAT (cpu/fake_quant_cpu.cpp, cuda/fake_quant_cuda.cu; math in core/fake_quant.h) ----
  // Affine fake quantization y = (clamp(zero_point + round(x / scale), quant_min, quant_max) - zero_point) * scale,
  // exactly as torch.fake_quantize_per_tensor_affine / _per_channel_affine. x: float32/float16/bfloat16/float64, any
  // shape. scale (float, positive) and zero_point (integer or float; rounded half to even and clamped to
  // [quant_min, quant_max]) hold one value per tensor (neither axis nor group_size), per channel along `axis`
  // (x.shape[axis] values) or per group of `group_size` consecutive elements along the last dimension
  // (x.numel() / group_size values, e.g. shaped x.shape[:-1] + [K / group_size]). grad_factor only scales the
  // gradients of scale and zero_point (LSQ), see fake_quantize_affine_backward.
  m.def(
      "fake_quantize_affine(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, int? axis=None, "
      "int? group_size=None, float grad_factor=1.0) -> Tensor");
  // Gradients of fake_quantize_affine: grad_x (straight-through inside the clamp range, zero outside), and with
  // param_grads the LSQ gradients of scale and zero_point times grad_factor, in their shapes and dtypes (otherwise
  // two empty tensors).
  m.def(
      "fake_quantize_affine_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, int? axis, int? group_size, float grad_factor, bool param_grads) -> (Tensor grad_x, "
      "Tensor grad_scale, Tensor grad_zero_point)");
  // dequantize_4bit(quantize_4bit(x)) bit for bit: one pass without packed bytes; with compress_statistics, through
  // the double-quantized scales as dequantize_4bit decodes them (quantize, double-quantize, decode: every absmax
  // is needed first). Returns x's shape and dtype.
  m.def(
      "fake_quantize_4bit(Tensor x, int blocksize, str quant_type, bool compress_statistics=False, "
      "int nested_blocksize=256) -> Tensor");

  // ---- LinearInt: weight-only int4/int8 per-group (linear_int.cpp, cpu/linear_int_cpu.cpp, cuda/linear_int_cuda.cu)
  // W [N, K] = `shape`: qweight uint8 [N, K / 2] (int4, two codes per byte, the first in the high nibble) or [N, K]
  // (int8); scale float32 and zero_point uint8 [N, K / group_size]; W = (code - zero_point) * scale.
  m.def(
      "dequantize_int_into(Tensor qweight, Tensor scale, Tensor zero_point, int bits, int group_size, SymInt[] shape, "
      "Tensor(a!) out) -> ()");
  m.def(
      "dequantize_int(Tensor qweight, Tensor scale, Tensor zero_point, int bits, int group_size, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");
  // x [..., K] @ W.T + bias -> [..., N] in x's dtype, W dequantized tile by tile.
  m.def(
      "matmul_int(Tensor x, Tensor qweight, Tensor scale, Tensor zero_point, int bits, int group_size, "
      "SymInt[] shape, Tensor? bias=None) -> Tensor");
  m.def(
      "matmul_int_grad_x(Tensor grad_y, Tensor qweight, Tensor scale, Tensor zero_point, int bits, int group_size, "
      "SymInt[] shape) -> Tensor");

  // ---- codebooks ----
  m.def("quant_map(str name) -> Tensor");
}

TORCH_LIBRARY_IMPL(fourbit, CompositeExplicitAutograd, m) {
  m.impl("quant_map", &quant_map);
  m.impl("dequantize_4bit", &dequantize_4bit);
}

}  // namespace fourbit
