// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <ATen/core/Tensor.h>

#include "core/blockwise.h"
#include "core/codebook.h"

namespace fourbit::cpu {

// y [M, N] = x [M, K] @ W.T with the GEMV kernel (packed read once, nibbles decoded in registers). x: any float
// dtype on the CPU; scales: the N * K / blocksize block scales (plain or nested, decoded in the kernel); requires
// K % 32 == 0. y: [M, N] contiguous, any float dtype (the kernel accumulates in float32).
void gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const BlockScales& scales, int64_t blocksize,
               QuantType quant_type, const at::Tensor& y);

// The packed weight W [N, K] as the panel path reads it.
struct Packed4bit {
  const at::Tensor& packed;
  BlockScales scales;
  int64_t blocksize;
  QuantType quant_type;
  int64_t N, K;
};

// The GEMV for the input gradient at small batches (AVX-512 only: gemv_grad_available): grad_x [M, K] = grad_y [M, N]
// @ W in float32 with W decoded in registers, each thread owning chunks of 32 columns of grad_x. grad_y and grad_x
// float32, grad_x contiguous [M, K]; requires K % 32 == 0.
bool gemv_grad_available();
void gemv_grad_x(const at::Tensor& grad_y, const Packed4bit& w, const at::Tensor& grad_x);

// The panel path for the input gradient at medium batches: each thread dequantizes panels of a few rows
// of W into its own cache-sized buffer and multiplies them right away, so W is read once and its dequantized values
// stay in that core's cache (the tiled path's large tiles go through the shared cache and memory). Returns the rows
// per panel for this weight and compute dtype (float32 / float16 / bfloat16), or 0 when the path does not apply
// (a panel cannot both start on a block and fit the cache).
int64_t panel_rows(const Packed4bit& w, at::ScalarType dtype);

// grad_x [M, K] = grad_y [M, N] @ W; grad_y contiguous, grad_x contiguous of grad_y's dtype. The sum over panels is
// accumulated in float32.
void panel_grad_x(const at::Tensor& grad_y, const Packed4bit& w, const at::Tensor& grad_x);

// The AMX path for bfloat16 activations on CPUs with AMX (what oneDNN's brgemm micro-kernel reports): panels of W
// are decoded straight to bfloat16 in each core's cache and multiplied on the matrix unit, which is what dense bf16
// layers use too. Needs K % 32 == 0. (BLAS on the tiled path would also reach the matrix unit, but only after the
// tile has gone through memory, in a layout it must repack.)
bool amx_bf16_available();

// y [M, N] = x [M, K] @ W.T; x contiguous bfloat16, y contiguous bfloat16.
void amx_forward(const at::Tensor& x, const Packed4bit& w, const at::Tensor& y);

// grad_x [M, K] = grad_y [M, N] @ W; grad_y contiguous bfloat16, grad_x contiguous bfloat16. Each output element
// is one float32 sum over all of N, rounded once.
void amx_grad_x(const at::Tensor& grad_y, const Packed4bit& w, const at::Tensor& grad_x);

// grad_x [M, K] = grad_y [M, N] @ W for bfloat16 at large batches (K % 32 == 0): W is decoded a tile of columns at a
// time ([N, columns], at most a quarter of W) and each tile gives its slice of grad_x in one GEMM over all of N, so
// there is no float32 accumulator across tiles and each output element is rounded once.
void column_tiled_grad_x_bf16(const at::Tensor& grad_y, const Packed4bit& w, const at::Tensor& grad_x);

}  // namespace fourbit::cpu
