// SPDX-License-Identifier: Apache-2.0
// The tiled dequantize + GEMM scheme shared by matmul_4bit (matmul.cpp) and matmul_int (linear_int.cpp): W [N, K] is
// dequantized a tile of rows at a time into one buffer in the compute dtype and each tile goes through the backend's
// GEMM, so no full dequantized copy of W ever exists. Each caller supplies `for_each_tile(dtype, fn)`, which calls
// fn(row0, rows, tile) for consecutive row tiles of its weight format.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "quant_checks.h"

namespace fourbit {

// Elements of W dequantized per tile: at most a quarter of W (the extra-memory budget) and at most 4M elements.
// Large tiles matter: BLAS runs a [16 x 4096] @ [4096 x 64] product at a third of the speed of [... x 1024]
// (measured, fp32 and bf16), so tiles of few rows cost more in GEMM time than they save in cache misses.
inline int64_t tile_elements(int64_t weight_elements) {
  return std::clamp<int64_t>(weight_elements / 4, int64_t{1} << 16, int64_t{1} << 22);
}

// Below this many rows of x, the forward computes tile @ x.T (a [rows, M] block of y.T): BLAS is faster with the
// long dimension first (measured: bf16, M = 16, 1.5 ms against 2.1 ms per 4096 x 4096 layer).
constexpr int64_t kTransposedForwardMaxRows = 64;

// Rows of a [..., features] activation: the product of its leading sizes. (reshape({-1, features}) cannot infer it
// when features is 0.)
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

inline void check_activation(const at::Tensor& t, const char* name, int64_t features, const char* what,
                             const at::Tensor& weight, const char* weight_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == features, name, " must end in ", what, " = ", features,
                    ", got shape ", t.sizes());
  check_same_device(t, name, weight, weight_name);
}

// y [M, N] = x2 [M, K] @ W.T, tile by tile.
template <typename ForEachTile>
void tiled_forward(const at::Tensor& x2, at::Tensor& y, int64_t N, ForEachTile&& for_each_tile) {
  const int64_t M = x2.size(0);
  if (M == 0) return;
  const at::Tensor xc = x2.contiguous();
  if (M <= kTransposedForwardMaxRows) {
    at::Tensor yt = at::empty({N, M}, x2.options());
    for_each_tile(x2.scalar_type(), [&](int64_t row0, int64_t rows, const at::Tensor& tile) {
      at::Tensor part = yt.narrow(0, row0, rows);
      at::mm_out(part, tile, xc.t());
    });
    y.copy_(yt.t());
  } else {
    for_each_tile(x2.scalar_type(), [&](int64_t row0, int64_t rows, const at::Tensor& tile) {
      at::Tensor part = y.narrow(1, row0, rows);
      at::mm_out(part, xc, tile.t());
    });
  }
}

// grad_y [..., N] @ W -> [..., K]: the input gradient of a tiled matmul.
template <typename ForEachTile>
at::Tensor tiled_grad_x(const at::Tensor& grad_y, int64_t N, int64_t K, ForEachTile&& for_each_tile) {
  std::vector<int64_t> in_shape(grad_y.sizes().begin(), grad_y.sizes().end());
  in_shape.back() = K;
  const at::Tensor g = grad_y.reshape({leading_rows(grad_y), N}).contiguous();
  at::Tensor out = at::zeros(in_shape, grad_y.options());
  at::Tensor grad_x = out.view({g.size(0), K});
  if (g.size(0) > 0) {
    // The sum over tiles is a split-K GEMM: 16-bit gradients are accumulated in float32 (each tile's product is
    // rounded once), so the result does not lose a bit of precision per tile.
    const bool half = grad_y.scalar_type() == at::kHalf || grad_y.scalar_type() == at::kBFloat16;
    at::Tensor acc = half ? at::zeros({g.size(0), K}, grad_y.options().dtype(at::kFloat)) : grad_x;
    for_each_tile(grad_y.scalar_type(), [&](int64_t row0, int64_t rows, const at::Tensor& tile) {
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

}  // namespace fourbit
