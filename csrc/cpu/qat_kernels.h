// SPDX-License-Identifier: Apache-2.0
// QAT loops for one instruction set: affine fake quantization (forward and STE/LSQ backward), 4-bit fake
// quantization in one pass, and LinearInt's weight dequantization. Included once per instruction set after
// quant_kernels.h (same FOURBIT_ISA / FOURBIT_ISA_NS), whose chunk primitives the 4-bit loop reuses.
//
// The affine loops are plain element loops over runs that share one set of parameters, written with compares and
// selects only (see core/fake_quant.h), so the compiler vectorizes them for each instruction set's flags; the
// arithmetic is the same IEEE float32 operations on every path.
#pragma once

#include "core/fake_quant.h"
#include "cpu/kernels.h"
#include "cpu/quant_kernels.h"

namespace fourbit::cpu::FOURBIT_ISA_NS {
namespace {

template <ElemType E> using Storage = typename Elem<E>::storage;

// ---------------------------------------------------------------------------------------------- affine forward
template <ElemType E>
void fake_quant_run(const Storage<E>* __restrict__ x, Storage<E>* __restrict__ y, int64_t len,
                    const AffineParams<float>& p) {
  for (int64_t i = 0; i < len; ++i) y[i] = Elem<E>::store(fake_quant_affine(Elem<E>::load(x[i]), p));
}

// A row whose elements each have their own parameters (per channel along the last dimension).
template <ElemType E>
void fake_quant_row(const Storage<E>* __restrict__ x, Storage<E>* __restrict__ y, int64_t len,
                    const float* __restrict__ scale, const float* __restrict__ zero_point, float qmin, float qmax) {
  for (int64_t i = 0; i < len; ++i) {
    const AffineParams<float> p = make_affine_params(scale[i], zero_point[i], qmin, qmax);
    y[i] = Elem<E>::store(fake_quant_affine(Elem<E>::load(x[i]), p));
  }
}

template <ElemType E> void fake_quant_elements(const FakeQuantArgs& a, int64_t begin, int64_t end) {
  const Storage<E>* x = static_cast<const Storage<E>*>(a.x);
  Storage<E>* y = static_cast<Storage<E>*>(a.y);
  if (a.layout.inner == 1 && a.layout.channels > 1) {
    for (int64_t i = begin; i < end;) {
      const int64_t c = i % a.layout.channels;
      const int64_t len = std::min(end - i, a.layout.channels - c);
      fake_quant_row<E>(x + i, y + i, len, a.scale + c, a.zero_point + c, a.quant_min, a.quant_max);
      i += len;
    }
    return;
  }
  const int64_t inner = a.layout.inner;
  int64_t i = begin;
  // Whole groups of a power-of-two size (per-group weights: 32, 64, ...): a fixed-trip loop per group, with no
  // index arithmetic in between, so short groups cost no more per element than long runs.
  if (inner % 16 == 0 && inner <= 1024 && begin % inner == 0) {
    for (; i + inner <= end; i += inner) {
      const int64_t c = a.layout.param_index(i);
      const AffineParams<float> p = make_affine_params(a.scale[c], a.zero_point[c], a.quant_min, a.quant_max);
      for (int64_t j = 0; j < inner; j += 16) fake_quant_run<E>(x + i + j, y + i + j, 16, p);
    }
  }
  for (; i < end;) {
    const int64_t c = a.layout.param_index(i);
    const int64_t len = std::min(end - i, inner - i % inner);
    fake_quant_run<E>(x + i, y + i, len, make_affine_params(a.scale[c], a.zero_point[c], a.quant_min, a.quant_max));
    i += len;
  }
}

void fake_quantize_affine(const FakeQuantArgs& a, int64_t begin, int64_t end) {
  switch (a.type) {
    case ElemType::kFloat32: return fake_quant_elements<ElemType::kFloat32>(a, begin, end);
    case ElemType::kFloat16: return fake_quant_elements<ElemType::kFloat16>(a, begin, end);
    case ElemType::kBFloat16: return fake_quant_elements<ElemType::kBFloat16>(a, begin, end);
  }
}

// ---------------------------------------------------------------------------------------------- affine backward
// dx (x's dtype) always; the per-element dscale / dzero_point (float32, before grad_factor) when their pointers are
// set (the caller sums them per parameter).
template <ElemType E, bool kParams>
void fake_quant_grad_run(const Storage<E>* __restrict__ x, const Storage<E>* __restrict__ dy,
                         Storage<E>* __restrict__ dx, float* __restrict__ dscale, float* __restrict__ dzero_point,
                         int64_t len, const AffineParams<float>& p) {
  for (int64_t i = 0; i < len; ++i) {
    const AffineGrads<float> g = fake_quant_affine_grads(Elem<E>::load(x[i]), Elem<E>::load(dy[i]), p);
    dx[i] = Elem<E>::store(g.dx);
    if constexpr (kParams) {
      dscale[i] = g.dscale;
      dzero_point[i] = g.dzero_point;
    }
  }
}

template <ElemType E, bool kParams> void fake_quant_grad_elements(const FakeQuantGradArgs& a, int64_t begin, int64_t end) {
  const Storage<E>* x = static_cast<const Storage<E>*>(a.fwd.x);
  const Storage<E>* dy = static_cast<const Storage<E>*>(a.dy);
  Storage<E>* dx = static_cast<Storage<E>*>(a.dx);
  const AffineLayout& l = a.fwd.layout;
  for (int64_t i = begin; i < end;) {
    const int64_t c = l.param_index(i);
    const int64_t len = std::min(end - i, l.inner - i % l.inner);
    const AffineParams<float> p = make_affine_params(a.fwd.scale[c], a.fwd.zero_point[c], a.fwd.quant_min,
                                                     a.fwd.quant_max);
    fake_quant_grad_run<E, kParams>(x + i, dy + i, dx + i, kParams ? a.dscale + i : nullptr,
                                    kParams ? a.dzero_point + i : nullptr, len, p);
    i += len;
  }
}

template <bool kParams> void fake_quant_grad_dispatch(const FakeQuantGradArgs& a, int64_t begin, int64_t end) {
  switch (a.fwd.type) {
    case ElemType::kFloat32: return fake_quant_grad_elements<ElemType::kFloat32, kParams>(a, begin, end);
    case ElemType::kFloat16: return fake_quant_grad_elements<ElemType::kFloat16, kParams>(a, begin, end);
    case ElemType::kBFloat16: return fake_quant_grad_elements<ElemType::kBFloat16, kParams>(a, begin, end);
  }
}

void fake_quantize_affine_grad(const FakeQuantGradArgs& a, int64_t begin, int64_t end) {
  if (a.dscale != nullptr) return fake_quant_grad_dispatch<true>(a, begin, end);
  fake_quant_grad_dispatch<false>(a, begin, end);
}

// ---------------------------------------------------------------------------------------------- 4-bit, one pass
// Each block: absmax, encode exactly as quantize_blocks does, decode exactly as dequantize_blocks does, with no packed
// bytes in memory.
template <ElemType E> void fake_quant_4bit_blocks(const FakeQuant4bitArgs& a, int64_t block_begin, int64_t block_end) {
  using T = Storage<E>;
  const T* input = static_cast<const T*>(a.input);
  T* output = static_cast<T*>(a.out);
  const Encoder encoder(a.codebook);
  const Decoder decoder(a.codebook.value);
  const int64_t chunks_per_block = a.blocksize / 16;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t start = b * a.blocksize;
    const T* in = input + start;
    T* out = output + start;
    const int64_t count = a.n - start < a.blocksize ? a.n - start : a.blocksize;
    if (count < a.blocksize) {
      // The partial last block: divide by the clamped absmax, which is also its scale (quantize_partial_block).
      float absmax = 0.0f;
      for (int64_t i = 0; i < count; ++i) {
        const float v = Elem<E>::load(in[i]);
        absmax = max_propagate_nan(absmax, v < 0 ? -v : v);
      }
      absmax = clamp_absmax(absmax);
      for (int64_t i = 0; i < count; ++i) {
        const uint8_t code = encode_4bit(Elem<E>::load(in[i]) / absmax, a.codebook);
        out[i] = Elem<E>::store(a.codebook.value[code] * absmax);
      }
      continue;
    }
    AbsMax acc;
    for (int64_t c = 0; c < chunks_per_block; ++c) acc.add(load_chunk<E>(in + 16 * c));
    const float absmax = acc.result();
    const float multiplier = full_block_multiplier(absmax);
    for (int64_t c = 0; c < chunks_per_block; ++c) {
      const uint64_t bytes = encoder.encode(mul_chunk(load_chunk<E>(in + 16 * c), multiplier));
      store_chunk<E>(out + 16 * c, mul_chunk(decoder.decode(bytes), absmax));
    }
  }
}

void fake_quantize_4bit(const FakeQuant4bitArgs& a, int64_t block_begin, int64_t block_end) {
  switch (a.type) {
    case ElemType::kFloat32: return fake_quant_4bit_blocks<ElemType::kFloat32>(a, block_begin, block_end);
    case ElemType::kFloat16: return fake_quant_4bit_blocks<ElemType::kFloat16>(a, block_begin, block_end);
    case ElemType::kBFloat16: return fake_quant_4bit_blocks<ElemType::kBFloat16>(a, block_begin, block_end);
  }
}

// ---------------------------------------------------------------------------------------------- LinearInt weights
template <ElemType E, int kBits> void dequant_int_rows(const DequantizeIntArgs& a, int64_t row_begin, int64_t row_end) {
  Storage<E>* output = static_cast<Storage<E>*>(a.out);
  const int64_t groups = a.K / a.group_size;
  const int64_t row_bytes = kBits == 4 ? a.K / 2 : a.K;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* codes = a.qweight + r * row_bytes;
    Storage<E>* out = output + r * a.K;
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = a.scale[r * groups + g];
      const uint8_t zp = a.zero_point[r * groups + g];
      const int64_t k0 = g * a.group_size;
      if constexpr (kBits == 4) {
        for (int64_t k = k0; k < k0 + a.group_size; k += 2) {
          const uint8_t byte = codes[k / 2];
          out[k] = Elem<E>::store(int_dequant(first_nibble(byte), zp, scale));
          out[k + 1] = Elem<E>::store(int_dequant(second_nibble(byte), zp, scale));
        }
      } else {
        for (int64_t k = k0; k < k0 + a.group_size; ++k) out[k] = Elem<E>::store(int_dequant(codes[k], zp, scale));
      }
    }
  }
}

template <int kBits> void dequant_int_dispatch(const DequantizeIntArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.out_type) {
    case ElemType::kFloat32: return dequant_int_rows<ElemType::kFloat32, kBits>(a, row_begin, row_end);
    case ElemType::kFloat16: return dequant_int_rows<ElemType::kFloat16, kBits>(a, row_begin, row_end);
    case ElemType::kBFloat16: return dequant_int_rows<ElemType::kBFloat16, kBits>(a, row_begin, row_end);
  }
}

void dequantize_int(const DequantizeIntArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.bits == 4) return dequant_int_dispatch<4>(a, row_begin, row_end);
  dequant_int_dispatch<8>(a, row_begin, row_end);
}

}  // namespace
}  // namespace fourbit::cpu::FOURBIT_ISA_NS
