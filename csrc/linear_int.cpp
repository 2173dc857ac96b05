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
#include "tiled_matmul.h"

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
  const int64_t tile_rows = std::max<int64_t>(1, tile_elements(w.N * w.K) / std::max<int64_t>(w.K, 1));
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
  check_activation(x, "x", w.K, "in_features", qweight, "qweight");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.N, "bias must have shape [", w.N, "], got ",
                      bias->sizes());
    check_same_device(*bias, "bias", qweight, "qweight");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.N;
  at::Tensor out = at::empty(out_shape, x.options());
  const at::Tensor x2 = x.reshape({leading_rows(x), w.K});
  at::Tensor y = out.view({x2.size(0), w.N});
  tiled_forward(x2, y, w.N, [&](at::ScalarType dtype, auto&& fn) { for_each_int_tile(w, dtype, fn); });
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  return out;
}

at::Tensor matmul_int_grad_x(const at::Tensor& grad_y, const at::Tensor& qweight, const at::Tensor& scale,
                             const at::Tensor& zero_point, int64_t bits, int64_t group_size,
                             c10::SymIntArrayRef shape) {
  const IntWeight w = check_int_weight(qweight, scale, zero_point, bits, group_size, shape);
  check_activation(grad_y, "grad_y", w.N, "out_features", qweight, "qweight");
  return tiled_grad_x(grad_y, w.N, w.K, [&](at::ScalarType dtype, auto&& fn) { for_each_int_tile(w, dtype, fn); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CompositeExplicitAutograd, m) {
  m.impl("dequantize_int", &dequantize_int);
  m.impl("matmul_int", &matmul_int);
  m.impl("matmul_int_grad_x", &matmul_int_grad_x);
}

}  // namespace fourbit
