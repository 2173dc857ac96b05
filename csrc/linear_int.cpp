// SPDX-License-Identifier: Apache-2.0
// LinearInt's ops for every backend (CompositeExplicitAutograd; schemas in ops.cpp, autograd in
// python/fourbit/_ops.py): dequantize_int, and matmul_int y = x @ W.T + bias with its input gradient
// grad_x = grad_y @ W, W [N, K] in int4/int8 per-group codes.
//
// The matmuls follow matmul_4bit's tiled scheme (matmul.cpp): W is dequantized a tile of rows at a time into one
// buffer in the compute dtype (at most a quarter of W and at most 4M elements), and each tile goes through the
// backend's GEMM, so no full dequantized copy of W ever exists. Groups never straddle rows, so any row range of the
// codes, scales and zero points is a valid weight of its own.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "qat_checks.h"

namespace fourbit {
namespace {

using OptTensor = std::optional<at::Tensor>;

struct IntWeight {
  const at::Tensor& qweight;
  const at::Tensor& scale;
  const at::Tensor& zero_point;
  int64_t bits, group_size, N, K;
};

IntWeight check_int_weight(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero_point,
                           int64_t bits, int64_t group_size, c10::SymIntArrayRef shape) {
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(shape);
  check_int_weight_args(qweight, scale, zero_point, bits, group_size, sizes);
  return {qweight, scale, zero_point, bits, group_size, sizes[0], sizes[1]};
}

void check_activation(const at::Tensor& t, const char* name, int64_t features, const char* what,
                      const at::Tensor& qweight) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == features, name, " must end in ", what, " = ", features,
                    ", got shape ", t.sizes());
  check_same_device(t, name, qweight, "qweight");
}

const auto& dequantize_into_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fourbit::dequantize_int_into", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         c10::SymIntArrayRef, const at::Tensor&)>();
  return op;
}

at::Tensor dequantize_int(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero_point,
                          int64_t bits, int64_t group_size, c10::SymIntArrayRef shape, at::ScalarType dtype) {
  const IntWeight w = check_int_weight(qweight, scale, zero_point, bits, group_size, shape);
  check_float_dtype(dtype, "dtype (the output dtype)");
  at::Tensor out = at::empty({w.N, w.K}, qweight.options().dtype(dtype));
  dequantize_into_op().call(qweight, scale, zero_point, bits, group_size, shape, out);
  return out;
}

// Calls fn(row0, rows, tile) for consecutive tiles of W's rows dequantized in `dtype` (float64 via float32).
template <typename F> void for_each_int_tile(const IntWeight& w, at::ScalarType dtype, F&& fn) {
  const int64_t tile_elements = std::clamp<int64_t>(w.N * w.K / 4, int64_t{1} << 16, int64_t{1} << 22);
  const int64_t tile_rows = std::max<int64_t>(1, tile_elements / std::max<int64_t>(w.K, 1));
  const at::ScalarType buffer_dtype = dtype == at::kDouble ? at::kFloat : dtype;
  at::Tensor buffer = at::empty({std::min(tile_rows, w.N), w.K}, w.qweight.options().dtype(buffer_dtype));
  for (int64_t row0 = 0; row0 < w.N; row0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, w.N - row0);
    at::Tensor tile = buffer.narrow(0, 0, rows);
    const std::vector<c10::SymInt> tile_shape = {c10::SymInt(rows), c10::SymInt(w.K)};
    dequantize_into_op().call(w.qweight.narrow(0, row0, rows), w.scale.narrow(0, row0, rows),
                              w.zero_point.narrow(0, row0, rows), w.bits, w.group_size, tile_shape, tile);
    fn(row0, rows, dtype == at::kDouble ? tile.to(at::kDouble) : tile);
  }
}

at::Tensor matmul_int(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                      const at::Tensor& zero_point, int64_t bits, int64_t group_size, c10::SymIntArrayRef shape,
                      const OptTensor& bias) {
  const IntWeight w = check_int_weight(qweight, scale, zero_point, bits, group_size, shape);
  check_activation(x, "x", w.K, "in_features", qweight);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.N, "bias must have shape [", w.N, "], got ",
                      bias->sizes());
    check_same_device(*bias, "bias", qweight, "qweight");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.N;
  at::Tensor out = at::empty(out_shape, x.options());
  const at::Tensor xc = x.reshape({-1, w.K}).contiguous();
  at::Tensor y = out.view({xc.size(0), w.N});
  if (xc.size(0) > 0) {
    for_each_int_tile(w, x.scalar_type(), [&](int64_t row0, int64_t rows, const at::Tensor& tile) {
      at::Tensor part = y.narrow(1, row0, rows);
      at::mm_out(part, xc, tile.t());
    });
  }
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  return out;
}

at::Tensor matmul_int_grad_x(const at::Tensor& grad_y, const at::Tensor& qweight, const at::Tensor& scale,
                             const at::Tensor& zero_point, int64_t bits, int64_t group_size,
                             c10::SymIntArrayRef shape) {
  const IntWeight w = check_int_weight(qweight, scale, zero_point, bits, group_size, shape);
  check_activation(grad_y, "grad_y", w.N, "out_features", qweight);
  std::vector<int64_t> in_shape(grad_y.sizes().begin(), grad_y.sizes().end());
  in_shape.back() = w.K;
  const at::Tensor g = grad_y.reshape({-1, w.N}).contiguous();
  at::Tensor out = at::zeros(in_shape, grad_y.options());
  at::Tensor grad_x = out.view({g.size(0), w.K});
  if (g.size(0) > 0) {
    // Split-K over the tiles: 16-bit gradients accumulate in float32 (as matmul_4bit_grad_x does).
    const bool half = grad_y.scalar_type() == at::kHalf || grad_y.scalar_type() == at::kBFloat16;
    at::Tensor acc = half ? at::zeros({g.size(0), w.K}, grad_y.options().dtype(at::kFloat)) : grad_x;
    for_each_int_tile(w, grad_y.scalar_type(), [&](int64_t row0, int64_t rows, const at::Tensor& tile) {
      if (half) {
        acc.add_(at::mm(g.narrow(1, row0, rows), tile));
      } else {
        acc.addmm_(g.narrow(1, row0, rows), tile);
      }
    });
    if (half) grad_x.copy_(acc);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CompositeExplicitAutograd, m) {
  m.impl("dequantize_int", &dequantize_int);
  m.impl("matmul_int", &matmul_int);
  m.impl("matmul_int_grad_x", &matmul_int_grad_x);
}

}  // namespace fourbit
