// SPDX-License-Identifier: Apache-2.0
// The CUDA GEMV for small batches (matmul_cuda.cu), called by matmul.cpp when the extension is built with CUDA.
#pragma once

#include <ATen/core/Tensor.h>

#include "core/blockwise.h"
#include "core/codebook.h"

namespace fourbit::cuda {

// Largest batch (rows of x) that takes the GEMV kernel. Up to this size a decode-time matmul is bound by reading W,
// which the kernel does once, at 4 bits; larger batches dequantize tiles for cuBLAS.
constexpr int64_t kGemvMaxBatch = 8;

// Whether gemv_4bit can take these tensors: x [M, K] contiguous float32 / float16 / bfloat16 with 1 <= M <=
// kGemvMaxBatch, K % 32 == 0, and 16-byte aligned x and packed data (the kernel's vector loads).
bool gemv_4bit_applies(const at::Tensor& x, const at::Tensor& packed);

// y [M, N] = x [M, K] @ W.T, W [N, K] 4-bit (bitsandbytes layout), scales plain or nested. y: [M, N] contiguous of
// x's dtype. Accumulates in float32.
void gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const BlockScales& scales, int64_t blocksize,
               QuantType quant_type, const at::Tensor& y);

}  // namespace fourbit::cuda
