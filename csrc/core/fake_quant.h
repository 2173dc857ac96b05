// SPDX-License-Identifier: Apache-2.0
// Affine fake quantization and its gradients (straight-through estimator, LSQ), per element, shared by the CPU and
// CUDA kernels; and the weight-only integer format of LinearInt.
//
// Forward, as PyTorch's fake_quantize_per_tensor_affine / _per_channel_affine compute it (aten's CPU and CUDA
// kernels), so the results are equal bit for bit:
//   inv_scale = 1 / scale                  (float32 division; float64 for float64 inputs)
//   q  = zero_point + nearbyint(x * inv_scale)   (round half to even; 16-bit inputs are widened to float32 first)
//   qc = min(max(q, quant_min), quant_max)       (a NaN q becomes quant_min, as fmax does in aten)
//   y  = (qc - zero_point) * scale               (an exact small integer times scale: one rounding)
//   in_range = quant_min <= q <= quant_max       (the straight-through mask)
// zero_point is an integer (the learnable ops round and clamp a float zero point first, see python/fourbit/_ops.py).
//
// Backward (LSQ, Esser et al. 2020; PyTorch's _fake_quantize_learnable_*_affine backward):
//   in range:      dx = dy, dscale = dy * (y - x) * inv_scale, dzero_point = 0
//   out of range:  dx = 0,  dscale = dy * (q < quant_min ? quant_min - zero_point : quant_max - zero_point),
//                  dzero_point = -dy * scale
// dscale and dzero_point are then multiplied by grad_factor and summed over the elements sharing a scale.
#pragma once

#include "core/macros.h"

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace fourbit {

// Round half to even under the default rounding mode, like std::nearbyint (aten's rounding).
FOURBIT_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return __builtin_nearbyintf(v);
#endif
}
FOURBIT_HD double round_half_even(double v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return __builtin_nearbyint(v);
#endif
}

// The quantization parameters of one group of elements, in the compute type T (float, or double for float64 inputs).
template <typename T> struct AffineParams {
  T scale;
  T inv_scale;
  T zero_point;  // an integer value
  T quant_min;
  T quant_max;
};

template <typename T> FOURBIT_HD AffineParams<T> make_affine_params(T scale, T zero_point, T quant_min, T quant_max) {
  return {scale, T(1) / scale, zero_point, quant_min, quant_max};
}

// The unclamped integer level of x (q above).
template <typename T> FOURBIT_HD T affine_level(T x, const AffineParams<T>& p) {
#if defined(__CUDA_ARCH__)
  // Separate roundings, no FMA contraction (host code is built with -ffp-contract=off).
  if constexpr (sizeof(T) == 4) {
    return __fadd_rn(p.zero_point, round_half_even(__fmul_rn(x, p.inv_scale)));
  } else {
    return __dadd_rn(p.zero_point, round_half_even(__dmul_rn(x, p.inv_scale)));
  }
#else
  return p.zero_point + round_half_even(x * p.inv_scale);
#endif
}

// The comparisons are written so that NaN goes to quant_min (aten: fmax(NaN, quant_min) = quant_min) and the loops
// stay vectorizable (plain compares and selects).
template <typename T> FOURBIT_HD T clamp_level(T q, const AffineParams<T>& p) {
  T c = !(q >= p.quant_min) ? p.quant_min : q;
  return c > p.quant_max ? p.quant_max : c;
}

template <typename T> FOURBIT_HD T affine_dequant(T level, const AffineParams<T>& p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    return __fmul_rn(__fsub_rn(level, p.zero_point), p.scale);
  } else {
    return __dmul_rn(__dsub_rn(level, p.zero_point), p.scale);
  }
#else
  return (level - p.zero_point) * p.scale;
#endif
}

template <typename T> FOURBIT_HD T fake_quant_affine(T x, const AffineParams<T>& p) {
  return affine_dequant(clamp_level(affine_level(x, p), p), p);
}

template <typename T> FOURBIT_HD bool level_in_range(T q, const AffineParams<T>& p) {
  return p.quant_min <= q && q <= p.quant_max;
}

// Per-element gradients of fake_quant_affine (see the top of this file), before grad_factor.
template <typename T> struct AffineGrads {
  T dx, dscale, dzero_point;
};

template <typename T> FOURBIT_HD AffineGrads<T> fake_quant_affine_grads(T x, T dy, const AffineParams<T>& p) {
  const T q = affine_level(x, p);
  if (level_in_range(q, p)) {
    const T y = affine_dequant(q, p);
    return {dy, dy * (y - x) * p.inv_scale, T(0)};
  }
  const T bound = q < p.quant_min ? p.quant_min : p.quant_max;
  return {T(0), dy * (bound - p.zero_point), -dy * p.scale};
}

// Which quantization parameters an element uses. Elements are in row-major order; parameter index =
// (i / inner) % channels:
//   per tensor:          inner = n, channels = 1
//   per channel (axis):  inner = prod(sizes[axis + 1:]), channels = sizes[axis]
//   per group (last dim, groups of g): inner = g, channels = n / g (each group of g consecutive elements)
struct AffineLayout {
  int64_t inner;
  int64_t channels;
  FOURBIT_HD int64_t param_index(int64_t i) const { return (i / inner) % channels; }
};

// ---- LinearInt's weight format: unsigned codes u in [0, 2^bits), w = (u - zero_point) * scale per group ----
// int4: two codes per byte, the even (first) element in the high nibble (bitsandbytes' order); int8: one per byte.
// The affine level q of the fake quantizer and u differ by quant_min (u = q - quant_min, and the stored zero point
// is zero_point - quant_min), so (u - zero_point_u) equals (q - zero_point) and the dequantized values are the same.
FOURBIT_HD float int_dequant(uint8_t code, uint8_t zero_point, float scale) {
  const float level = static_cast<float>(static_cast<int>(code) - static_cast<int>(zero_point));
#if defined(__CUDA_ARCH__)
  return __fmul_rn(level, scale);
#else
  return level * scale;
#endif
}

}  // namespace fourbit
