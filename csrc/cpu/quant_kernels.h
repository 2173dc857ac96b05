// SPDX-License-Identifier: Apache-2.0
// Blockwise 4-bit quantize / dequantize loops for one instruction set. This header is included by exactly one
// translation unit per instruction set, each compiled with its own -m flags after defining
//   FOURBIT_ISA     0 = portable scalar, 1 = AVX2 (+FMA, F16C), 2 = AVX-512 (F, BW, VL, DQ)
//   FOURBIT_ISA_NS  a namespace name, so the three copies never share a symbol
// The per-element math comes from csrc/core/; only the 16-element chunk primitives differ between instruction sets,
// and each of them performs the same IEEE float32 operations in the same order, so every path writes the same bytes.
//
// Work unit: a "chunk" of 16 consecutive elements = 8 packed bytes. Block sizes are multiples of 32, so a full block
// is a whole number of chunks; the (at most one) partial last block is handled element by element.
#pragma once

#include <cstring>

#include "core/blockwise.h"
#include "core/codebook.h"
#include "cpu/kernels.h"

#if FOURBIT_ISA > 0
#include <immintrin.h>
#endif

namespace fourbit::cpu::FOURBIT_ISA_NS {
namespace {

// ---- scalar element access ----
template <ElemType E> struct Elem;
template <> struct Elem<ElemType::kFloat32> {
  using storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
template <> struct Elem<ElemType::kFloat16> {
  using storage = uint16_t;
  static float load(uint16_t v) { return fp16_to_float(v); }
  static uint16_t store(float v) { return float_to_fp16(v); }
};
template <> struct Elem<ElemType::kBFloat16> {
  using storage = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
};

// NaN-propagating max, like torch.max: once a NaN is seen the result stays NaN.
inline float max_propagate_nan(float acc, float v) { return (v > acc || v != v) ? v : acc; }

#if FOURBIT_ISA == 2
// ================================ AVX-512: one zmm per chunk ================================
using Chunk = __m512;

template <ElemType E> inline Chunk load_chunk(const typename Elem<E>::storage* p) {
  if constexpr (E == ElemType::kFloat32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (E == ElemType::kBFloat16) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// 16 floats as bfloat16 bit patterns: round to nearest even on the integer bits, NaN -> 0x7FC0 (float_to_bf16 in
// core/).
inline __m256i bf16_bits(Chunk v) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

template <ElemType E> inline void store_chunk(typename Elem<E>::storage* p, Chunk v) {
  if constexpr (E == ElemType::kFloat32) {
    _mm512_storeu_ps(p, v);
  } else if constexpr (E == ElemType::kFloat16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v));
  }
}

inline Chunk mul_chunk(Chunk v, float s) { return _mm512_mul_ps(v, _mm512_set1_ps(s)); }

struct AbsMax {
  __m512 max = _mm512_setzero_ps();
  __mmask16 nan = 0;
  void add(Chunk v) {
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    max = _mm512_max_ps(max, _mm512_abs_ps(v));
  }
  float result() const { return nan ? bits_to_float(0x7FC00000u) : _mm512_reduce_max_ps(max); }
};

struct Encoder {
  __m512 midpoints;  // the 15 sorted midpoints; lane 15 is never probed
  __m512i code_of_bin;
  explicit Encoder(const Codebook4& cb) {
    alignas(64) float mids[16];
    alignas(64) int32_t table[16];
    for (int i = 0; i < 15; ++i) mids[i] = cb.midpoint[i];
    mids[15] = mids[14];
    for (int i = 0; i < 16; ++i) table[i] = cb.code_of_bin[i];
    midpoints = _mm512_load_ps(mids);
    code_of_bin = _mm512_load_si512(table);
  }
  // 16 scaled values -> 8 packed bytes (byte k = code[2k] << 4 | code[2k+1]).
  uint64_t encode(Chunk scaled) const {
    // The bin (count of midpoints m with !(x <= m), as encode_4bit in core/) by binary search: the predicate is
    // monotone over the sorted midpoints, so four probes find the count that fifteen comparisons would.
    __m512i bin = _mm512_setzero_si512();
    for (int step = 8; step > 0; step >>= 1) {
      __m512 probe = _mm512_permutexvar_ps(_mm512_add_epi32(bin, _mm512_set1_epi32(step - 1)), midpoints);
      bin = _mm512_mask_add_epi32(bin, _mm512_cmp_ps_mask(scaled, probe, _CMP_NLE_UQ), bin, _mm512_set1_epi32(step));
    }
    __m512i code = _mm512_permutexvar_epi32(bin, code_of_bin);
    // 64-bit lane k holds code[2k] (low half) and code[2k+1] (high half).
    __m512i first = _mm512_slli_epi64(_mm512_and_si512(code, _mm512_set1_epi64(0xF)), 4);
    __m512i second = _mm512_srli_epi64(code, 32);
    return static_cast<uint64_t>(_mm_cvtsi128_si64(_mm512_cvtepi64_epi8(_mm512_or_si512(first, second))));
  }
};

struct Decoder {
  __m512 lut;
  explicit Decoder(const float* values) { lut = _mm512_loadu_ps(values); }
  Chunk decode(uint64_t packed8) const {
    __m128i bytes = _mm_cvtsi64_si128(static_cast<long long>(packed8));
    __m128i first = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    __m128i second = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
    __m128i codes = _mm_unpacklo_epi8(first, second);  // element order
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), lut);
  }
};

#elif FOURBIT_ISA == 1
// ================================ AVX2: two ymm per chunk ================================
struct Chunk {
  __m256 lo, hi;  // elements 0-7 and 8-15
};

inline __m256 bf16x8_to_float(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

template <ElemType E> inline Chunk load_chunk(const typename Elem<E>::storage* p) {
  if constexpr (E == ElemType::kFloat32) {
    return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  } else if constexpr (E == ElemType::kBFloat16) {
    return {bf16x8_to_float(p), bf16x8_to_float(p + 8)};
  } else {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
}

// Round to nearest even on the integer bits, NaN -> 0x7FC0 (as float_to_bf16 in core/); 8 results as int32.
inline __m256i float_to_bf16x8(__m256 v) {
  __m256i bits = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

template <ElemType E> inline void store_chunk(typename Elem<E>::storage* p, Chunk v) {
  if constexpr (E == ElemType::kFloat32) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  } else if constexpr (E == ElemType::kFloat16) {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.lo, kRound));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(v.hi, kRound));
  } else {
    // packus works within 128-bit lanes; the permute puts the four 64-bit groups back in element order.
    __m256i packed = _mm256_packus_epi32(float_to_bf16x8(v.lo), float_to_bf16x8(v.hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  }
}

inline Chunk mul_chunk(Chunk v, float s) {
  __m256 scale = _mm256_set1_ps(s);
  return {_mm256_mul_ps(v.lo, scale), _mm256_mul_ps(v.hi, scale)};
}

struct AbsMax {
  __m256 max = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();
  void add_half(__m256 v) {
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    max = _mm256_max_ps(max, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
  }
  void add(Chunk v) {
    add_half(v.lo);
    add_half(v.hi);
  }
  float result() const {
    if (_mm256_movemask_ps(nan)) return bits_to_float(0x7FC00000u);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, max);
    float m = lanes[0];
    for (int i = 1; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
    return m;
  }
};

// A 16-entry table lookup with 8-entry permutes: pick from the low or high half by bit 3 of the index.
inline __m256i lookup16_epi32(__m256i lo_table, __m256i hi_table, __m256i index) {
  __m256 lo = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(lo_table, index));
  __m256 hi = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(hi_table, index));
  return _mm256_castps_si256(_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28))));
}

