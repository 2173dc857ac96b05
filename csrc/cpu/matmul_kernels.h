// SPDX-License-Identifier: Apache-2.0
// 4-bit GEMV for small batches: y[m, n] = sum_k x[m, k] * W[n, k], decoding W's nibbles in registers and reading the
// packed weight exactly once (decode-time batches are memory bound, so this is what makes 4 bits faster than 16).
// Included once per instruction set next to quant_kernels.h (see that file for FOURBIT_ISA / FOURBIT_ISA_NS).
//
// Layout trick: a packed byte holds an even element (high nibble) and the next odd one (low nibble). Instead of
// interleaving the decoded weights back into element order, the caller hands x with each 32-element group split
// into its 16 even and 16 odd elements ("deinterleaved"), so 16 bytes of codes give two vectors of weights that
// line up with x directly. Each block's scale is folded into a scaled copy of the 16-entry codebook.
//
// Requirements (checked by the caller): K % 32 == 0. Blocks may straddle rows: blocksize is a power of two >= 32, so
// a 32-element chunk of a row never straddles a block, and each chunk looks up its own block's scale.
//
// Loop order (gemv_4bit below): W in turns of a few rows, whose block scales are decoded once into a small buffer;
// within a turn, rows of x in groups (8 on AVX-512, 4 elsewhere) that share each decoded chunk. On AVX-512 each chunk
// of codes also serves several rows of W at once (kRowsOfW), and K is walked in slices that keep the group's x in L1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <vector>

#include "cpu/kernels.h"

#if FOURBIT_ISA > 0
#include <immintrin.h>
#endif

namespace fourbit::cpu::FOURBIT_ISA_NS {
namespace {

inline int log2_blocksize(int64_t blocksize) {
  int shift = 0;
  while ((int64_t{1} << shift) < blocksize) ++shift;
  return shift;
}

// Calls fn.template operator()<G>(m) for the rows [m, M) of x (or grad_y): groups of G = MT rows, then the remainder
// in halving groups (each group size is its own instantiation of the kernel, with its own register tile).
template <int MT, typename F>
void for_each_row_group(int64_t M, int64_t m, F&& fn) {
  for (; m + MT <= M; m += MT) fn.template operator()<MT>(m);
  if constexpr (MT > 1) for_each_row_group<MT / 2>(M, m, fn);
}

// Rows [n_begin, n_end) of W with their block scales decoded once (double-quantized scales cost a few scalar
// operations each; every group of x rows and every chunk of a block reads the decoded float).
struct GemvTurn {
  int64_t n_begin, n_end;
  const float* block_scales;  // blocks [first_block, ...)
  int64_t first_block;
  int block_shift;
  int64_t K;
  // The scale of the chunk of row n starting at column k.
  float scale(int64_t n, int64_t k) const { return block_scales[((n * K + k) >> block_shift) - first_block]; }
};

// Block scales [first, first + count) as float32 into out: a copy of plain scales, or the double-quantized ones
// decoded (on AVX-512 16 at a time, with gathers from the nested codebook; the same multiply and add as BlockScales).
inline void decode_block_scales(const BlockScales& scales, int64_t first, int64_t count, float* out) {
  if (scales.absmax != nullptr) {
    std::copy(scales.absmax + first, scales.absmax + first + count, out);
    return;
  }
  int64_t i = 0;
#if FOURBIT_ISA == 2
  const __m512 offset = _mm512_set1_ps(*scales.offset);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m128i shift = _mm_cvtsi32_si128(scales.nested_shift);
  for (; i + 16 <= count; i += 16) {
    const int64_t block = first + i;
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales.qabsmax + block)));
    const __m512 code = _mm512_i32gather_ps(q, scales.nested_code, 4);
    // Nested groups of the 16 blocks, relative to the first one's (so the indices stay small).
    const int64_t group0 = block >> scales.nested_shift;
    const __m512i within = _mm512_set1_epi32(static_cast<int32_t>(block - (group0 << scales.nested_shift)));
    const __m512i group = _mm512_srl_epi32(_mm512_add_epi32(within, lanes), shift);
    const __m512 nested = _mm512_i32gather_ps(group, scales.nested_absmax + group0, 4);
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(code, nested), offset));
  }
#endif
  for (; i < count; ++i) out[i] = scales(first + i);
}

