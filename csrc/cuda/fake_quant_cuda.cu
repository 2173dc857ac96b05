// SPDX-License-Identifier: Apache-2.0
// CUDA implementations of the QAT ops: affine fake quantization (forward, STE/LSQ backward), 4-bit fake quantization
// in one pass, and LinearInt's weight dequantization. Same per-element math as the CPU kernels (csrc/core/), so the
// same bits; tests compare them on a GPU machine (bench/gpu_check.sh).
//
// affine:   one thread per element (grid-stride), parameters gathered by AffineLayout::param_index. A scale that is
//           not positive and finite gives NaN outputs (checking it on the host would synchronise every call).
// 4-bit:    one thread per 8 consecutive elements; the blocksize/8 threads of a block reduce its absmax with warp
//           shuffles (and shared memory across warps), then each encodes, decodes and stores its 8 elements.
// int:      one thread per output element.
// All indexing is 64-bit.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "core/blockwise.h"
#include "core/codebook.h"
#include "core/dynamic_map.h"
#include "core/fake_quant.h"
#include "qat_checks.h"

namespace fourbit::cuda {
namespace {

constexpr DynamicMap kDynamicMap = make_dynamic_map();

// Element storage: float32 / float64 as themselves, float16 and bfloat16 as 16-bit patterns (core/ conversions).
enum class Elem : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

template <Elem E> struct ElemTraits;
template <> struct ElemTraits<Elem::kFloat32> {
  using storage = float;
  using compute = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <> struct ElemTraits<Elem::kFloat16> {
  using storage = uint16_t;
  using compute = float;
  __device__ static float load(uint16_t v) { return fp16_to_float(v); }
  __device__ static uint16_t store(float v) { return float_to_fp16(v); }
};
template <> struct ElemTraits<Elem::kBFloat16> {
  using storage = uint16_t;
  using compute = float;
  __device__ static float load(uint16_t v) { return bf16_to_float(v); }
  __device__ static uint16_t store(float v) { return float_to_bf16(v); }
};
template <> struct ElemTraits<Elem::kFloat64> {
  using storage = double;
  using compute = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};

template <typename F> void dispatch_elem(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(std::integral_constant<Elem, Elem::kFloat32>{}); break;
    case at::kHalf: f(std::integral_constant<Elem, Elem::kFloat16>{}); break;
    case at::kBFloat16: f(std::integral_constant<Elem, Elem::kBFloat16>{}); break;
    default: f(std::integral_constant<Elem, Elem::kFloat64>{}); break;  // the checks admit only these four
  }
}

int64_t grid_for(int64_t n, int threads) { return std::min<int64_t>(ceil_div(n, threads), int64_t{1} << 20); }

template <typename T> __device__ __forceinline__ bool valid_scale(T s) { return s > T(0) && s < T(INFINITY); }

// ---------------------------------------------------------------------------------------------------- affine
template <Elem E>
__global__ void fake_quant_affine_kernel(const typename ElemTraits<E>::storage* __restrict__ x, int64_t n,
                                         AffineLayout layout, const typename ElemTraits<E>::compute* __restrict__ scale,
                                         const typename ElemTraits<E>::compute* __restrict__ zero_point,
                                         typename ElemTraits<E>::compute quant_min,
                                         typename ElemTraits<E>::compute quant_max,
                                         typename ElemTraits<E>::storage* __restrict__ y) {
  using C = typename ElemTraits<E>::compute;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = layout.param_index(i);
    const C s = scale[c];
    const AffineParams<C> p = make_affine_params<C>(s, zero_point[c], quant_min, quant_max);
    const C v = fake_quant_affine(ElemTraits<E>::load(x[i]), p);
    y[i] = ElemTraits<E>::store(valid_scale(s) ? v : C(NAN));
  }
}

template <Elem E>
__global__ void fake_quant_affine_grad_kernel(const typename ElemTraits<E>::storage* __restrict__ x,
                                              const typename ElemTraits<E>::storage* __restrict__ dy, int64_t n,
                                              AffineLayout layout,
                                              const typename ElemTraits<E>::compute* __restrict__ scale,
                                              const typename ElemTraits<E>::compute* __restrict__ zero_point,
                                              typename ElemTraits<E>::compute quant_min,
                                              typename ElemTraits<E>::compute quant_max,
                                              typename ElemTraits<E>::storage* __restrict__ dx,
                                              typename ElemTraits<E>::compute* __restrict__ dscale,
                                              typename ElemTraits<E>::compute* __restrict__ dzero_point) {
  using C = typename ElemTraits<E>::compute;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = layout.param_index(i);
    const AffineParams<C> p = make_affine_params<C>(scale[c], zero_point[c], quant_min, quant_max);
    const AffineGrads<C> g = fake_quant_affine_grads(ElemTraits<E>::load(x[i]), ElemTraits<E>::load(dy[i]), p);
    dx[i] = ElemTraits<E>::store(g.dx);
    if (dscale != nullptr) {
      dscale[i] = g.dscale;
      dzero_point[i] = g.dzero_point;
    }
  }
}