struct Encoder {
  __m256 midpoint[15];
  __m256i code_lo, code_hi;
  explicit Encoder(const Codebook4& cb) {
    for (int i = 0; i < 15; ++i) midpoint[i] = _mm256_set1_ps(cb.midpoint[i]);
    alignas(32) int32_t table[16];
    for (int i = 0; i < 16; ++i) table[i] = cb.code_of_bin[i];
    code_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(table));
    code_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(table + 8));
  }
  // 8 scaled values -> 4 packed bytes.
  uint32_t encode_half(__m256 scaled) const {
    __m256i bin = _mm256_setzero_si256();
    for (int i = 0; i < 15; ++i) {
      bin = _mm256_sub_epi32(bin, _mm256_castps_si256(_mm256_cmp_ps(scaled, midpoint[i], _CMP_NLE_UQ)));
    }
    __m256i code = lookup16_epi32(code_lo, code_hi, bin);
    // 64-bit lane k holds code[2k] (low half) and code[2k+1] (high half); combine, then gather byte 0 of each lane.
    __m256i first = _mm256_slli_epi64(_mm256_and_si256(code, _mm256_set1_epi64x(0xF)), 4);
    __m256i pairs = _mm256_or_si256(first, _mm256_srli_epi64(code, 32));
    const __m256i gather = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                            0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i bytes = _mm256_shuffle_epi8(pairs, gather);
    return static_cast<uint32_t>(_mm256_extract_epi16(bytes, 0)) |
           (static_cast<uint32_t>(_mm256_extract_epi16(bytes, 8)) << 16);
  }
  uint64_t encode(Chunk scaled) const {
    return static_cast<uint64_t>(encode_half(scaled.lo)) | (static_cast<uint64_t>(encode_half(scaled.hi)) << 32);
  }
};