// x is stored chunk-major: chunk c (columns 32c..32c+31) of all M rows, one row after the other, each deinterleaved.
// One chunk of a group of rows is then contiguous, and a slice of K is a contiguous range.
inline const float* gemv_x(const Gemv4bitArgs& a, int64_t m, int64_t k) { return a.x + (k / 32) * a.M * 32 + m * 32; }

#if FOURBIT_ISA == 2
constexpr int kGemvRowGroup = 8;
// A multiple of every kRowsOfW below. 24 rows of W x 8 rows of x are 12 KiB of partial sums.
constexpr int64_t kGemvRowsPerTurn = 24;
// A slice of K covers this many floats of the group's x (12 KiB), so that slice, the turn's partial sums and codes
// stay in L1 while the slice is applied to every row of the turn. A full K of 8 rows (128 KiB at K = 4096) would be
// read from L2, which cannot feed two loads per pair of FMAs.
constexpr int64_t kGemvSliceFloats = 3072;

// Rows of W decoded per step for a group of MT rows of x: each loaded vector of x then feeds several FMAs (the load
// ports, not the FMA ports, limit one row at a time), within the 32 registers (MT * NB accumulators).
template <int MT>
constexpr int kRowsOfW = MT >= 8 ? 3 : 4;

// Rows [n, n + NB) of W times rows [m0, m0 + MT) of x over columns [k0, k1). Each (row of W, row of x) has one
// accumulator, taking the even then the odd products. partial[r][m] holds the sums of earlier slices (k0 > 0); the
// last slice writes y.
template <int MT, int NB>
void gemv_tile(const Gemv4bitArgs& a, const GemvTurn& turn, int64_t m0, int64_t n, int64_t k0, int64_t k1,
               float (*partial)[MT][16]) {
  // Locals, not fields of `a`: the stores to partial / y could alias them, and reloading them costs load slots.
  const int64_t K = a.K, x_chunk_stride = a.M * 32;
  const GemvTurn t = turn;
  const uint8_t* rows[NB];
  for (int r = 0; r < NB; ++r) rows[r] = a.packed + (n + r) * K / 2;
  const __m512 lut = _mm512_loadu_ps(a.lut);
  __m512 acc[NB][MT];
  for (int r = 0; r < NB; ++r) {
    for (int m = 0; m < MT; ++m) acc[r][m] = k0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(partial[r][m]);
  }
  const float* xs = a.x + (k0 / 32) * x_chunk_stride + m0 * 32;
  for (int64_t k = k0; k < k1; k += 32, xs += x_chunk_stride) {
    __m512 w_even[NB], w_odd[NB];
    // The next rows' codes for the same columns (what the next tile reads), a line (128 columns) per row every four
    // chunks: rows are only a page or two long, too short for the hardware prefetchers to follow.
    if (k % 128 == 0) {
      for (int r = 0; r < NB && n + NB + r < a.N; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + NB * K / 2 + k / 2), _MM_HINT_T0);
      }
    }
    for (int r = 0; r < NB; ++r) {
      const __m512 block_lut = _mm512_mul_ps(lut, _mm512_set1_ps(t.scale(n + r, k)));
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + k / 2)));
      // permutexvar reads only the low 4 bits of each index: the byte itself indexes by its low nibble.
      w_odd[r] = _mm512_permutexvar_ps(bytes, block_lut);
      w_even[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), block_lut);
    }
    for (int m = 0; m < MT; ++m) {
      // The asm keeps each vector of x in a register: otherwise the compiler folds the load into every FMA that
      // uses it, loading it NB times, and the load ports become the limit again.
      __m512 x_even = _mm512_loadu_ps(xs + 32 * m);
      asm("" : "+v"(x_even));
      for (int r = 0; r < NB; ++r) acc[r][m] = _mm512_fmadd_ps(w_even[r], x_even, acc[r][m]);
      __m512 x_odd = _mm512_loadu_ps(xs + 32 * m + 16);
      asm("" : "+v"(x_odd));
      for (int r = 0; r < NB; ++r) acc[r][m] = _mm512_fmadd_ps(w_odd[r], x_odd, acc[r][m]);
    }
  }
  for (int r = 0; r < NB; ++r) {
    for (int m = 0; m < MT; ++m) {
      if (k1 == K) {
        a.y[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
      } else {
        _mm512_store_ps(partial[r][m], acc[r][m]);
      }
    }
  }
}

