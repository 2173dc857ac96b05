// SPDX-License-Identifier: Apache-2.0
// CUDA implementations of the quantization ops. They use the same per-element math as the CPU kernels (csrc/core/)
// and write the same bytes; tests compare them byte for byte on a GPU machine (bench/gpu_check.sh).
//
// Memory layout (bitsandbytes): the flattened input is cut into blocks of `blocksize`; packed byte i holds element
// 2i in its high nibble and 2i+1 in its low nibble; absmax holds one float32 per block.
//
// quantize:   one thread per 8 consecutive elements (16-byte loads for 16-bit inputs, two for float32), writing 4
//             packed bytes; the bs/8 threads of a block reduce its absmax with warp shuffles (and shared memory when
//             a block spans several warps).
// dequantize: one thread per 16 packed bytes (a 16-byte load) = 32 elements, which always share one absmax because
//             block sizes are multiples of 32; 16-byte stores.
// All indexing is 64-bit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "core/blockwise.h"
#include "core/codebook.h"
#include "core/dynamic_map.h"
#include "quant_checks.h"

namespace fourbit::cuda {
namespace {

constexpr Codebook4 kNF4 = make_codebook4(QuantType::kNF4);
constexpr Codebook4 kFP4 = make_codebook4(QuantType::kFP4);
constexpr DynamicMap kDynamicMap = make_dynamic_map();

const Codebook4& codebook(QuantType qt) { return qt == QuantType::kNF4 ? kNF4 : kFP4; }

// Element storage: float32 as float, float16 and bfloat16 as their 16-bit patterns, converted by core/ functions.
enum class Elem : int { kFloat32, kFloat16, kBFloat16 };

template <Elem E> struct ElemTraits;
template <> struct ElemTraits<Elem::kFloat32> {
  using storage = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <> struct ElemTraits<Elem::kFloat16> {
  using storage = uint16_t;
  __device__ static float load(uint16_t v) { return fp16_to_float(v); }
  __device__ static uint16_t store(float v) { return float_to_fp16(v); }
};
template <> struct ElemTraits<Elem::kBFloat16> {
  using storage = uint16_t;
  __device__ static float load(uint16_t v) { return bf16_to_float(v); }
  __device__ static uint16_t store(float v) { return float_to_bf16(v); }
};

Elem elem_of(at::ScalarType t) {
  return t == at::kFloat ? Elem::kFloat32 : t == at::kHalf ? Elem::kFloat16 : Elem::kBFloat16;
}

template <typename F> void dispatch_elem(at::ScalarType t, F&& f) {
  switch (elem_of(t)) {
    case Elem::kFloat32: f(std::integral_constant<Elem, Elem::kFloat32>{}); break;
    case Elem::kFloat16: f(std::integral_constant<Elem, Elem::kFloat16>{}); break;
    case Elem::kBFloat16: f(std::integral_constant<Elem, Elem::kBFloat16>{}); break;
  }
}

__device__ __forceinline__ float max_propagate_nan(float acc, float v) { return (v > acc || v != v) ? v : acc; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------------- quantize
constexpr int kQuantVec = 8;  // elements per thread

template <Elem E, bool kAligned>
__global__ void quantize_4bit_kernel(const typename ElemTraits<E>::storage* __restrict__ in, int64_t n,
                                     int blocksize, Codebook4 cb, uint8_t* __restrict__ packed,
                                     float* __restrict__ absmax) {
  using T = typename ElemTraits<E>::storage;
  __shared__ uint8_t code_of_bin[16];
  __shared__ float warp_max[32];
  if (threadIdx.x < 16) code_of_bin[threadIdx.x] = cb.code_of_bin[threadIdx.x];

  const int group = blocksize / kQuantVec;  // threads per quantization block (a power of two, >= 4)
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t start = t * kQuantVec;
  float v[kQuantVec];
  if (kAligned && start + kQuantVec <= n) {
    if constexpr (E == Elem::kFloat32) {
      const float4 a = reinterpret_cast<const float4*>(in + start)[0];
      const float4 b = reinterpret_cast<const float4*>(in + start)[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(in + start);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = ElemTraits<E>::load(static_cast<uint16_t>(words[i] & 0xFFFFu));
        v[2 * i + 1] = ElemTraits<E>::load(static_cast<uint16_t>(words[i] >> 16));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kQuantVec; ++i) v[i] = start + i < n ? ElemTraits<E>::load(in[start + i]) : 0.0f;
  }

  float local = 0.0f;
#pragma unroll
  for (int i = 0; i < kQuantVec; ++i) local = max_propagate_nan(local, fabsf(v[i]));
  // Reduce over the group: inside a warp first, then across the warps of a group through shared memory.
  const int width = group < 32 ? group : 32;
  for (int offset = width / 2; offset > 0; offset /= 2) {
    local = max_propagate_nan(local, __shfl_xor_sync(0xFFFFFFFFu, local, offset, width));
  }
  if (group > 32) {
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = local;
  }
  __syncthreads();  // also publishes code_of_bin
  if (group > 32) {
    const int warps = group / 32;
    const int first = (threadIdx.x / group) * warps;
    local = warp_max[first];
    for (int w = 1; w < warps; ++w) local = max_propagate_nan(local, warp_max[first + w]);
  }
  if (start >= n) return;

  const int64_t block = start / blocksize;
  const bool partial = (block + 1) * blocksize > n;
  const float stored = partial ? clamp_absmax(local) : local;
  if (start % blocksize == 0) absmax[block] = stored;
  const float multiplier = full_block_multiplier(local);
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < kQuantVec; i += 2) {
    // Padding elements (past n) are zeros: the code of 0 fills an odd last byte, as bitsandbytes does.
    const float s0 = partial ? __fdiv_rn(v[i], stored) : __fmul_rn(v[i], multiplier);
    const float s1 = partial ? __fdiv_rn(v[i + 1], stored) : __fmul_rn(v[i + 1], multiplier);
    const uint8_t byte = pack_nibbles(code_of_bin[bin_4bit(s0, cb.midpoint)], code_of_bin[bin_4bit(s1, cb.midpoint)]);
    word |= static_cast<uint32_t>(byte) << (4 * i);
  }
  uint8_t* out = packed + start / 2;
  if (kAligned && start + kQuantVec <= n) {
    *reinterpret_cast<uint32_t*>(out) = word;
  } else {
    for (int i = 0; i < kQuantVec && start + i < n; i += 2) out[i / 2] = static_cast<uint8_t>(word >> (4 * i));
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      std::string_view quant_type) {
  const QuantType qt = parse_quant_type(quant_type);
  check_quantize_4bit_args(A, blocksize);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor input = A.contiguous();
  const int64_t n = input.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const int group = static_cast<int>(blocksize) / kQuantVec;
  const int threads = group > 256 ? group : 256;
  const int64_t grid = ceil_div(ceil_div(n, kQuantVec), threads);
  const bool aligned = aligned16(input.const_data_ptr()) && aligned16(packed.const_data_ptr());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elem(input.scalar_type(), [&](auto e) {
    constexpr Elem E = decltype(e)::value;
    using T = typename ElemTraits<E>::storage;
    const T* in = static_cast<const T*>(input.const_data_ptr());
    auto launch = [&](auto kernel) {
      kernel<<<grid, threads, 0, stream>>>(in, n, static_cast<int>(blocksize), codebook(qt),
                                           packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>());
    };
    aligned ? launch(quantize_4bit_kernel<E, true>) : launch(quantize_4bit_kernel<E, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, absmax};
}

// ---------------------------------------------------------------------------------------------------- dequantize
constexpr int kDequantBytes = 16;  // packed bytes per thread = 32 elements

template <Elem E, bool kAligned>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed, BlockScales scales, int64_t n, int blocksize,
                                       Codebook4 cb, typename ElemTraits<E>::storage* __restrict__ out) {
  using T = typename ElemTraits<E>::storage;
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = cb.value[threadIdx.x];
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t start = t * 2 * kDequantBytes;
  if (start >= n) return;
  const float scale = scales(start / blocksize);
  if (kAligned && start + 2 * kDequantBytes <= n) {
    const uint4 raw = *reinterpret_cast<const uint4*>(packed + start / 2);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    float v[2 * kDequantBytes];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint8_t byte = static_cast<uint8_t>(words[w] >> (8 * b));
        v[8 * w + 2 * b] = __fmul_rn(lut[first_nibble(byte)], scale);
        v[8 * w + 2 * b + 1] = __fmul_rn(lut[second_nibble(byte)], scale);
      }
    }
    if constexpr (E == Elem::kFloat32) {
      float4* dst = reinterpret_cast<float4*>(out + start);
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    } else {
      uint4* dst = reinterpret_cast<uint4*>(out + start);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w[j] = static_cast<uint32_t>(ElemTraits<E>::store(v[8 * i + 2 * j])) |
                 (static_cast<uint32_t>(ElemTraits<E>::store(v[8 * i + 2 * j + 1])) << 16);
        }
        dst[i] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    return;
  }
  for (int64_t i = start; i < n && i < start + 2 * kDequantBytes; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t code = (i % 2 == 0) ? first_nibble(byte) : second_nibble(byte);
    out[i] = ElemTraits<E>::store(__fmul_rn(lut[code], scale));
  }
}

void dequantize_4bit_into_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               std::string_view quant_type, at::IntArrayRef shape, const at::Tensor& out,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(quant_type);
  const Dequantize4bitPlan plan = check_dequantize_4bit_args(packed, absmax, blocksize, shape, out.scalar_type(),
                                                             nested_absmax, nested_code, offset, nested_blocksize);
  check_dequantize_out(out, packed, plan.n);
  if (plan.n == 0) return;
  const c10::cuda::CUDAGuard guard(packed.device());
  const BlockScales scales = block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  const int threads = 256;
  const int64_t grid = ceil_div(ceil_div(plan.n, 2 * kDequantBytes), threads);
  const uint8_t* in = static_cast<const uint8_t*>(packed.const_data_ptr());
  const bool aligned = aligned16(in) && aligned16(out.const_data_ptr());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elem(out.scalar_type(), [&](auto e) {
    constexpr Elem E = decltype(e)::value;
    using T = typename ElemTraits<E>::storage;
    T* dst = static_cast<T*>(out.mutable_data_ptr());
    auto launch = [&](auto kernel) {
      kernel<<<grid, threads, 0, stream>>>(in, scales, plan.n, static_cast<int>(blocksize), codebook(qt), dst);
    };
    aligned ? launch(dequantize_4bit_kernel<E, true>) : launch(dequantize_4bit_kernel<E, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------- double quant
// The offset: float64 sums of fixed chunks, each by one thread in index order, then the chunk sums in order by one
// thread -- the same additions in the same order as the CPU, so the same float32 offset.
__global__ void chunk_sums_kernel(const float* __restrict__ values, int64_t n, double* __restrict__ partial) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c * kMeanChunk >= n) return;
  double sum = 0.0;
  const int64_t end = (c + 1) * kMeanChunk < n ? (c + 1) * kMeanChunk : n;
  for (int64_t i = c * kMeanChunk; i < end; ++i) sum = __dadd_rn(sum, static_cast<double>(values[i]));
  partial[c] = sum;
}

__global__ void mean_kernel(const double* __restrict__ partial, int64_t chunks, int64_t n, float* __restrict__ mean) {
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total = __dadd_rn(total, partial[c]);
  *mean = static_cast<float>(__ddiv_rn(total, static_cast<double>(n)));
}

// One thread block per nested block: 8-bit blockwise quantization of (absmax - offset) with the dynamic map.
__global__ void quantize_absmax_kernel(const float* __restrict__ values, int64_t n, int nested_blocksize,
                                       const float* __restrict__ offset_ptr, DynamicMap map,
                                       uint8_t* __restrict__ q, float* __restrict__ nested_absmax) {
  __shared__ float midpoint[255];
  __shared__ float warp_max[32];
  for (int i = threadIdx.x; i < 255; i += blockDim.x) midpoint[i] = map.midpoint[i];
  const float offset = *offset_ptr;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * nested_blocksize;
  const int64_t count = n - start < nested_blocksize ? n - start : nested_blocksize;
  float local = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    local = max_propagate_nan(local, fabsf(__fsub_rn(values[start + i], offset)));
  }
  for (int o = 16; o > 0; o /= 2) local = max_propagate_nan(local, __shfl_xor_sync(0xFFFFFFFFu, local, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = local;
  __syncthreads();
  float block_max = warp_max[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) block_max = max_propagate_nan(block_max, warp_max[w]);
  const bool full = count == nested_blocksize;
  const float stored = full ? block_max : clamp_absmax(block_max);
  if (threadIdx.x == 0) nested_absmax[blockIdx.x] = stored;
  const float multiplier = full_block_multiplier(block_max);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float v = __fsub_rn(values[start + i], offset);
    q[start + i] = encode_8bit(full ? __fmul_rn(v, multiplier) : __fdiv_rn(v, stored), midpoint);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cuda(const at::Tensor& absmax,
                                                                    int64_t nested_blocksize) {
  check_double_quantize_args(absmax, nested_blocksize);
  const c10::cuda::CUDAGuard guard(absmax.device());
  const at::Tensor values = absmax.contiguous();
  const int64_t n = values.numel();
  const int64_t nested_blocks = ceil_div(n, nested_blocksize);
  at::Tensor qabsmax = at::empty({n}, values.options().dtype(at::kByte));
  at::Tensor nested = at::empty({nested_blocks}, values.options());
  at::Tensor offset = at::zeros({}, values.options());
  if (n == 0) return {qabsmax, nested, offset};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = ceil_div(n, kMeanChunk);
  at::Tensor partial = at::empty({chunks}, values.options().dtype(at::kDouble));
  chunk_sums_kernel<<<ceil_div(chunks, 128), 128, 0, stream>>>(values.const_data_ptr<float>(), n,
                                                              partial.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  mean_kernel<<<1, 1, 0, stream>>>(partial.const_data_ptr<double>(), chunks, n, offset.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  quantize_absmax_kernel<<<nested_blocks, 256, 0, stream>>>(values.const_data_ptr<float>(), n,
                                                            static_cast<int>(nested_blocksize),
                                                            offset.const_data_ptr<float>(), kDynamicMap,
                                                            qabsmax.mutable_data_ptr<uint8_t>(),
                                                            nested.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {qabsmax, nested, offset};
}

__global__ void dequantize_absmax_kernel(int64_t n, BlockScales scales, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = scales(i);
}

at::Tensor dequantize_absmax_cuda(const at::Tensor& qabsmax, const at::Tensor& nested_absmax,
                                  const at::Tensor& nested_code, const at::Tensor& offset,
                                  int64_t nested_blocksize) {
  TORCH_CHECK_VALUE(qabsmax.dim() == 1 && qabsmax.is_contiguous(), "qabsmax must be 1-D and contiguous, got shape ",
                    qabsmax.sizes());
  check_nested_absmax_args(qabsmax, nested_absmax, nested_code, offset, nested_blocksize, qabsmax);
  const c10::cuda::CUDAGuard guard(qabsmax.device());
  const int64_t n = qabsmax.numel();
  at::Tensor out = at::empty({n}, nested_absmax.options());
  if (n == 0) return out;
  const BlockScales scales = block_scales(qabsmax, nested_absmax, nested_code, offset, nested_blocksize);
  dequantize_absmax_kernel<<<ceil_div(n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      n, scales, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit_into", &dequantize_4bit_into_cuda);
  m.impl("double_quantize", &double_quantize_cuda);
  m.impl("dequantize_absmax", &dequantize_absmax_cuda);
}

}  // namespace fourbit::cuda