struct Decoder {
  __m256i lut_lo, lut_hi;
  explicit Decoder(const float* values) {
    lut_lo = _mm256_castps_si256(_mm256_loadu_ps(values));
    lut_hi = _mm256_castps_si256(_mm256_loadu_ps(values + 8));
  }
  Chunk decode(uint64_t packed8) const {
    __m128i bytes = _mm_cvtsi64_si128(static_cast<long long>(packed8));
    __m128i first = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    __m128i second = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
    __m128i codes = _mm_unpacklo_epi8(first, second);  // element order
    __m256i lo = lookup16_epi32(lut_lo, lut_hi, _mm256_cvtepu8_epi32(codes));
    __m256i hi = lookup16_epi32(lut_lo, lut_hi, _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
    return {_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi)};
  }
};

#else
// ================================ portable scalar ================================
struct Chunk {
  float v[16];
};

template <ElemType E> inline Chunk load_chunk(const typename Elem<E>::storage* p) {
  Chunk c;
  for (int i = 0; i < 16; ++i) c.v[i] = Elem<E>::load(p[i]);
  return c;
}

template <ElemType E> inline void store_chunk(typename Elem<E>::storage* p, const Chunk& c) {
  for (int i = 0; i < 16; ++i) p[i] = Elem<E>::store(c.v[i]);
}

inline Chunk mul_chunk(Chunk c, float s) {
  for (int i = 0; i < 16; ++i) c.v[i] *= s;
  return c;
}

struct AbsMax {
  float max = 0.0f;
  void add(const Chunk& c) {
    for (int i = 0; i < 16; ++i) max = max_propagate_nan(max, c.v[i] < 0 ? -c.v[i] : c.v[i]);
  }
  float result() const { return max; }
};

struct Encoder {
  Codebook4 cb;
  explicit Encoder(const Codebook4& codebook) : cb(codebook) {}
  uint64_t encode(const Chunk& c) const {
    uint64_t out = 0;
    for (int k = 0; k < 8; ++k) {
      uint8_t byte = pack_nibbles(encode_4bit(c.v[2 * k], cb), encode_4bit(c.v[2 * k + 1], cb));
      out |= static_cast<uint64_t>(byte) << (8 * k);
    }
    return out;
  }
};

struct Decoder {
  float lut[16];
  explicit Decoder(const float* values) { std::memcpy(lut, values, sizeof(lut)); }
  Chunk decode(uint64_t packed8) const {
    Chunk c;
    for (int k = 0; k < 8; ++k) {
      uint8_t byte = static_cast<uint8_t>(packed8 >> (8 * k));
      c.v[2 * k] = lut[first_nibble(byte)];
      c.v[2 * k + 1] = lut[second_nibble(byte)];
    }
    return c;
  }
};
#endif

// ================================ loops shared by every instruction set ================================