// Rows [m0, m0 + MT) of x against the turn's rows of W, slice by slice.
template <int MT>
void gemv_rows(const Gemv4bitArgs& a, const GemvTurn& turn, int64_t m0) {
  constexpr int NB = kRowsOfW<MT>;
  alignas(64) float partial[kGemvRowsPerTurn][MT][16];
  const int64_t slice = std::min<int64_t>(a.K, std::max<int64_t>(32, kGemvSliceFloats / MT / 32 * 32));
  for (int64_t k0 = 0; k0 < a.K; k0 += slice) {
    const int64_t k1 = std::min(a.K, k0 + slice);
    int64_t n = turn.n_begin;
    for (; n + NB <= turn.n_end; n += NB) gemv_tile<MT, NB>(a, turn, m0, n, k0, k1, partial + (n - turn.n_begin));
    for (; n < turn.n_end; ++n) gemv_tile<MT, 1>(a, turn, m0, n, k0, k1, partial + (n - turn.n_begin));
  }
}


// ---- The input gradient at small batches: grad_x[m, k] = sum_n grad_y[m, n] * W[n, k] ----
// Each thread owns strips of grad_x's columns, so no sums cross threads. W is walked in blocks of rows; for each
// 32-column chunk of the strip and each group of rows of grad_y, the accumulators (16 even and 16 odd columns per
// row of grad_y) stay in registers down the block's rows: each row's 16 bytes of codes decode once into two vectors
// that every row of the group multiplies by its grad_y[m, n]. Between blocks the sums wait in a per-thread buffer.
// The block is what keeps this fast: a strip of 64 rows is 16 KiB of codes on 32 pages, so the codes stay in L1 for
// every chunk and group, and the pages in the TLB (a walk down all rows of a column touches a new page every other
// row of a 4096-column W, which made the first version slower than dequantizing panels).
constexpr int kGradRowGroup = 8;
constexpr int64_t kGradBlockRows = 64;
constexpr int64_t kGradStripChunks = 16;  // 512 columns: 256 bytes of codes per row

struct GradStrip {
  int64_t c0, chunks;        // chunks [c0, c0 + chunks) of 32 columns
  int64_t n0, rows;          // rows [n0, n0 + rows) of W
  const float* chunk_scales;  // [rows][kGradStripChunks]: the scale of each row's chunk
  float* sums;               // [M][kGradStripChunks][32] float32: even then odd columns of each chunk
  bool first, last;          // the strip's first / last block of rows
  int64_t next_rows;         // rows in the next block (0 for the last)
};

// Rows [m0, m0 + MT) of grad_y against one block of one strip.
template <int MT>
void gemv_grad_rows(const GemvGradArgs& a, const GradStrip& s, int64_t m0) {
  const int64_t M = a.M, K = a.K;
  const __m512 lut = _mm512_loadu_ps(a.lut);
  // Even columns are lanes 0-15 of `even`, odd ones of `odd`: element order interleaves them.
  const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t c = 0; c < s.chunks; ++c) {
    const int64_t k = (s.c0 + c) * 32;
    __m512 even[MT], odd[MT];
    for (int m = 0; m < MT; ++m) {
      float* sum = s.sums + ((m0 + m) * kGradStripChunks + c) * 32;
      even[m] = s.first ? _mm512_setzero_ps() : _mm512_load_ps(sum);
      odd[m] = s.first ? _mm512_setzero_ps() : _mm512_load_ps(sum + 16);
    }
    const uint8_t* codes = a.packed + (s.n0 * K + k) / 2;
    const float* g = a.grad_y_t + s.n0 * M + m0;
    const float* scale = s.chunk_scales + c;
    // The next block's codes come from memory while this one computes (one line per row of W and chunk pass, on
    // the first group's first passes): a strip's rows are a row of codes apart, one short run per page, which the
    // hardware prefetchers do not follow.
    const bool prefetch = m0 == 0 && c * 64 < s.chunks * 16;
    const uint8_t* next = a.packed + ((s.n0 + s.rows) * K + s.c0 * 32) / 2 + c * 64;
    for (int64_t r = 0; r < s.rows; ++r, codes += K / 2, g += M, scale += kGradStripChunks) {
      if (prefetch && r < s.next_rows) _mm_prefetch(reinterpret_cast<const char*>(next + r * K / 2), _MM_HINT_T0);
      const __m512 block_lut = _mm512_mul_ps(lut, _mm512_set1_ps(*scale));
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
      const __m512 w_odd = _mm512_permutexvar_ps(bytes, block_lut);
      const __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), block_lut);
      for (int m = 0; m < MT; ++m) {
        const __m512 gm = _mm512_set1_ps(g[m]);
        even[m] = _mm512_fmadd_ps(w_even, gm, even[m]);
        odd[m] = _mm512_fmadd_ps(w_odd, gm, odd[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      if (s.last) {
        float* out = a.grad_x + (m0 + m) * K + k;
        _mm512_storeu_ps(out, _mm512_permutex2var_ps(even[m], first_half, odd[m]));
        _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(even[m], second_half, odd[m]));
      } else {
        float* sum = s.sums + ((m0 + m) * kGradStripChunks + c) * 32;
        _mm512_store_ps(sum, even[m]);
        _mm512_store_ps(sum + 16, odd[m]);
      }
    }
  }
}

