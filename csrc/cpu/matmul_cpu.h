// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <ATen/core/Tensor.h>

#include "core/blockwise.h"
#include "core/codebook.h"

namespace fourbit::cpu {

// y [M, N] = x [M, K] @ W.T with the GEMV kernel (packed read once, nibbles decoded in registers). x: any float
// dtype on the CPU; scales: the N * K / blocksize block scales (plain or nested, decoded in the kernel); requires
// K % blocksize == 0. y: [M, N] contiguous, any float dtype (the kernel accumulates in float32).
void gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const BlockScales& scales, int64_t blocksize,
               QuantType quant_type, const at::Tensor& y);

}  // namespace fourbit::cpu
