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
// Loop order (gemv_4bit below): rows of x in groups that share each decoded chunk (8 on AVX-512, 4 elsewhere); when
// there are several groups they take turns over a few rows of W at a time, which stay in L1 meanwhile.
#pragma once

#include <algorithm>

#include "cpu/kernels.h"

#if FOURBIT_ISA > 0
#include <immintrin.h>
#endif

namespace fourbit::cpu::FOURBIT_ISA_NS {
namespace {

// Rows of W that the row groups of x take turns over: 16 rows of K = 4096 are 32 KiB of codes.
constexpr int64_t kGemvRowsPerTurn = 16;

inline int log2_blocksize(int64_t blocksize) {
  int shift = 0;
  while ((int64_t{1} << shift) < blocksize) ++shift;
  return shift;
}

// The scale of the block holding element `index` of W (blocksize = 1 << block_shift).
inline float chunk_scale(const Gemv4bitArgs& a, int64_t index, int block_shift) { return a.scales(index >> block_shift); }


#if FOURBIT_ISA == 2
// Rows of W one at a time; MT rows of x share each decoded chunk.
constexpr int kGemvRowGroup = 8;

template <int MT>
void gemv_rows(const Gemv4bitArgs& a, int block_shift, int64_t m0, int64_t n_begin, int64_t n_end) {
  const __m512 lut = _mm512_loadu_ps(a.lut);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = a.packed + n * a.K / 2;
    __m512 acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < a.K; k += 32) {
      const __m512 block_lut = _mm512_mul_ps(lut, _mm512_set1_ps(chunk_scale(a, n * a.K + k, block_shift)));
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
      // permutexvar reads only the low 4 bits of each index: the byte itself indexes by its low nibble.
      const __m512 w_odd = _mm512_permutexvar_ps(bytes, block_lut);
      const __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), block_lut);
      for (int m = 0; m < MT; ++m) {
        const float* xs = a.x + (m0 + m) * a.K + k;
        acc[m][0] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xs), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xs + 16), acc[m][1]);
      }
    }
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
  }
}

#elif FOURBIT_ISA == 1
constexpr int kGemvRowGroup = 4;

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

template <int MT>
void gemv_rows(const Gemv4bitArgs& a, int block_shift, int64_t m0, int64_t n_begin, int64_t n_end) {
  const __m256 lut_lo = _mm256_loadu_ps(a.lut), lut_hi = _mm256_loadu_ps(a.lut + 8);
  const __m256i low_nibble = _mm256_set1_epi32(0xF);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = a.packed + n * a.K / 2;
    __m256 acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < a.K; k += 32) {
      const __m256 scale = _mm256_set1_ps(chunk_scale(a, n * a.K + k, block_shift));
      const __m256 lo = _mm256_mul_ps(lut_lo, scale), hi = _mm256_mul_ps(lut_hi, scale);
      for (int half = 0; half < 2; ++half) {  // 8 bytes = 8 even + 8 odd weights
        const __m256i bytes =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2 + 8 * half)));
        const __m256 w_odd = lookup16(lo, hi, _mm256_and_si256(bytes, low_nibble));
        const __m256 w_even = lookup16(lo, hi, _mm256_srli_epi32(bytes, 4));
        for (int m = 0; m < MT; ++m) {
          const float* xs = a.x + (m0 + m) * a.K + k + 8 * half;
          acc[m][0] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(xs), acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xs + 16), acc[m][1]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n] = reduce_add(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
}

#else
constexpr int kGemvRowGroup = 4;

template <int MT>
void gemv_rows(const Gemv4bitArgs& a, int block_shift, int64_t m0, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = a.packed + n * a.K / 2;
    float acc[MT] = {};
    for (int64_t k = 0; k < a.K; k += 32) {
      const float scale = chunk_scale(a, n * a.K + k, block_shift);
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = row[k / 2 + j];
        const float w_even = a.lut[first_nibble(byte)] * scale, w_odd = a.lut[second_nibble(byte)] * scale;
        for (int m = 0; m < MT; ++m) {
          const float* xs = a.x + (m0 + m) * a.K + k;
          acc[m] += w_even * xs[j] + w_odd * xs[16 + j];
        }
      }
    }
    for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + n] = acc[m];
  }
}
#endif