void gemv_grad_4bit(const GemvGradArgs& a, int64_t chunk_begin, int64_t chunk_end) {
  const int block_shift = log2_blocksize(a.blocksize);
  std::vector<float> chunk_scales(kGradBlockRows * kGradStripChunks);
  // 64-byte aligned (the size, M * 2 KiB, is a multiple of it).
  float* sums = static_cast<float*>(std::aligned_alloc(64, a.M * kGradStripChunks * 32 * sizeof(float)));
  if (sums == nullptr) throw std::bad_alloc();
  for (int64_t c0 = chunk_begin; c0 < chunk_end; c0 += kGradStripChunks) {
    const int64_t chunks = std::min(kGradStripChunks, chunk_end - c0);
    for (int64_t n0 = 0; n0 < a.N; n0 += kGradBlockRows) {
      const int64_t rows = std::min(kGradBlockRows, a.N - n0);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < chunks; ++c) {
          chunk_scales[r * kGradStripChunks + c] = a.scales(((n0 + r) * a.K + (c0 + c) * 32) >> block_shift);
        }
      }
      const int64_t next_rows = std::min(kGradBlockRows, a.N - n0 - rows);
      const GradStrip strip{c0, chunks, n0, rows, chunk_scales.data(), sums, n0 == 0, n0 + rows == a.N, next_rows};
      for_each_row_group<kGradRowGroup>(a.M, 0, [&]<int G>(int64_t m) { gemv_grad_rows<G>(a, strip, m); });
    }
  }
  std::free(sums);
}

#elif FOURBIT_ISA == 1
constexpr int kGemvRowGroup = 4;
// 16 rows of K = 4096 are 32 KiB of codes, which stay in L1 while the groups of x take turns.
constexpr int64_t kGemvRowsPerTurn = 16;

inline __m256 lookup16(__m256 lo, __m256 hi, __m256i index) {
  const __m256 from_lo = _mm256_permutevar8x32_ps(lo, index);
  const __m256 from_hi = _mm256_permutevar8x32_ps(hi, index);
  return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows of W one at a time; MT rows of x share each decoded chunk.
template <int MT>
void gemv_rows(const Gemv4bitArgs& a, const GemvTurn& turn, int64_t m0) {
  const __m256 lut_lo = _mm256_loadu_ps(a.lut), lut_hi = _mm256_loadu_ps(a.lut + 8);
  const __m256i low_nibble = _mm256_set1_epi32(0xF);
  for (int64_t n = turn.n_begin; n < turn.n_end; ++n) {
    const uint8_t* row = a.packed + n * a.K / 2;
    __m256 acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < a.K; k += 32) {
      const __m256 scale = _mm256_set1_ps(turn.scale(n, k));
      const __m256 lo = _mm256_mul_ps(lut_lo, scale), hi = _mm256_mul_ps(lut_hi, scale);
      const float* xs = gemv_x(a, m0, k);
      for (int half = 0; half < 2; ++half) {  // 8 bytes = 8 even + 8 odd weights
        const __m256i bytes =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2 + 8 * half)));
        const __m256 w_odd = lookup16(lo, hi, _mm256_and_si256(bytes, low_nibble));
        const __m256 w_even = lookup16(lo, hi, _mm256_srli_epi32(bytes, 4));
        for (int m = 0; m < MT; ++m) {
          const float* x_chunk = xs + 32 * m + 8 * half;
          acc[m][0] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(x_chunk), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(x_chunk + 16), acc[m][1]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n] = reduce_add(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
}

#else
constexpr int kGemvRowGroup = 4;
constexpr int64_t kGemvRowsPerTurn = 16;

template <int MT>
void gemv_rows(const Gemv4bitArgs& a, const GemvTurn& turn, int64_t m0) {
  for (int64_t n = turn.n_begin; n < turn.n_end; ++n) {
    const uint8_t* row = a.packed + n * a.K / 2;
    float acc[MT] = {};
    for (int64_t k = 0; k < a.K; k += 32) {
      const float scale = turn.scale(n, k);
      const float* xs = gemv_x(a, m0, k);
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = row[k / 2 + j];
        const float w_even = a.lut[first_nibble(byte)] * scale, w_odd = a.lut[second_nibble(byte)] * scale;
        for (int m = 0; m < MT; ++m) acc[m] += w_even * xs[32 * m + j] + w_odd * xs[32 * m + 16 + j];
      }
    }
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n] = acc[m];
  }
}
#endif

