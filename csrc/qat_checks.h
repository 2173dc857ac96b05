// SPDX-License-Identifier: Apache-2.0
// Argument checks of the QAT ops (fake quantization, LinearInt weights), shared by the CPU and CUDA implementations.
// Metadata only (no device synchronisation); each message names the argument and the value it got.
// python/fourbit/_ops.py mirrors these rules in the fake implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "core/fake_quant.h"
#include "quant_checks.h"

namespace fourbit {

// Levels must be exact in float32 (|q| <= 2^24).
constexpr int64_t kMaxAbsLevel = int64_t{1} << 24;

inline void check_quant_range(int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK_VALUE(quant_min < quant_max, "quant_min must be less than quant_max, got quant_min=", quant_min,
                    " and quant_max=", quant_max);
  TORCH_CHECK_VALUE(quant_min >= -kMaxAbsLevel && quant_max <= kMaxAbsLevel, "quant_min and quant_max must lie in [-2^24, 2^24], got ",
                    quant_min, " and ", quant_max);
}

// The parameter layout of fake_quantize(x, scale, zero_point, ..., axis, group_size) (see AffineLayout), after
// checking that scale and zero_point hold one value per tensor / channel / group.
inline AffineLayout check_fake_quantize_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                             int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                             std::optional<int64_t> group_size) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   "x must be float32, float16, bfloat16 or float64, got ", t);
  check_quant_range(quant_min, quant_max);
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "scale must be a float tensor, got ", scale.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(zero_point.scalar_type()) || at::isIntegralType(zero_point.scalar_type(), false),
                   "zero_point must be an integer or float tensor, got ", zero_point.scalar_type());
  check_same_device(scale, "scale", x, "x");
  check_same_device(zero_point, "zero_point", x, "x");
  TORCH_CHECK_VALUE(!(axis.has_value() && group_size.has_value()),
                    "give axis (per channel) or group_size (per group), not both; got axis=", *axis,
                    " and group_size=", *group_size);
  const int64_t n = x.numel();
  AffineLayout layout{std::max<int64_t>(n, 1), 1};
  const char* what = "1 value (per tensor)";
  if (axis.has_value()) {
    const int64_t dim = x.dim();
    TORCH_CHECK_VALUE(dim > 0 && *axis >= -dim && *axis < dim, "axis must be in [", -dim, ", ", dim,
                      ") for x of shape ", x.sizes(), ", got ", *axis);
    const int64_t a = *axis < 0 ? *axis + dim : *axis;
    int64_t inner = 1;
    for (int64_t d = a + 1; d < dim; ++d) inner *= x.size(d);
    layout = {std::max<int64_t>(inner, 1), std::max<int64_t>(x.size(a), 1)};
    what = "one value per channel (x.shape[axis])";
    TORCH_CHECK_VALUE(scale.numel() == x.size(a), "scale must hold ", what, " = ", x.size(a), ", got shape ",
                      scale.sizes());
  } else if (group_size.has_value()) {
    TORCH_CHECK_VALUE(x.dim() > 0, "group_size needs x with at least one dimension, got a scalar");
    const int64_t k = x.size(-1);
    TORCH_CHECK_VALUE(*group_size > 0 && k % *group_size == 0, "group_size must be positive and divide x.shape[-1] = ",
                      k, ", got ", *group_size);
    layout = {*group_size, std::max<int64_t>(n / *group_size, 1)};
    what = "one value per group (x.numel() / group_size)";
    TORCH_CHECK_VALUE(scale.numel() == n / *group_size, "scale must hold ", what, " = ", n / *group_size,
                      ", got shape ", scale.sizes());
  } else {
    TORCH_CHECK_VALUE(scale.numel() == 1, "scale must hold ", what, ", got shape ", scale.sizes());
  }
  TORCH_CHECK_VALUE(zero_point.numel() == scale.numel(), "zero_point must have scale's ", scale.numel(),
                    " values, got shape ", zero_point.sizes());
  return layout;
}

// LinearInt's packed weight [N, K]: qweight uint8 [N, K * bits / 8], scale float32 and zero_point uint8
// [N, K / group_size], all contiguous on one device.
inline void check_int_weight_args(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero_point,
                                  int64_t bits, int64_t group_size, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK_VALUE(shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0,
                    "shape must be the weight's [out_features, in_features], got ", shape);
  const int64_t N = shape[0], K = shape[1];
  TORCH_CHECK_VALUE(group_size > 0 && K % group_size == 0 && (bits == 8 || group_size % 2 == 0),
                    "group_size must be positive", bits == 4 ? ", even" : "", " and divide in_features = ", K,
                    ", got ", group_size);
  const int64_t row_bytes = bits == 4 ? K / 2 : K;
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, "qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(0) == N && qweight.size(1) == row_bytes && qweight.is_contiguous(),
                    "qweight must be contiguous with shape [", N, ", ", row_bytes, "] (", bits, "-bit codes of ", shape,
                    "), got shape ", qweight.sizes());
  const int64_t groups = K / group_size;
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == groups && scale.is_contiguous(),
                    "scale must be contiguous with shape [", N, ", ", groups, "], got shape ", scale.sizes());
  TORCH_CHECK_TYPE(zero_point.scalar_type() == at::kByte, "zero_point must be uint8, got ", zero_point.scalar_type());
  TORCH_CHECK_VALUE(zero_point.sizes() == scale.sizes() && zero_point.is_contiguous(),
                    "zero_point must be contiguous with shape [", N, ", ", groups, "], got shape ",
                    zero_point.sizes());
  check_same_device(scale, "scale", qweight, "qweight");
  check_same_device(zero_point, "zero_point", qweight, "qweight");
}

}  // namespace fourbit