struct Params {
  at::Tensor scale, zero_point;
};

// Parameters in the compute type, zero point rounded half to even and clamped (see fake_quant_cpu.cpp), on device.
Params prepare_params(const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                      at::ScalarType compute) {
  return {scale.to(compute).contiguous().reshape(-1),
          zero_point.to(compute).round().clamp(static_cast<double>(quant_min), static_cast<double>(quant_max))
              .contiguous().reshape(-1)};
}

at::Tensor fake_quantize_affine_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                     int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                     std::optional<int64_t> group_size, double grad_factor) {
  const AffineLayout layout = check_fake_quantize_args(x, scale, zero_point, quant_min, quant_max, axis, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t n = input.numel();
  if (n == 0) return out;
  const at::ScalarType compute = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Params p = prepare_params(scale, zero_point, quant_min, quant_max, compute);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elem(input.scalar_type(), [&](auto e) {
    constexpr Elem E = decltype(e)::value;
    using T = typename ElemTraits<E>::storage;
    using C = typename ElemTraits<E>::compute;
    fake_quant_affine_kernel<E><<<grid_for(n, 256), 256, 0, stream>>>(
        static_cast<const T*>(input.const_data_ptr()), n, layout, p.scale.const_data_ptr<C>(),
        p.zero_point.const_data_ptr<C>(), static_cast<C>(quant_min), static_cast<C>(quant_max),
        static_cast<T*>(out.mutable_data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sum_per_param(const at::Tensor& per_element, const AffineLayout& layout, const at::Tensor& like,
                         double grad_factor) {
  const int64_t outer = per_element.numel() / (layout.inner * layout.channels);
  at::Tensor sum = per_element.view({outer, layout.channels, layout.inner}).sum(at::IntArrayRef{0, 2});
  return sum.mul_(grad_factor).reshape(like.sizes()).to(like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_affine_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, std::optional<int64_t> group_size,
    double grad_factor, bool param_grads) {
  const AffineLayout layout = check_fake_quantize_args(x, scale, zero_point, quant_min, quant_max, axis, group_size);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  const at::Tensor dy = grad.to(x.scalar_type()).contiguous();
  const int64_t n = input.numel();
  const at::ScalarType compute = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx = at::empty_like(input);
  at::Tensor dscale = at::empty({param_grads ? n : 0}, input.options().dtype(compute));
  at::Tensor dzero_point = at::empty({param_grads ? n : 0}, input.options().dtype(compute));
  if (n > 0) {
    const Params p = prepare_params(scale, zero_point, quant_min, quant_max, compute);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_elem(input.scalar_type(), [&](auto e) {
      constexpr Elem E = decltype(e)::value;
      using T = typename ElemTraits<E>::storage;
      using C = typename ElemTraits<E>::compute;
      fake_quant_affine_grad_kernel<E><<<grid_for(n, 256), 256, 0, stream>>>(
          static_cast<const T*>(input.const_data_ptr()), static_cast<const T*>(dy.const_data_ptr()), n, layout,
          p.scale.const_data_ptr<C>(), p.zero_point.const_data_ptr<C>(), static_cast<C>(quant_min),
          static_cast<C>(quant_max), static_cast<T*>(dx.mutable_data_ptr()),
          param_grads ? dscale.mutable_data_ptr<C>() : nullptr,
          param_grads ? dzero_point.mutable_data_ptr<C>() : nullptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!param_grads) return {dx, at::empty({0}, scale.options()), at::empty({0}, zero_point.options())};
  if (n == 0) return {dx, at::zeros_like(scale), at::zeros_like(zero_point)};
  return {dx, sum_per_param(dscale, layout, scale, grad_factor),
          sum_per_param(dzero_point, layout, zero_point, grad_factor)};
}

// ---------------------------------------------------------------------------------------------------- 4-bit
constexpr int kVec = 8;  // elements per thread

__device__ __forceinline__ float max_propagate_nan(float acc, float v) { return (v > acc || v != v) ? v : acc; }

// kGiven: the absmax of every block comes from quantize_4bit and the decoding scale from `scales` (double
// quantization); otherwise the block's absmax is reduced here and is also its scale.
template <Elem E, bool kGiven>
__global__ void fake_quant_4bit_kernel(const typename ElemTraits<E>::storage* __restrict__ in, int64_t n,
                                       int blocksize, Codebook4 cb, const float* __restrict__ given_absmax,
                                       BlockScales scales, typename ElemTraits<E>::storage* __restrict__ out) {
  __shared__ float warp_max[32];
  const int group = blocksize / kVec;  // threads per quantization block (a power of two, >= 4)
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t start = t * kVec;
  float v[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = start + i < n ? ElemTraits<E>::load(in[start + i]) : 0.0f;
  float local = 0.0f;
  if constexpr (!kGiven) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) local = max_propagate_nan(local, fabsf(v[i]));
    const int width = group < 32 ? group : 32;
    for (int offset = width / 2; offset > 0; offset /= 2) {
      local = max_propagate_nan(local, __shfl_xor_sync(0xFFFFFFFFu, local, offset, width));
    }
    if (group > 32 && threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = local;
    __syncthreads();
    if (group > 32) {
      const int warps = group / 32;
      const int first = (threadIdx.x / group) * warps;
      local = warp_max[first];
      for (int w = 1; w < warps; ++w) local = max_propagate_nan(local, warp_max[first + w]);
    }
  }
  if (start >= n) return;
  const int64_t block = start / blocksize;
  const bool partial = (block + 1) * blocksize > n;
  float absmax, scale;
  if constexpr (kGiven) {
    absmax = given_absmax[block];  // already clamped for the partial block, as quantize_4bit stores it
    scale = scales(block);
  } else {
    absmax = partial ? clamp_absmax(local) : local;
    scale = absmax;
  }
  const float multiplier = full_block_multiplier(absmax);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    if (start + i >= n) break;
    const float s = partial ? __fdiv_rn(v[i], absmax) : __fmul_rn(v[i], multiplier);
    const uint8_t code = cb.code_of_bin[bin_4bit(s, cb.midpoint)];
    out[start + i] = ElemTraits<E>::store(__fmul_rn(cb.value[code], scale));
  }
}

// The double-quantization map in device memory (BlockScales reads it there), uploaded once per device.
const at::Tensor& dynamic_map_on(const c10::Device& device) {
  static std::mutex mutex;
  static std::vector<at::Tensor> maps(64);
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& map = maps.at(device.index());
  if (!map.defined()) {
    map = at::tensor(at::ArrayRef<float>(kDynamicMap.value, 256), at::TensorOptions().dtype(at::kFloat)).to(device);
  }
  return map;
}

at::Tensor fake_quantize_4bit_cuda(const at::Tensor& x, int64_t blocksize, std::string_view quant_type,
                                   bool compress_statistics, int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(quant_type);
  check_quantize_4bit_args(x, blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t n = input.numel();
  if (n == 0) return out;
  at::Tensor absmax, qabsmax, nested_absmax, offset;
  BlockScales scales{};
  if (compress_statistics) {
    // The offset of double quantization is the mean of every absmax: two more passes (absmax, then its 8 bits).
    check_blocksize(nested_blocksize, "nested_blocksize");
    static const auto quantize = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("fourbit::quantize_4bit", "")
                                     .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                              std::string_view)>();
    static const auto double_quantize =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fourbit::double_quantize", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
    absmax = std::get<1>(quantize.call(input, blocksize, quant_type));
    std::tie(qabsmax, nested_absmax, offset) = double_quantize.call(absmax, nested_blocksize);
    int shift = 0;
    while ((int64_t{1} << shift) < nested_blocksize) ++shift;
    const at::Tensor& code = dynamic_map_on(input.device());
    scales = {nullptr, qabsmax.const_data_ptr<uint8_t>(), nested_absmax.const_data_ptr<float>(),
              code.const_data_ptr<float>(), offset.const_data_ptr<float>(), shift};
  }
  const int group = static_cast<int>(blocksize) / kVec;
  const int threads = group > 256 ? group : 256;
  const int64_t grid = ceil_div(ceil_div(n, kVec), threads);
  const Codebook4 cb = make_codebook4(qt);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elem(input.scalar_type(), [&](auto e) {
    constexpr Elem E = decltype(e)::value;
    if constexpr (E != Elem::kFloat64) {
      using T = typename ElemTraits<E>::storage;
      const T* in = static_cast<const T*>(input.const_data_ptr());
      T* o = static_cast<T*>(out.mutable_data_ptr());
      if (compress_statistics) {
        fake_quant_4bit_kernel<E, true><<<grid, threads, 0, stream>>>(in, n, static_cast<int>(blocksize), cb,
                                                                       absmax.const_data_ptr<float>(), scales, o);
      } else {
        fake_quant_4bit_kernel<E, false><<<grid, threads, 0, stream>>>(in, n, static_cast<int>(blocksize), cb,
                                                                        nullptr, scales, o);
      }
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(x.sizes());
}

// ---------------------------------------------------------------------------------------------------- LinearInt
template <Elem E>
__global__ void dequantize_int_kernel(const uint8_t* __restrict__ qweight, const float* __restrict__ scale,
                                      const uint8_t* __restrict__ zero_point, int64_t n, int64_t K,
                                      int64_t group_size, int bits, typename ElemTraits<E>::storage* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / K, k = i % K;
    uint8_t code;
    if (bits == 4) {
      const uint8_t byte = qweight[row * (K / 2) + k / 2];
      code = (k % 2 == 0) ? first_nibble(byte) : second_nibble(byte);
    } else {
      code = qweight[i];
    }
    const int64_t g = row * (K / group_size) + k / group_size;
    out[i] = ElemTraits<E>::store(int_dequant(code, zero_point[g], scale[g]));
  }
}

void dequantize_int_into_cuda(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero_point,
                              int64_t bits, int64_t group_size, at::IntArrayRef shape, const at::Tensor& out) {
  check_int_weight_args(qweight, scale, zero_point, bits, group_size, shape);
  check_dequantize_out(out, qweight, shape[0] * shape[1]);
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(qweight.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elem(out.scalar_type(), [&](auto e) {
    constexpr Elem E = decltype(e)::value;
    if constexpr (E != Elem::kFloat64) {
      using T = typename ElemTraits<E>::storage;
      dequantize_int_kernel<E><<<grid_for(n, 256), 256, 0, stream>>>(
          qweight.const_data_ptr<uint8_t>(), scale.const_data_ptr<float>(), zero_point.const_data_ptr<uint8_t>(), n,
          shape[1], group_size, static_cast<int>(bits), static_cast<T*>(out.mutable_data_ptr()));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CUDA, m) {
  m.impl("fake_quantize_affine", &fake_quantize_affine_cuda);
  m.impl("fake_quantize_affine_backward", &fake_quantize_affine_backward_cuda);
  m.impl("fake_quantize_4bit", &fake_quantize_4bit_cuda);
  m.impl("dequantize_int_into", &dequantize_int_into_cuda);
}

}  // namespace fourbit::cuda