// The partial last block: bitsandbytes divides by the clamped absmax here (instead of multiplying by a reciprocal),
// stores the clamped value, and pairs an odd last element with a scaled 0.
template <ElemType E>
void quantize_partial_block(const typename Elem<E>::storage* in, int64_t count, const Codebook4& cb, uint8_t* out,
                            float* absmax_out) {
  float absmax = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    float v = Elem<E>::load(in[i]);
    absmax = max_propagate_nan(absmax, v < 0 ? -v : v);
  }
  absmax = clamp_absmax(absmax);
  *absmax_out = absmax;
  for (int64_t i = 0; i < count; i += 2) {
    float first = Elem<E>::load(in[i]) / absmax;
    float second = i + 1 < count ? Elem<E>::load(in[i + 1]) / absmax : 0.0f;
    out[i / 2] = pack_nibbles(encode_4bit(first, cb), encode_4bit(second, cb));
  }
}

template <ElemType E> void quantize_blocks(const Quantize4bitArgs& a, int64_t block_begin, int64_t block_end) {
  using T = typename Elem<E>::storage;
  const T* input = static_cast<const T*>(a.input);
  const Encoder encoder(a.codebook);
  const int64_t chunks_per_block = a.blocksize / 16;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * a.blocksize;
    const T* in = input + start;
    uint8_t* out = a.packed + start / 2;
    const int64_t count = a.n - start < a.blocksize ? a.n - start : a.blocksize;
    if (count < a.blocksize) {
      quantize_partial_block<E>(in, count, a.codebook, out, a.absmax + b);
      continue;
    }
    AbsMax acc;
    for (int64_t c = 0; c < chunks_per_block; ++c) acc.add(load_chunk<E>(in + 16 * c));
    const float absmax = acc.result();
    a.absmax[b] = absmax;
    const float multiplier = full_block_multiplier(absmax);
    for (int64_t c = 0; c < chunks_per_block; ++c) {
      uint64_t bytes = encoder.encode(mul_chunk(load_chunk<E>(in + 16 * c), multiplier));
      std::memcpy(out + 8 * c, &bytes, 8);
    }
  }
}

template <ElemType E> void dequantize_blocks(const Dequantize4bitArgs& a, int64_t block_begin, int64_t block_end) {
  using T = typename Elem<E>::storage;
  T* output = static_cast<T*>(a.out);
  const Decoder decoder(a.lut);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const float scale = a.scales(b);
    const int64_t start = b * a.blocksize;
    const int64_t count = a.n - start < a.blocksize ? a.n - start : a.blocksize;
    const uint8_t* in = a.packed + start / 2;
    T* out = output + (start - a.out_first);
    const int64_t full_chunks = count / 16;
    for (int64_t c = 0; c < full_chunks; ++c) {
      uint64_t bytes;
      std::memcpy(&bytes, in + 8 * c, 8);
      store_chunk<E>(out + 16 * c, mul_chunk(decoder.decode(bytes), scale));
    }
    for (int64_t i = 16 * full_chunks; i < count; ++i) {
      const uint8_t byte = in[i / 2];
      const uint8_t code = (i % 2 == 0) ? first_nibble(byte) : second_nibble(byte);
      out[i] = Elem<E>::store(a.lut[code] * scale);
    }
  }
}

void quantize_4bit(const Quantize4bitArgs& a, int64_t block_begin, int64_t block_end) {
  switch (a.in_type) {
    case ElemType::kFloat32: return quantize_blocks<ElemType::kFloat32>(a, block_begin, block_end);
    case ElemType::kFloat16: return quantize_blocks<ElemType::kFloat16>(a, block_begin, block_end);
    case ElemType::kBFloat16: return quantize_blocks<ElemType::kBFloat16>(a, block_begin, block_end);
  }
}

void dequantize_4bit(const Dequantize4bitArgs& a, int64_t block_begin, int64_t block_end) {
  switch (a.out_type) {
    case ElemType::kFloat32: return dequantize_blocks<ElemType::kFloat32>(a, block_begin, block_end);
    case ElemType::kFloat16: return dequantize_blocks<ElemType::kFloat16>(a, block_begin, block_end);
    case ElemType::kBFloat16: return dequantize_blocks<ElemType::kBFloat16>(a, block_begin, block_end);
  }
}

}  // namespace
}  // namespace fourbit::cpu::FOURBIT_ISA_NS
