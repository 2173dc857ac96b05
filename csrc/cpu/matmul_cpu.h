// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <ATen/core/Tensor.h>

#include "core/blockwise.h"
#include "core/codebook.h"

namespace fourbit::cpu {

// y [M, N] = x [M, K] @ W.T with the GEMV kernel (packed read once, nibbles decoded in registers). x: any float
// dtype on the CPU; scales: the N * K / blocksize block scales (plain or nested, decoded in the kernel); requires
// K % blocksize == 0. Returns float32.
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const BlockScales& scales, int64_t blocksize,
                     QuantType quant_type, int64_t N, int64_t K);

}  // namespace fourbit::cpu
