// SPDX-License-Identifier: Apache-2.0
// Torch-free interface between the ATen-facing CPU ops (quant_cpu.cpp) and the per-instruction-set kernels
// (quant_kernels_{scalar,avx2,avx512}.cpp, all built from quant_kernels.h with different compiler flags).
// The kernels work on raw pointers over a range of blocks; quant_cpu.cpp splits the blocks across threads.
#pragma once

#include <cstdint>

#include "core/blockwise.h"
#include "core/codebook.h"
#include "core/fake_quant.h"

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
  void* out;  // elements [out_first, n) of out_type: out[0] holds element out_first (a block start)
  ElemType out_type;
  int64_t out_first;
};

// y = x @ W.T for a small batch, W [N, K] 4-bit with K % 32 == 0.
struct Gemv4bitArgs {
  const float* x;  // [K / 32, M, 32] float32: chunk-major, each chunk deinterleaved (16 even elements, 16 odd)
  int64_t M, N, K;
  const uint8_t* packed;
  BlockScales scales;  // [N * K / blocksize] blocks
  int64_t blocksize;
  float lut[16];
  float* y;  // [M, N] float32
};

// The input gradient of the GEMV: grad_x [M, K] = grad_y [M, N] @ W, float32, for small M (matmul_kernels.h).
struct GemvGradArgs {
  const float* grad_y_t;  // [N, M] float32: grad_y transposed, so the M values of one row of W sit side by side
  int64_t M, N, K;
  const uint8_t* packed;
  BlockScales scales;
  int64_t blocksize;
  float lut[16];
  float* grad_x;  // [M, K] float32
};

// Rows of W [N, K] decoded to bfloat16 (the values dequantize_4bit gives) into a panel for the AMX path
// (matmul_cpu.cpp): columns [k_begin, k_end), multiples of 32 (K % 32 == 0).
struct PanelBf16Args {
  const uint8_t* packed;
  BlockScales scales;
  int64_t N, K;
  int64_t blocksize;
  float lut[16];
  uint16_t* out;
  int64_t k_begin, k_end;
};

// Affine fake quantization (qat_kernels.h) of n contiguous elements; per-parameter float32 scale and zero point (the
// zero point already rounded and clamped to an integer in [quant_min, quant_max]).
struct FakeQuantArgs {
  const void* x;
  ElemType type;
  int64_t n;
  AffineLayout layout;
  const float* scale;
  const float* zero_point;
  float quant_min, quant_max;
  void* y;  // n elements of type
};

struct FakeQuantGradArgs {
  FakeQuantArgs fwd;  // y unused
  const void* dy;     // n elements of fwd.type
  void* dx;           // n elements of fwd.type
  float* dscale;      // n per-element scale gradients, or null (then dzero_point is null too)
  float* dzero_point;
};

// dequantize(quantize_4bit(x)) without the packed bytes (plain absmax scales; double quantization is composed in
// fake_quant_cpu.cpp).
struct FakeQuant4bitArgs {
  const void* input;
  ElemType type;
  int64_t n;
  int64_t blocksize;
  Codebook4 codebook;
  void* out;  // n elements of type
};

// LinearInt's weight [N, K]: codes (int4: K / 2 bytes per row, int8: K), scale float32 and zero point uint8 per group
// of group_size along K ([N, K / group_size]); w = (code - zero_point) * scale.
struct DequantizeIntArgs {
  const uint8_t* qweight;
  const float* scale;
  const uint8_t* zero_point;
  int64_t K;
  int64_t group_size;
  int bits;
  void* out;  // rows of K elements of out_type
  ElemType out_type;
};

// Each function handles blocks [block_begin, block_end). Different ranges touch disjoint bytes, because blocks hold
// an even number of elements and therefore start on a byte boundary of the packed buffer.
struct QuantKernels {
  const char* isa;
  void (*quantize_4bit)(const Quantize4bitArgs&, int64_t block_begin, int64_t block_end);
  void (*dequantize_4bit)(const Dequantize4bitArgs&, int64_t block_begin, int64_t block_end);
  // Output columns (rows of W) [n_begin, n_end).
  void (*gemv_4bit)(const Gemv4bitArgs&, int64_t n_begin, int64_t n_end);
  // Rows [n_begin, n_end) of W, row r at out + (r - n_begin) * (k_end - k_begin): the A operand of a GEMM.
  void (*decode_rows_bf16)(const PanelBf16Args&, int64_t n_begin, int64_t n_end);
  // Rows [n_begin, n_end) in pairs, interleaved (VNNI: pair p holds (W[n_begin + 2p, k], W[n_begin + 2p + 1, k]) for
  // each k, 2 * (k_end - k_begin) values): the B operand of an AMX GEMM. The columns of each 32-column chunk come
  // deinterleaved (its 16 even columns, then its 16 odd ones; see pair_panel_position). A row at or past N reads as
  // zeros.
  void (*decode_row_pairs_bf16)(const PanelBf16Args&, int64_t n_begin, int64_t n_end);
  // Chunks [chunk_begin, chunk_end) of 32 columns of grad_x. Only on AVX-512 (null elsewhere: the panel path serves
  // those CPUs).
  void (*gemv_grad_4bit)(const GemvGradArgs&, int64_t chunk_begin, int64_t chunk_end);
  // Elements [begin, end).
  void (*fake_quantize_affine)(const FakeQuantArgs&, int64_t begin, int64_t end);
  void (*fake_quantize_affine_grad)(const FakeQuantGradArgs&, int64_t begin, int64_t end);
  // Blocks [block_begin, block_end).
  void (*fake_quantize_4bit)(const FakeQuant4bitArgs&, int64_t block_begin, int64_t block_end);
  // Rows [row_begin, row_end).
  void (*dequantize_int)(const DequantizeIntArgs&, int64_t row_begin, int64_t row_end);
};

// One table per instruction set; the AVX ones exist only on x86-64 builds.
const QuantKernels& scalar_kernels();
#if defined(FOURBIT_HAVE_X86_KERNELS)
const QuantKernels& avx2_kernels();
const QuantKernels& avx512_kernels();
#endif

}  // namespace fourbit::cpu
