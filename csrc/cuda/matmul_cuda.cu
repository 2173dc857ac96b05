// SPDX-License-Identifier: Apache-2.0
// CUDA GEMV for small batches: y[m, n] = sum_k x[m, k] * W[n, k] with W in 4 bits, read once from global memory.
//
// One warp per output column n (a row of W): lane l takes the 16-byte chunks l, l + 32, ... of the row's packed bytes
// (32 codes each, so a warp's loads cover 512 contiguous bytes), looks up each chunk's block scale (blocksize is a
// power of two >= 32, so a chunk never straddles a block), decodes the codes through a 16-entry table in shared
// memory, and multiplies them with every row of x (which stays in L1/L2). The warp then sums its lanes with shuffles.
// Each chunk's dot product with the code values is scaled once (not each weight: 32 fewer multiplies per chunk), so
// the result differs from x @ dequantize_4bit(W).T by float32 rounding only; everything accumulates in float32.
#include "cuda/matmul_cuda.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "quant_checks.h"

namespace fourbit::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 8 consecutive elements of x as float32, with 16-byte loads (x is 16-byte aligned and K % 32 == 0).
__device__ __forceinline__ void load8_f32(const float* p, float* out) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
// 16-bit inputs arrive as their bit patterns; kBF16 picks the conversion (core/blockwise.h).
template <bool kBF16> __device__ __forceinline__ void load8_16(const uint16_t* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint16_t lo = static_cast<uint16_t>(words[i] & 0xFFFFu), hi = static_cast<uint16_t>(words[i] >> 16);
    out[2 * i] = kBF16 ? bf16_to_float(lo) : fp16_to_float(lo);
    out[2 * i + 1] = kBF16 ? bf16_to_float(hi) : fp16_to_float(hi);
  }
}

// T: float (float32 x) or uint16_t (float16 / bfloat16 bit patterns, kBF16 says which). MT: rows of x per block.
template <typename T, bool kBF16, int MT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemv_4bit_kernel(const T* __restrict__ x, int64_t M, int64_t N, int64_t K, const uint8_t* __restrict__ packed,
                     BlockScales scales, int block_shift, Codebook4 cb, T* __restrict__ y) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = cb.value[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const uint4* row = reinterpret_cast<const uint4*>(packed + n * (K / 2));
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
  const int64_t chunks = K / 32;
#pragma unroll 2
  for (int64_t c = lane; c < chunks; c += 32) {
    const uint4 q = __ldg(row + c);  // 32 codes; element 2i in the high nibble of byte i
    const float scale = scales((n * K + c * 32) >> block_shift);
    float w[32];  // code values; the chunk's scale multiplies its partial sums
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint8_t byte = static_cast<uint8_t>(words[i] >> (8 * b));  // little endian: byte 4i + b
        w[8 * i + 2 * b] = lut[first_nibble(byte)];
        w[8 * i + 2 * b + 1] = lut[second_nibble(byte)];
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m0 + m >= M) break;
      const T* xs = x + (m0 + m) * K + c * 32;
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float xv[8];
        if constexpr (sizeof(T) == 4) {
          load8_f32(reinterpret_cast<const float*>(xs) + 8 * j, xv);
        } else {
          load8_16<kBF16>(reinterpret_cast<const uint16_t*>(xs) + 8 * j, xv);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) part = fmaf(w[8 * j + e], xv[e], part);
      }
      acc[m] = fmaf(scale, part, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    if (lane == 0 && m0 + m < M) {
      if constexpr (sizeof(T) == 4) {
        y[(m0 + m) * N + n] = v;
      } else {
        y[(m0 + m) * N + n] = kBF16 ? float_to_bf16(v) : float_to_fp16(v);
      }
    }
  }
}

}  // namespace

bool gemv_4bit_applies(const at::Tensor& x, const at::Tensor& packed) {
  const at::ScalarType t = x.scalar_type();
  return x.is_cuda() && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kGemvMaxBatch && x.size(1) > 0 &&
         x.size(1) % 32 == 0 && (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) && x.is_contiguous() &&
         aligned16(x.const_data_ptr()) && aligned16(packed.const_data_ptr());
}

void gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const BlockScales& scales, int64_t blocksize,
               QuantType quant_type, const at::Tensor& y) {
  TORCH_CHECK(gemv_4bit_applies(x, packed), "gemv_4bit: unsupported input (the caller checks gemv_4bit_applies)");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.scalar_type() == x.scalar_type() && y.is_contiguous() &&
                  y.device() == x.device(),
              "gemv_4bit: y must be a contiguous [", M, ", N] tensor of x's dtype on x's device");
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int block_shift = 0;
  while ((int64_t{1} << block_shift) < blocksize) ++block_shift;
  const Codebook4 cb = make_codebook4(quant_type);
  const uint8_t* w = static_cast<const uint8_t*>(packed.const_data_ptr());
  const int64_t blocks_n = ceil_div(N, kWarpsPerBlock);
  TORCH_CHECK(blocks_n <= 0x7FFFFFFF, "gemv_4bit: out_features ", N, " is too large for one grid");
  // Rows of x per block: the smallest template that holds the batch, so M = 1 keeps one accumulator.
  auto launch = [&](auto* x_ptr, auto* y_ptr, auto bf16_tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(x_ptr)>>;
    constexpr bool kBF16 = decltype(bf16_tag)::value;
    auto run = [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      const dim3 grid(static_cast<unsigned>(blocks_n), static_cast<unsigned>(ceil_div(M, MT)));
      gemv_4bit_kernel<T, kBF16, MT><<<grid, kWarpsPerBlock * 32, 0, stream>>>(x_ptr, M, N, K, w, scales,
                                                                                block_shift, cb, y_ptr);
    };
    if (M == 1) {
      run(std::integral_constant<int, 1>{});
    } else if (M == 2) {
      run(std::integral_constant<int, 2>{});
    } else if (M <= 4) {
      run(std::integral_constant<int, 4>{});
    } else {
      run(std::integral_constant<int, 8>{});
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      launch(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), std::false_type{});
      break;
    case at::kBFloat16:
      launch(static_cast<const uint16_t*>(x.const_data_ptr()), static_cast<uint16_t*>(y.mutable_data_ptr()),
             std::true_type{});
      break;
    default:  // float16
      launch(static_cast<const uint16_t*>(x.const_data_ptr()), static_cast<uint16_t*>(y.mutable_data_ptr()),
             std::false_type{});
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fourbit::cuda
