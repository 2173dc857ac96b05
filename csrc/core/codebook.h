// SPDX-License-Identifier: Apache-2.0
// The 4-bit codebooks (NF4, FP4) and the rule that maps a scaled value to its code. This is the only place where the
// levels exist in C++; python/fourbit/reference.py derives them independently and tests/test_codebook.py checks that
// both agree with each other and with bitsandbytes.
#pragma once

#include "core/macros.h"

namespace fourbit {

enum class QuantType : int { kNF4 = 0, kFP4 = 1 };

namespace detail {

// Level values as IEEE-754 float32 bit patterns, indexed by the 4-bit code. NF4 is bitsandbytes' hard-coded table
// (ascending). FP4 is bitsandbytes' E2M1 variant divided by 12, in bit order: bit 3 is the sign, and the table holds
// +0.0 for both code 0 and code 8 (bitsandbytes builds it from the integer list [0, ..., -0, ...]).
constexpr uint32_t kNF4Bits[16] = {
    0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u, 0x00000000u,
    0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u,
};
constexpr uint32_t kFP4Bits[16] = {
    0x00000000u, 0x3baaaaabu, 0x3f2aaaabu, 0x3f800000u, 0x3eaaaaabu, 0x3f000000u, 0x3e2aaaabu, 0x3e800000u,
    0x00000000u, 0xbbaaaaabu, 0xbf2aaaabu, 0xbf800000u, 0xbeaaaaabu, 0xbf000000u, 0xbe2aaaabu, 0xbe800000u,
};

}  // namespace detail

// A 4-bit codebook in the form the kernels use. Kernels receive it by value (CUDA: as a kernel argument, which
// lives in the constant bank), so there is no second copy of the table in device memory.
//   value[c]       the level of code c
//   midpoint[i]    (sorted[i] + sorted[i+1]) / 2 in float32, over the levels sorted ascending
//   code_of_bin[b] the code of the b-th smallest level (a stable sort: of FP4's two zeros, code 0 comes first)
struct Codebook4 {
  float value[16];
  float midpoint[15];
  uint8_t code_of_bin[16];
};

constexpr Codebook4 make_codebook4(QuantType qt) {
  Codebook4 cb{};
  const uint32_t* bits = qt == QuantType::kNF4 ? detail::kNF4Bits : detail::kFP4Bits;
  for (int c = 0; c < 16; ++c) cb.value[c] = __builtin_bit_cast(float, bits[c]);
  // Stable insertion sort of the codes by level.
  for (int c = 0; c < 16; ++c) cb.code_of_bin[c] = static_cast<uint8_t>(c);
  for (int i = 1; i < 16; ++i) {
    for (int j = i; j > 0 && cb.value[cb.code_of_bin[j]] < cb.value[cb.code_of_bin[j - 1]]; --j) {
      uint8_t t = cb.code_of_bin[j];
      cb.code_of_bin[j] = cb.code_of_bin[j - 1];
      cb.code_of_bin[j - 1] = t;
    }
  }
  for (int i = 0; i < 15; ++i) {
    cb.midpoint[i] = (cb.value[cb.code_of_bin[i]] + cb.value[cb.code_of_bin[i + 1]]) / 2.0f;
  }
  return cb;
}

// The bin of a scaled value: how many midpoints m satisfy !(x <= m). For ordinary values this is round-to-nearest
// with a value exactly on a midpoint going to the lower level (torch.bucketize(right=False), as bitsandbytes' CPU
// backend does). The negated comparison sends NaN to the top bin, which is also what bucketize does.
FOURBIT_HD int bin_4bit(float scaled, const float* midpoint) {
  int bin = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) bin += !(scaled <= midpoint[i]);
  return bin;
}

FOURBIT_HD uint8_t encode_4bit(float scaled, const Codebook4& cb) { return cb.code_of_bin[bin_4bit(scaled, cb.midpoint)]; }

// Two codes per byte, the even (first) element in the high nibble, as bitsandbytes stores them.
FOURBIT_HD uint8_t pack_nibbles(uint8_t first, uint8_t second) {
  return static_cast<uint8_t>((first << 4) | (second & 0x0F));
}
FOURBIT_HD uint8_t first_nibble(uint8_t byte) { return static_cast<uint8_t>(byte >> 4); }
FOURBIT_HD uint8_t second_nibble(uint8_t byte) { return static_cast<uint8_t>(byte & 0x0F); }

}  // namespace fourbit
