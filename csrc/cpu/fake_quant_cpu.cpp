// SPDX-License-Identifier: Apache-2.0
// CPU implementations of the fake-quantization ops: checks, parameter preparation and threading. The element loops
// are in qat_kernels.h (one copy per instruction set); float64 inputs (gradient checks) take a plain loop here.
//
// Threads split the elements (or 4-bit blocks), and each output element depends only on its own input and
// parameters, so the results are the same on any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "core/blockwise.h"
#include "core/dynamic_map.h"
#include "core/fake_quant.h"
#include "cpu/isa.h"
#include "huge_pages.h"
#include "qat_checks.h"

namespace fourbit::cpu {
namespace {

constexpr DynamicMap kDynamicMap = make_dynamic_map();
constexpr int64_t kGrain = 32768;

ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    default: return ElemType::kBFloat16;
  }
}

// The parameters as contiguous arrays in the compute type: scale as given (checked: positive and finite), the zero
// point rounded half to even and clamped to [quant_min, quant_max] (as PyTorch's learnable fake-quant ops do).
struct Params {
  at::Tensor scale, zero_point;
};

template <typename T>
Params prepare_params_typed(const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                            int64_t quant_max, at::ScalarType compute) {
  Params p{scale.to(compute).contiguous().reshape(-1), at::empty({zero_point.numel()}, scale.options().dtype(compute))};
  const at::Tensor zp_in = zero_point.to(compute).contiguous().reshape(-1);
  const T* s = p.scale.const_data_ptr<T>();
  const T* z = zp_in.const_data_ptr<T>();
  T* zr = p.zero_point.mutable_data_ptr<T>();
  const int64_t count = p.scale.numel();
  for (int64_t i = 0; i < count; ++i) {
    // Values are checked here because the CPU has them at hand for free (the CUDA kernels never read them on the
    // host; there a bad scale gives NaN outputs).
    TORCH_CHECK_VALUE(s[i] > T(0) && std::isfinite(s[i]), "scale must be positive and finite, got ", s[i],
                      " at index ", i);
    TORCH_CHECK_VALUE(std::isfinite(z[i]), "zero_point must be finite, got ", z[i], " at index ", i);
    const T r = round_half_even(z[i]);
    zr[i] = r < T(quant_min) ? T(quant_min) : (r > T(quant_max) ? T(quant_max) : r);
  }
  return p;
}

// The parameters as contiguous arrays in the compute type: scale as given (checked: positive and finite), the zero
// point rounded half to even and clamped to [quant_min, quant_max] (as PyTorch's learnable fake-quant ops do).
Params prepare_params(const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                      at::ScalarType compute) {
  return compute == at::kDouble ? prepare_params_typed<double>(scale, zero_point, quant_min, quant_max, compute)
                                : prepare_params_typed<float>(scale, zero_point, quant_min, quant_max, compute);
}

at::Tensor fake_quantize_affine_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                    std::optional<int64_t> group_size, double grad_factor) {
  const AffineLayout layout = check_fake_quantize_args(x, scale, zero_point, quant_min, quant_max, axis, group_size);
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  advise_huge_pages(out);
  const int64_t n = input.numel();
  const bool f64 = input.scalar_type() == at::kDouble;
  const Params p = prepare_params(scale, zero_point, quant_min, quant_max, f64 ? at::kDouble : at::kFloat);
  if (n == 0) return out;
  if (f64) {
    const double* s = p.scale.const_data_ptr<double>();
    const double* z = p.zero_point.const_data_ptr<double>();
    const double* in = input.const_data_ptr<double>();
    double* o = out.mutable_data_ptr<double>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = layout.param_index(i);
        o[i] = fake_quant_affine(in[i], make_affine_params<double>(s[c], z[c], quant_min, quant_max));
      }
    });
    return out;
  }
  FakeQuantArgs args{input.const_data_ptr(), elem_type(input.scalar_type()), n, layout,
                     p.scale.const_data_ptr<float>(), p.zero_point.const_data_ptr<float>(),
                     static_cast<float>(quant_min), static_cast<float>(quant_max), out.mutable_data_ptr()};
  const QuantKernels& kernels = select_kernels();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { kernels.fake_quantize_affine(args, begin, end); });
  return out;
}