void gemv_4bit(const Gemv4bitArgs& a, int64_t n_begin, int64_t n_end) {
  const int block_shift = log2_blocksize(a.blocksize);
  std::vector<float> scales;
  for (int64_t n = n_begin; n < n_end; n += kGemvRowsPerTurn) {
    const int64_t n_stop = std::min(n_end, n + kGemvRowsPerTurn);
    const int64_t first_block = (n * a.K) >> block_shift, end_block = ((n_stop * a.K - 1) >> block_shift) + 1;
    scales.resize(end_block - first_block);
    decode_block_scales(a.scales, first_block, end_block - first_block, scales.data());
    const GemvTurn turn{n, n_stop, scales.data(), first_block, block_shift, a.K};
    for_each_row_group<kGemvRowGroup>(a.M, 0, [&]<int G>(int64_t m) { gemv_rows<G>(a, turn, m); });
  }
}

// ---- bfloat16 panels of W for the AMX path ----
// Each 32-element chunk of a row shares one block scale (as in the GEMV). The values are bf16(code value * scale) with
// the product in float32: exactly what dequantize_4bit writes.
//
// Row pairs (the input gradient's VNNI panels) come with each 32-column chunk deinterleaved: its 16 even columns,
// then its 16 odd ones, pair by pair. The gradient's columns come out in that order, and amx_grad_x puts them back.
// (That is the order in which one 16-byte load of codes decodes; interleaving the columns here cost more than the
// decode itself.)

// Where column k of a row pair lands in a deinterleaved panel row (relative to the panel's first column, a multiple
// of 32).
inline int64_t pair_panel_position(int64_t k) { return k / 32 * 32 + (k % 2) * 16 + (k % 32) / 2; }

#if FOURBIT_ISA == 2
// The codebook scaled by `scale`, each entry rounded to bfloat16 in the high word of its dword (word 2c + 1 holds
// entry c): the rounding is bf16_bits' integer one, without the narrowing to 16 bits, which a decoder's word permute
// does for free by reading odd words. Entries can be NaN only when the scale is not finite (the codebook is finite);
// that rare case takes bf16_bits itself.
inline __m512i scaled_table_bf16(__m512 lut, float scale) {
  const __m512 v = _mm512_mul_ps(lut, _mm512_set1_ps(scale));
  if (!std::isfinite(scale)) return _mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(v)), 16);
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
}

// 16 packed bytes as dwords (byte i in dword i).
inline __m512i load_code_bytes(const uint8_t* bytes) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
}

// 16 packed bytes -> their 32 values in element order: dword i holds byte i, whose high nibble (element 2i) becomes
// word 2i and whose low nibble (element 2i + 1) word 2i + 1. A nibble c reads the table's word 2c + 1: in word 2i,
// (b >> 3) puts the high nibble at bits 1-4 (bit 0 is forced to 1); in word 2i + 1, (b << 17) puts the low nibble at
// bits 1-4 of that word. permutexvar_epi16 reads the low 5 bits of each word.
inline __m512i decode32_bf16(const uint8_t* bytes, __m512i table) {
  const __m512i b = load_code_bytes(bytes);
  const __m512i index = _mm512_ternarylogic_epi32(_mm512_srli_epi32(b, 3), _mm512_slli_epi32(b, 17),
                                                  _mm512_set1_epi32(0x00010001), 0xFE);  // a | b | c
  return _mm512_permutexvar_epi16(index, table);
}