// Rows [m, M) of x: groups of MT rows, then the remainder in halving groups.
template <int MT>
void gemv_groups(const Gemv4bitArgs& a, int block_shift, int64_t m, int64_t n_begin, int64_t n_end) {
  for (; m + MT <= a.M; m += MT) gemv_rows<MT>(a, block_shift, m, n_begin, n_end);
  if constexpr (MT > 1) gemv_groups<MT / 2>(a, block_shift, m, n_begin, n_end);
}

void gemv_4bit(const Gemv4bitArgs& a, int64_t n_begin, int64_t n_end) {
  const int block_shift = log2_blocksize(a.blocksize);
  const int64_t turn = a.M <= kGemvRowGroup ? n_end - n_begin : kGemvRowsPerTurn;
  for (int64_t n = n_begin; n < n_end; n += turn) {
    gemv_groups<kGemvRowGroup>(a, block_shift, 0, n, std::min(n_end, n + turn));
  }
}

// ---- bfloat16 panels of W for the AMX path ----
// Each 32-element chunk of a row shares one block scale (as in the GEMV). The values are bf16(code value * scale) with
// the product in float32: exactly what dequantize_4bit writes.

#if FOURBIT_ISA == 2
// The chunk's codebook scaled and rounded to bfloat16, in the low 16 words of a zmm (permutexvar_epi16 indexes it).
inline __m512i scaled_table_bf16(__m512 lut, float scale) {
  return _mm512_castsi256_si512(bf16_bits(_mm512_mul_ps(lut, _mm512_set1_ps(scale))));
}

// 16 packed bytes -> their 32 values in element order: dword i holds byte i, whose high nibble (element 2i) becomes
// word 2i and whose low nibble (element 2i + 1) word 2i + 1.
inline __m512i decode32_bf16(const uint8_t* bytes, __m512i table) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512i index =
      _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0xF)), 16));
  return _mm512_permutexvar_epi16(index, table);
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
  // Row n's 32 values at column k (n < N).
  __m512i chunk(int64_t n, int64_t k) {
    const int64_t index = n * K + k;
    if ((index >> block_shift) != block) {
      block = index >> block_shift;
      table = scaled_table_bf16(lut, scales(block));
    }
    return decode32_bf16(packed + index / 2, table);
  }
};

void decode_rows_bf16(const PanelBf16Args& a, int64_t n_begin, int64_t n_end) {
  RowDecoder decoder(a);
  const int64_t k_begin = a.k_begin, k_end = a.k_end, width = k_end - k_begin;
  uint16_t* const out = a.out;
  for (int64_t n = n_begin; n < n_end; ++n) {
    uint16_t* row = out + (n - n_begin) * width;
    for (int64_t k = k_begin; k < k_end; k += 32) _mm512_storeu_si512(row + (k - k_begin), decoder.chunk(n, k));
  }
}

void decode_row_pairs_bf16(const PanelBf16Args& a, int64_t n_begin, int64_t n_end) {
  RowDecoder even(a), odd(a);
  const int64_t k_begin = a.k_begin, k_end = a.k_end, width = k_end - k_begin, N = a.N;
  uint16_t* const out = a.out;
  // unpack{lo,hi}_epi16 interleave within 128-bit lanes (lo: elements 8L..8L+3 of lane L, hi: 8L+4..8L+7); the
  // 64-bit permutes put the pairs back in column order.
  const __m512i first_half = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second_half = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t n = n_begin; n < n_end; n += 2) {
    uint16_t* pair = out + (n - n_begin) * width;  // pair (n - n_begin) / 2: 2 * width values
    const bool second_row = n + 1 < N;             // past N: a zero row
    for (int64_t k = k_begin; k < k_end; k += 32) {
      const __m512i r0 = even.chunk(n, k), r1 = second_row ? odd.chunk(n + 1, k) : _mm512_setzero_si512();
      const __m512i lo = _mm512_unpacklo_epi16(r0, r1), hi = _mm512_unpackhi_epi16(r0, r1);
      uint16_t* dst = pair + 2 * (k - k_begin);
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(lo, first_half, hi));
      _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi64(lo, second_half, hi));
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
      out[2 * (k - a.k_begin)] = panel_value(a, shift, n, k);
      out[2 * (k - a.k_begin) + 1] = panel_value(a, shift, n + 1, k);
    }
  }
}
#endif

}  // namespace
}  // namespace fourbit::cpu::FOURBIT_ISA_NS