// The per-element parameter gradients summed per parameter: [outer, channels, inner] summed over outer and inner.
at::Tensor sum_per_param(const at::Tensor& per_element, const AffineLayout& layout, const at::Tensor& like,
                         double grad_factor) {
  const int64_t n = per_element.numel();
  const int64_t outer = n / (layout.inner * layout.channels);
  at::Tensor sum = per_element.view({outer, layout.channels, layout.inner}).sum(at::IntArrayRef{0, 2});
  return sum.mul_(grad_factor).reshape(like.sizes()).to(like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_affine_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, std::optional<int64_t> group_size,
    double grad_factor, bool param_grads) {
  const AffineLayout layout = check_fake_quantize_args(x, scale, zero_point, quant_min, quant_max, axis, group_size);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  const at::Tensor input = x.contiguous();
  const at::Tensor dy = grad.to(x.scalar_type()).contiguous();
  const int64_t n = input.numel();
  const bool f64 = input.scalar_type() == at::kDouble;
  const at::ScalarType compute = f64 ? at::kDouble : at::kFloat;
  const Params p = prepare_params(scale, zero_point, quant_min, quant_max, compute);
  at::Tensor dx = at::empty_like(input);
  advise_huge_pages(dx);
  at::Tensor dscale = at::empty({param_grads ? n : 0}, input.options().dtype(compute));
  at::Tensor dzero_point = at::empty({param_grads ? n : 0}, input.options().dtype(compute));
  if (n > 0 && f64) {
    const double* s = p.scale.const_data_ptr<double>();
    const double* z = p.zero_point.const_data_ptr<double>();
    const double* in = input.const_data_ptr<double>();
    const double* g = dy.const_data_ptr<double>();
    double* o = dx.mutable_data_ptr<double>();
    double* ds = param_grads ? dscale.mutable_data_ptr<double>() : nullptr;
    double* dz = param_grads ? dzero_point.mutable_data_ptr<double>() : nullptr;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = layout.param_index(i);
        const AffineGrads<double> r =
            fake_quant_affine_grads(in[i], g[i], make_affine_params<double>(s[c], z[c], quant_min, quant_max));
        o[i] = r.dx;
        if (ds != nullptr) {
          ds[i] = r.dscale;
          dz[i] = r.dzero_point;
        }
      }
    });
  } else if (n > 0) {
    FakeQuantGradArgs args{};
    args.fwd = {input.const_data_ptr(), elem_type(input.scalar_type()), n, layout, p.scale.const_data_ptr<float>(),
                p.zero_point.const_data_ptr<float>(), static_cast<float>(quant_min), static_cast<float>(quant_max),
                nullptr};
    args.dy = dy.const_data_ptr();
    args.dx = dx.mutable_data_ptr();
    args.dscale = param_grads ? dscale.mutable_data_ptr<float>() : nullptr;
    args.dzero_point = param_grads ? dzero_point.mutable_data_ptr<float>() : nullptr;
    const QuantKernels& kernels = select_kernels();
    at::parallel_for(0, n, kGrain,
                     [&](int64_t begin, int64_t end) { kernels.fake_quantize_affine_grad(args, begin, end); });
  }
  dx = dx.view(x.sizes());
  if (!param_grads) return {dx, at::empty({0}, scale.options()), at::empty({0}, zero_point.options())};
  if (n == 0) return {dx, at::zeros_like(scale), at::zeros_like(zero_point)};
  return {dx, sum_per_param(dscale, layout, scale, grad_factor),
          sum_per_param(dzero_point, layout, zero_point, grad_factor)};
}

at::Tensor fake_quantize_4bit_cpu(const at::Tensor& x, int64_t blocksize, std::string_view quant_type,
                                  bool compress_statistics, int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(quant_type);
  check_quantize_4bit_args(x, blocksize);
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  advise_huge_pages(out);
  const int64_t n = input.numel();
  if (n == 0) return out;
  // Double quantization needs every block's absmax before any block can be decoded (the offset is their mean), so
  // it cannot be one pass. Quantizing (codes + absmax in one read of x), double-quantizing the absmax and decoding
  // the codes is then the least memory traffic (x read once, half a byte per element written and read back).
  if (compress_statistics) {
    check_blocksize(nested_blocksize, "nested_blocksize");
    static const auto quantize = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("fourbit::quantize_4bit", "")
                                     .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                              std::string_view)>();
    static const auto double_quantize =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fourbit::double_quantize", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
    static const auto dequantize_into =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fourbit::dequantize_4bit_into", "")
            .typed<void(const at::Tensor&, const at::Tensor&, int64_t, std::string_view, c10::SymIntArrayRef,
                        const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, int64_t)>();
    static const at::Tensor code =
        at::tensor(at::ArrayRef<float>(kDynamicMap.value, 256), at::TensorOptions().dtype(at::kFloat));
    const auto [packed, absmax] = quantize.call(input, blocksize, quant_type);
    const auto [qabsmax, nested_absmax, offset] = double_quantize.call(absmax, nested_blocksize);
    const std::vector<c10::SymInt> shape = {c10::SymInt(n)};
    dequantize_into.call(packed, qabsmax, blocksize, quant_type, shape, out, nested_absmax, code, offset,
                         nested_blocksize);
    return out.view(x.sizes());
  }
  FakeQuant4bitArgs args{};
  args.input = input.const_data_ptr();
  args.type = elem_type(input.scalar_type());
  args.n = n;
  args.blocksize = blocksize;
  args.codebook = make_codebook4(qt);
  args.out = out.mutable_data_ptr();
  const QuantKernels& kernels = select_kernels();
  at::parallel_for(0, ceil_div(n, blocksize), std::max<int64_t>(1, 16384 / blocksize),
                   [&](int64_t begin, int64_t end) { kernels.fake_quantize_4bit(args, begin, end); });
  return out.view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CPU, m) {
  m.impl("fake_quantize_affine", &fake_quantize_affine_cpu);
  m.impl("fake_quantize_affine_backward", &fake_quantize_affine_backward_cpu);
  m.impl("fake_quantize_4bit", &fake_quantize_4bit_cpu);
}

}  // namespace fourbit::cpu