// Asks for the cache line holding row n's codes at column k of W [N, K]. Rows past the end ask for the last row
// instead of skipping: GCC 12 dropped this prefetch from the binary when it sat under an `if (n < N)`.
inline void prefetch_codes(const uint8_t* packed, int64_t N, int64_t K, int64_t n, int64_t k) {
  _mm_prefetch(reinterpret_cast<const char*>(packed + (std::min(n, N - 1) * K + k) / 2), _MM_HINT_T0);
}

// Rows of W decoded chunk by chunk, each keeping its block's table across the chunks of that block. The fields are
// copies (not references into the arguments), so the compiler keeps them in registers across the stores.
struct RowDecoder {
  const uint8_t* packed;
  BlockScales scales;
  int64_t N, K;
  int block_shift;
  __m512 lut;
  int64_t block = -1;
  __m512i table = _mm512_setzero_si512();
  explicit RowDecoder(const PanelBf16Args& a)
      : packed(a.packed), scales(a.scales), N(a.N), K(a.K), block_shift(log2_blocksize(a.blocksize)),
        lut(_mm512_loadu_ps(a.lut)) {}
  // The table of the block holding row n's column k.
  __m512i table_at(int64_t n, int64_t k) {
    const int64_t index = n * K + k;
    if ((index >> block_shift) != block) {
      block = index >> block_shift;
      table = scaled_table_bf16(lut, scales(block));
    }
    return table;
  }
  // Row n's 32 values at column k (n < N).
  __m512i chunk(int64_t n, int64_t k) { return decode32_bf16(codes(n, k), table_at(n, k)); }
  const uint8_t* codes(int64_t n, int64_t k) const { return packed + (n * K + k) / 2; }
};

// The decoders read W from memory at a few GB/s per core unless they ask for it ahead: the hardware prefetchers lose
// the stream at each 4 KiB page, and the row pairs walk down W a few hundred bytes per row. Both ask for codes ahead in
// their walk (rows ahead, in the same columns). Measured on one core, 16 weights of 4096 x 4096 in turn (beyond the
// cache): the row decode of a weight went from 1.5 to 1.1 ms (4 KiB ahead), the pair decode from 3.5 to 2.5 ms (64
// rows ahead, with the table refresh below).
constexpr int64_t kDecodePrefetchBytes = 4096;
constexpr int64_t kPairPrefetchRows = 64;

void decode_rows_bf16(const PanelBf16Args& a, int64_t n_begin, int64_t n_end) {
  RowDecoder decoder(a);
  const int64_t k_begin = a.k_begin, k_end = a.k_end, width = k_end - k_begin;
  uint16_t* const out = a.out;
  // Whole rows ahead (at least one), in the same columns.
  const int64_t ahead = std::max<int64_t>(1, kDecodePrefetchBytes / (a.K / 2));
  for (int64_t n = n_begin; n < n_end; ++n) {
    uint16_t* row = out + (n - n_begin) * width;
    for (int64_t k = k_begin; k < k_end; k += 32) {
      if ((k - k_begin) % 128 == 0) prefetch_codes(a.packed, a.N, a.K, n + ahead, k);  // a 64-byte line per 128
      _mm512_storeu_si512(row + (k - k_begin), decoder.chunk(n, k));
    }
  }
}

