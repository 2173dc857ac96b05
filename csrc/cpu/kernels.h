// SPDX-License-Identifier: Apache-2.0
// Torch-free interface between the ATen-facing CPU ops (quant_cpu.cpp) and the per-instruction-set kernels
// (quant_kernels_{scalar,avx2,avx512}.cpp, all built from quant_kernels.h with different compiler flags).
// The kernels work on raw pointers over a range of blocks; quant_cpu.cpp splits the blocks across threads.
#pragma once

#include <cstdint>

#include "core/blockwise.h"
#include "core/codebook.h"

namespace fourbit::cpu {

enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Quantize4bitArgs {
  const void* input;  // n contiguous elements of in_type
  ElemType in_type;
  int64_t n;
  int64_t blocksize;
  Codebook4 codebook;
  uint8_t* packed;  // ceil(n / 2) bytes
  float* absmax;    // ceil(n / blocksize) values
};

struct Dequantize4bitArgs {
  const uint8_t* packed;
  BlockScales scales;
  int64_t n;
  int64_t blocksize;
  float lut[16];
  void* out;  // n elements of out_type
  ElemType out_type;
};

// y = x @ W.T for a small batch, W [N, K] 4-bit with plain float32 scales and K % blocksize == 0.
struct Gemv4bitArgs {
  const float* x;  // [M, K] float32, each 32-element group deinterleaved: its 16 even elements, then its 16 odd
  int64_t M, N, K;
  const uint8_t* packed;
  BlockScales scales;  // [N * K / blocksize] blocks
  int64_t blocksize;
  float lut[16];
  float* y;  // [M, N] float32
};

// Each function handles blocks [block_begin, block_end). Different ranges touch disjoint bytes, because blocks hold
// an even number of elements and therefore start on a byte boundary of the packed buffer.
struct QuantKernels {
  const char* isa;
  void (*quantize_4bit)(const Quantize4bitArgs&, int64_t block_begin, int64_t block_end);
  void (*dequantize_4bit)(const Dequantize4bitArgs&, int64_t block_begin, int64_t block_end);
  // Output columns (rows of W) [n_begin, n_end).
  void (*gemv_4bit)(const Gemv4bitArgs&, int64_t n_begin, int64_t n_end);
};

// One table per instruction set; the AVX ones exist only on x86-64 builds.
const QuantKernels& scalar_kernels();
#if defined(FOURBIT_HAVE_X86_KERNELS)
const QuantKernels& avx2_kernels();
const QuantKernels& avx512_kernels();
#endif

}  // namespace fourbit::cpu
