// SPDX-License-Identifier: Apache-2.0
// Blockwise absmax scaling rules and float conversions shared by every kernel.
//
// Layout (bitsandbytes-compatible): the input is flattened in row-major order and cut into blocks of `blocksize`
// elements; the last block may be partial. absmax[b] = max |x| over block b (float32). The packed tensor holds
// ceil(n / 2) bytes, element 2i in the high nibble of byte i; an odd last element is paired with the code of 0.
#pragma once

#include "core/macros.h"

namespace fourbit {

// bitsandbytes clamps absmax to this before scaling, so an all-zero block quantizes to the code of 0.
// (1e-38 is a float32 subnormal; its reciprocal, ~1e38, is finite.)
constexpr float kMinAbsmax = 1e-38f;

// NaN passes through (like torch.clamp), so a block holding NaN keeps a NaN absmax.
FOURBIT_HD float clamp_absmax(float absmax) { return absmax < kMinAbsmax ? kMinAbsmax : absmax; }

// The two scaling rules of bitsandbytes' CPU backend, which fourbit reproduces bit for bit:
//  - a full block multiplies by the float32 reciprocal of its (clamped) absmax and stores the raw absmax;
//  - the partial last block divides by its clamped absmax and stores the clamped value.
FOURBIT_HD float full_block_multiplier(float absmax) { return 1.0f / clamp_absmax(absmax); }

// Block scale under double quantization: code[q] * nested_absmax + offset, two float32 roundings (no FMA), the
// arithmetic of bitsandbytes' dequantize_blockwise followed by `+= offset`.
FOURBIT_HD float nested_scale(float code_value, float nested_absmax, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(code_value, nested_absmax), offset);
#else
  // Host code is compiled with -ffp-contract=off, so this is a separate multiply and add.
  float product = code_value * nested_absmax;
  return product + offset;
#endif
}

// The scale of each block: plain float32 absmax, or decoded from double quantization (nested_blocksize is a power of
// two, given as its log2). Raw pointers into the op's tensors, usable from CPU and CUDA kernels alike.
struct BlockScales {
  const float* absmax;  // plain scales, or null when double-quantized
  const uint8_t* qabsmax;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  int nested_shift;
  FOURBIT_HD float operator()(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    return nested_scale(nested_code[qabsmax[block]], nested_absmax[block >> nested_shift], *offset);
  }
};

// The double-quantization offset is the mean of absmax summed in float64 over fixed chunks of this many values
// (each chunk in index order, then the chunk sums in order), so it is the same on any thread count and device.
constexpr int64_t kMeanChunk = 4096;

// ---- float <-> bfloat16 / float16 bit conversions (round to nearest even), the same on every path ----

FOURBIT_HD float bits_to_float(uint32_t bits) { return __builtin_bit_cast(float, bits); }
FOURBIT_HD uint32_t float_to_bits(float value) { return __builtin_bit_cast(uint32_t, value); }

FOURBIT_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

FOURBIT_HD uint16_t float_to_bf16(float value) {
  uint32_t bits = float_to_bits(value);
  if (value != value) return 0x7FC0;  // one canonical quiet NaN
  uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

FOURBIT_HD float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in float32.
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_to_float(float_to_bits(magnitude) | sign);
  }
  if (exponent == 31) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

FOURBIT_HD uint16_t float_to_fp16(float value) {
  uint32_t bits = float_to_bits(value);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) return sign | (magnitude > 0x7F800000u ? 0x7E00 : 0x7C00);  // NaN, inf
  if (magnitude >= 0x477FF000u) return sign | 0x7C00;  // >= 65520 rounds to inf
  if (magnitude < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5 makes the FPU round |x| to a multiple of 2^-24 (nearest
    // even), which is the subnormal half's mantissa; 1024 lands on the smallest normal, also the right encoding.
    float rounded = bits_to_float(magnitude) + 0.5f;
    return sign | static_cast<uint16_t>(float_to_bits(rounded) - 0x3F000000u);
  }
  // Normal: rebias the exponent (127 -> 15) and round away the 13 low mantissa bits to nearest even.
  uint32_t odd = (magnitude >> 13) & 1u;
  magnitude += 0xC8000FFFu + odd;
  return sign | static_cast<uint16_t>(magnitude >> 13);
}

}  // namespace fourbit