// Each chunk of a row pair (rows n and n + 1, 32 columns) in two permutes over both rows' tables
// (permutex2var_epi16: bits 0-4 of a word pick the word, bit 5 the table). Dword j of the result pairs row n's and
// row n + 1's values of one column: for the even columns (high nibbles) the low word indexes row n's table with
// (a >> 3) | 1 and the high word row n + 1's with (b << 13) | 1 << 16 | 1 << 21; for the odd columns (low nibbles)
// the nibbles are masked out of (a << 1) and (b << 17) first, because the bits above them would pick the table.
//
// The walk asks for the codes kPairPrefetchRows rows ahead at the start of each pair, and refreshes each row's table
// only where a block starts (RowDecoder's per-chunk block test cost about 15% here).
void decode_row_pairs_bf16(const PanelBf16Args& a, int64_t n_begin, int64_t n_end) {
  const BlockScales scales = a.scales;  // a copy, kept in registers across the stores
  const uint8_t* const packed = a.packed;
  const int64_t N = a.N, K = a.K, k_begin = a.k_begin, k_end = a.k_end, width = k_end - k_begin;
  const int shift = log2_blocksize(a.blocksize);
  const int64_t block_mask = a.blocksize - 1;
  const __m512 lut = _mm512_loadu_ps(a.lut);
  uint16_t* const out = a.out;
  const __m512i set_bits = _mm512_set1_epi32(0x00210001), odd_nibbles = _mm512_set1_epi32(0x001E001E);
  for (int64_t n = n_begin; n < n_end; n += 2) {
    for (int64_t k = k_begin; k < k_end; k += 128) {  // one 64-byte line of codes per 128 columns
      prefetch_codes(packed, N, K, n + kPairPrefetchRows, k);
      prefetch_codes(packed, N, K, n + kPairPrefetchRows + 1, k);
    }
    uint16_t* pair = out + (n - n_begin) * width;  // pair (n - n_begin) / 2: 2 * width values
    // Past N, the second row is a zero row: its table is zero, and it reads row n's codes (any codes give zeros).
    const bool second_row = n + 1 < N;
    const int64_t first_a = n * K, first_b = (second_row ? n + 1 : n) * K;
    __m512i ta = _mm512_setzero_si512(), tb = _mm512_setzero_si512();
    for (int64_t k = k_begin; k < k_end; k += 32) {
      const int64_t ia = first_a + k, ib = first_b + k;
      if (k == k_begin || (ia & block_mask) == 0) ta = scaled_table_bf16(lut, scales(ia >> shift));
      if (second_row && (k == k_begin || (ib & block_mask) == 0)) tb = scaled_table_bf16(lut, scales(ib >> shift));
      const __m512i ca = load_code_bytes(packed + ia / 2), cb = load_code_bytes(packed + ib / 2);
      const __m512i even_index =
          _mm512_ternarylogic_epi32(_mm512_srli_epi32(ca, 3), _mm512_slli_epi32(cb, 13), set_bits, 0xFE);
      const __m512i odd_index = _mm512_or_si512(
          _mm512_ternarylogic_epi32(_mm512_slli_epi32(ca, 1), _mm512_slli_epi32(cb, 17), odd_nibbles, 0xA8),
          set_bits);  // ((a << 1) | (b << 17)) & odd_nibbles, then the fixed bits
      uint16_t* dst = pair + 2 * (k - k_begin);
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(ta, even_index, tb));
      _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(ta, odd_index, tb));
    }
  }
}

#else
// Portable versions (also what the AVX2 table uses: the AMX path only runs on CPUs that have AVX-512).
inline uint16_t panel_value(const PanelBf16Args& a, int block_shift, int64_t n, int64_t k) {
  if (n >= a.N) return 0;
  const int64_t index = n * a.K + k;
  const uint8_t byte = a.packed[index / 2];
  const uint8_t code = index % 2 == 0 ? first_nibble(byte) : second_nibble(byte);
  return float_to_bf16(a.lut[code] * a.scales(index >> block_shift));
}

void decode_rows_bf16(const PanelBf16Args& a, int64_t n_begin, int64_t n_end) {
  const int shift = log2_blocksize(a.blocksize);
  const int64_t width = a.k_end - a.k_begin;
  for (int64_t n = n_begin; n < n_end; ++n) {
    uint16_t* out = a.out + (n - n_begin) * width;
    for (int64_t k = a.k_begin; k < a.k_end; ++k) out[k - a.k_begin] = panel_value(a, shift, n, k);
  }
}

void decode_row_pairs_bf16(const PanelBf16Args& a, int64_t n_begin, int64_t n_end) {
  const int shift = log2_blocksize(a.blocksize);
  const int64_t width = a.k_end - a.k_begin;
  for (int64_t n = n_begin; n < n_end; n += 2) {
    uint16_t* out = a.out + (n - n_begin) * width;
    for (int64_t k = a.k_begin; k < a.k_end; ++k) {
      const int64_t position = pair_panel_position(k - a.k_begin);
      out[2 * position] = panel_value(a, shift, n, k);
      out[2 * position + 1] = panel_value(a, shift, n + 1, k);
    }
  }
}
#endif

}  // namespace
}  // namespace fourbit::cpu::FOURBIT_ISA_NS
