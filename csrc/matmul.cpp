// SPDX-License-Identifier: Apache-2.0
// matmul_4bit: y = x @ W.T + bias with W [N, K] stored in 4 bits, and its input gradient grad_x = grad_y @ W.
// Registered once for every backend (CompositeExplicitAutograd; schemas in ops.cpp); the autograd formula is in
// python/fourbit/_ops.py.
//
// None of the paths ever holds a full dequantized copy of W (docs/kernels.md has the table of which runs when):
//  * small batches: the GEMV kernels (cpu/matmul_kernels.h, cuda/matmul_cuda.cu) decode nibbles in registers and
//    read the packed weight once;
//  * on the CPU (cpu/matmul_cpu.cpp): bfloat16 on AMX, W decoded into each core's cache and multiplied on the
//    matrix unit (the forward at medium batches, the input gradient at every batch); the float32 input gradient at
//    medium batches on per-thread panels of W;
//  * the bfloat16 input gradient at large batches on CPUs without AMX: column tiles of W, one GEMM each;
//  * everything else: W is dequantized a tile of rows at a time (at most a quarter of W, see tile_elements) into one
//    buffer in the compute dtype, and each tile goes through the backend's GEMM (BLAS / cuBLAS), writing its slice of
//    the output (forward) or accumulating into grad_x (backward).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "cpu/matmul_cpu.h"
#include "quant_checks.h"
#if defined(FOURBIT_WITH_CUDA)
#include "cuda/matmul_cuda.h"
#endif
#include "tiled_matmul.h"

namespace fourbit {
namespace {

// Largest batch (rows of x) that takes the CPU GEMV kernel; above it the tiled GEMM is faster (measured with
// 4096 x 4096 layers, 2 threads, AVX-512: float32 forward at batch 16 / 32 / 48 took 2.95 / 5.23 / 8.25 ms in the GEMV
// and 3.03 / 6.62 / 7.96 ms tiled). The GEMV computes in float32, so its cost grows with the batch, and with 16-bit
// activations it competes with BLAS running bf16 dot-product instructions (or the AMX path), which catches up sooner.
int64_t cpu_gemv_max_batch(at::ScalarType dtype) { return dtype == at::kFloat ? 32 : 4; }

// Largest batch whose input gradient takes the CPU panel path (cpu/matmul_cpu.h), where the GEMV below does not
// apply (CPUs without AVX-512, K % 32 != 0). Measured against the tiled path (4096 x 4096, 2 threads): float32
// 1.5-3x faster up to batch 64; with 16-bit activations BLAS runs bf16 tiles on AMX / VNNI units, and the panel path
// only wins below batch 8. (For the forward, the tiled path was always as fast.)
int64_t cpu_panel_max_batch(at::ScalarType dtype) { return dtype == at::kFloat ? 64 : 4; }

// Largest batch for the CPU AMX forward (bfloat16, cpu/matmul_cpu.h), above the GEMV's batches (measured at 4096 x
// 4096, 2 threads: 1.1-1.2x of a dense bf16 layer at batches 16-64). Above 64 it falls behind: each 32-row panel of W
// reads all of x, and 0.4-0.5x of dense at batch 512, where the tiled path gives 0.95x (see matmul_cpu.cpp for the
// blockings tried). The AMX input gradient has no limit: it matched or beat the column-tiled GEMM at every batch
// measured (1.5 / 2.7 / 4.2 / 6.5 / 12.4 / 46.5 ms at batch 16 / 64 / 128 / 256 / 512 / 2048, against 1.5 / 2.7 /
// 5.2 / 7.1 / 13-16 / 45 ms), and it keeps no tile of W (the column tile and BLAS's repacked copy of it were 18 MiB
// at batch 512).
constexpr int64_t kCpuAmxForwardMaxBatch = 64;

// Largest batch for the CPU input-gradient GEMV (float32, AVX-512; cpu/matmul_cpu.h). Measured at 4096 x 4096, 2
// threads: 2.5 / 4.6 / 9.6 ms at batch 16 / 32 / 64, where the panel path took about 4.4 / 7.6 / 11.5 ms; at 96 the
// tiled GEMM is level with it (14 ms) and at 128 ahead (17 vs 20 ms).
constexpr int64_t kCpuGemvGradMaxBatch = 64;

// Rows of x per step of lora_linear's LoRA branch on the CPU (64 rows: 1 MiB of float32 per copy at 4096 features).
constexpr int64_t kLoraRowChunk = 64;

using OptTensor = std::optional<at::Tensor>;

struct Weight4bit {
  const at::Tensor& packed;
  const at::Tensor& absmax;
  int64_t blocksize;
  std::string_view quant_type;
  const OptTensor& nested_absmax;
  const OptTensor& nested_code;
  const OptTensor& offset;
  int64_t nested_blocksize;
  int64_t N, K;

  // float32 scales per block (double-quantized ones decoded once, for the tiles to slice).
  at::Tensor plain_scales() const {
    if (!nested_absmax.has_value()) return absmax;
    static const auto dequantize_absmax =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fourbit::dequantize_absmax", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    return dequantize_absmax.call(absmax, *nested_absmax, *nested_code, *offset, nested_blocksize);
  }

  // W as the CPU kernels read it (raw pointers, scales plain or nested).
  cpu::Packed4bit cpu_view() const {
    return {packed, block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize), blocksize,
            parse_quant_type(quant_type), N, K};
  }

  // Whether the CPU kernels that decode W straight to bfloat16 (AMX, column tiles) take this activation.
  bool cpu_bf16_decodable(const at::Tensor& activation, int64_t rows) const {
    return activation.is_cpu() && activation.scalar_type() == at::kBFloat16 && rows > 0 && K > 0 && K % 32 == 0 &&
           N > 0;
  }

  // The CPU AMX path's view of W, or nullopt when that path does not apply to this activation (of at most max_rows
  // rows).
  std::optional<cpu::Packed4bit> cpu_amx(const at::Tensor& activation, int64_t rows, int64_t max_rows) const {
    if (!cpu_bf16_decodable(activation, rows) || rows > max_rows || !cpu::amx_bf16_available()) {
      return std::nullopt;
    }
    return cpu_view();
  }

  // The CPU column-tiled bfloat16 input gradient's view of W (cpu/matmul_cpu.h), or nullopt when it does not apply.
  std::optional<cpu::Packed4bit> cpu_bf16_columns(const at::Tensor& activation, int64_t rows) const {
    if (!cpu_bf16_decodable(activation, rows)) return std::nullopt;
    return cpu_view();
  }

  // The CPU input-gradient GEMV's view of W (float32, small batches, AVX-512), or nullopt when it does not apply.
  std::optional<cpu::Packed4bit> cpu_gemv_grad(const at::Tensor& activation, int64_t rows) const {
    if (!activation.is_cpu() || activation.scalar_type() != at::kFloat || rows == 0 ||
        rows > kCpuGemvGradMaxBatch || K == 0 || K % 32 != 0 || N == 0 || !cpu::gemv_grad_available()) {
      return std::nullopt;
    }
    return cpu_view();
  }

  // The CPU panel path's view of W, or nullopt when that path does not apply to an activation of this dtype and
  // number of rows.
  std::optional<cpu::Packed4bit> cpu_panels(const at::Tensor& activation, int64_t rows) const {
    const at::ScalarType dtype = activation.scalar_type();
    if (!activation.is_cpu() || dtype == at::kDouble || rows == 0 || rows > cpu_panel_max_batch(dtype)) {
      return std::nullopt;
    }
    const cpu::Packed4bit view = cpu_view();
    if (cpu::panel_rows(view, dtype) == 0) return std::nullopt;
    return view;
  }
};

Weight4bit check_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                        std::string_view quant_type, c10::SymIntArrayRef shape, const OptTensor& nested_absmax,
                        const OptTensor& nested_code, const OptTensor& offset, int64_t nested_blocksize) {
  parse_quant_type(quant_type);
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(shape);
  TORCH_CHECK_VALUE(sizes.size() == 2, "shape must be the weight's [out_features, in_features], got ", sizes);
  check_dequantize_4bit_args(packed, absmax, blocksize, sizes, at::kFloat, nested_absmax, nested_code, offset,
                             nested_blocksize);
  return {packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset, nested_blocksize,
          sizes[0], sizes[1]};
}

// Calls fn(row0, rows, tile) for consecutive tiles of W's rows, dequantized in `dtype` (float64 via float32). Tile
// starts stay block aligned, so each tile is a valid 4-bit tensor of its own.
template <typename F>
void for_each_weight_tile(const Weight4bit& w, at::ScalarType dtype, F&& fn) {
  static const auto dequantize_into =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fourbit::dequantize_4bit_into", "")
          .typed<void(const at::Tensor&, const at::Tensor&, int64_t, std::string_view, c10::SymIntArrayRef,
                      const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, int64_t)>();
  const int64_t align = w.blocksize / std::gcd(w.K, w.blocksize);  // rows whose element count is a whole block
  const int64_t tile_rows =
      std::max<int64_t>(align, (tile_elements(w.N * w.K) / std::max<int64_t>(w.K, 1)) / align * align);
  const at::ScalarType buffer_dtype = dtype == at::kDouble ? at::kFloat : dtype;
  at::Tensor buffer = at::empty({std::min(tile_rows, w.N), w.K}, w.packed.options().dtype(buffer_dtype));
  const at::Tensor bytes = w.packed.view(at::kByte).reshape(-1);
  const at::Tensor scales = w.plain_scales();
  for (int64_t row0 = 0; row0 < w.N; row0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, w.N - row0);
    const int64_t first = row0 * w.K, count = rows * w.K;
    const at::Tensor tile_bytes = bytes.narrow(0, first / 2, (count + 1) / 2);
    const at::Tensor tile_scales = scales.narrow(0, first / w.blocksize, ceil_div(count, w.blocksize));
    at::Tensor tile = buffer.narrow(0, 0, rows);
    const std::vector<c10::SymInt> tile_shape = {c10::SymInt(rows), c10::SymInt(w.K)};
    dequantize_into.call(tile_bytes, tile_scales, w.blocksize, w.quant_type, tile_shape, tile, std::nullopt,
                         std::nullopt, std::nullopt, 256);
    fn(row0, rows, dtype == at::kDouble ? tile.to(at::kDouble) : tile);
  }
}

// The CUDA GEMV for small batches, when it applies (and the extension has CUDA kernels); returns whether it ran.
bool gemv_4bit_cuda(const at::Tensor& x2, const Weight4bit& w, const at::Tensor& y) {
#if defined(FOURBIT_WITH_CUDA)
  // (Cheap checks first: a large or float64 x must not be copied just to be refused.)
  if (!x2.is_cuda() || x2.size(0) > cuda::kGemvMaxBatch || x2.scalar_type() == at::kDouble) return false;
  const at::Tensor xc = x2.contiguous();
  if (!cuda::gemv_4bit_applies(xc, w.packed)) return false;
  cuda::gemv_4bit(xc, w.packed,
                  block_scales(w.absmax, w.nested_absmax, w.nested_code, w.offset, w.nested_blocksize), w.blocksize,
                  parse_quant_type(w.quant_type), y);
  return true;
#else
  return false;
#endif
}

at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                       std::string_view quant_type, c10::SymIntArrayRef shape, const OptTensor& bias,
                       const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                       int64_t nested_blocksize) {
  const Weight4bit w = check_weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code,
                                    offset, nested_blocksize);
  check_activation(x, "x", w.K, "in_features", packed, "packed");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.N, "bias must have shape [", w.N, "], got ",
                      bias->sizes());
    check_same_device(*bias, "bias", packed, "packed");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.N;
  // Allocated in its final shape and returned as is: an op's output must not be a view (autograd forbids in-place
  // changes to views that custom functions return).
  at::Tensor out = at::empty(out_shape, x.options());
  const int64_t M = leading_rows(x);
  const at::Tensor x2 = x.reshape({M, w.K});
  at::Tensor y = out.view({M, w.N});
  if (x.is_cpu() && M > 0 && M <= cpu_gemv_max_batch(x.scalar_type()) && w.K > 0 && w.K % 32 == 0 &&
      x.scalar_type() != at::kDouble) {
    const BlockScales scales = block_scales(absmax, nested_absmax, nested_code, offset, nested_blocksize);
    cpu::gemv_4bit(x2, packed, scales, blocksize, parse_quant_type(quant_type), y);
  } else if (const auto amx = w.cpu_amx(x, M, kCpuAmxForwardMaxBatch)) {
    cpu::amx_forward(x2.contiguous(), *amx, y);
  } else if (!gemv_4bit_cuda(x2, w, y)) {
    tiled_forward(x2, y, w.N, [&](at::ScalarType dtype, auto&& fn) { for_each_weight_tile(w, dtype, fn); });
  }
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  return out;
}

at::Tensor matmul_4bit_grad_x(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t blocksize, std::string_view quant_type, c10::SymIntArrayRef shape,
                              const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                              int64_t nested_blocksize) {
  const Weight4bit w = check_weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code,
                                    offset, nested_blocksize);
  check_activation(grad_y, "grad_y", w.N, "out_features", packed, "packed");
  const int64_t M = leading_rows(grad_y);
  const auto amx = w.cpu_amx(grad_y, M, std::numeric_limits<int64_t>::max());
  const auto gemv = amx ? std::nullopt : w.cpu_gemv_grad(grad_y, M);
  const auto panels = amx || gemv ? std::nullopt : w.cpu_panels(grad_y, M);
  const auto columns = amx || gemv || panels ? std::nullopt : w.cpu_bf16_columns(grad_y, M);
  if (amx || gemv || panels || columns) {
    std::vector<int64_t> in_shape(grad_y.sizes().begin(), grad_y.sizes().end());
    in_shape.back() = w.K;
    at::Tensor grad_x = at::empty(in_shape, grad_y.options());
    const at::Tensor g = grad_y.reshape({M, w.N}).contiguous();
    at::Tensor gx = grad_x.view({M, w.K});
    if (amx) {
      cpu::amx_grad_x(g, *amx, gx);
    } else if (gemv) {
      cpu::gemv_grad_x(g, *gemv, gx);
    } else if (panels) {
      cpu::panel_grad_x(g, *panels, gx);
    } else {
      cpu::column_tiled_grad_x_bf16(g, *columns, gx);
    }
    return grad_x;
  }
  return tiled_grad_x(grad_y, w.N, w.K,
                      [&](at::ScalarType dtype, auto&& fn) { for_each_weight_tile(w, dtype, fn); });
}

void check_adapters(const at::Tensor& lora_A, const at::Tensor& lora_B, const Weight4bit& w) {
  TORCH_CHECK_TYPE(at::isFloatingType(lora_A.scalar_type()), "lora_A must be a float tensor, got ",
                   lora_A.scalar_type());
  TORCH_CHECK_TYPE(lora_B.scalar_type() == lora_A.scalar_type(), "lora_B must have lora_A's dtype ",
                   lora_A.scalar_type(), ", got ", lora_B.scalar_type());
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == w.K, "lora_A must have shape [r, in_features = ", w.K,
                    "], got ", lora_A.sizes());
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == w.N && lora_B.size(1) == lora_A.size(0),
                    "lora_B must have shape [out_features = ", w.N, ", r = ", lora_A.size(0), "], got ",
                    lora_B.sizes());
  check_same_device(lora_A, "lora_A", w.packed, "packed");
  check_same_device(lora_B, "lora_B", w.packed, "packed");
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                       std::string_view quant_type, c10::SymIntArrayRef shape, const at::Tensor& lora_A,
                       const at::Tensor& lora_B, double scaling, const OptTensor& bias, const OptTensor& lora_x,
                       const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                       int64_t nested_blocksize) {
  const Weight4bit w = check_weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code,
                                    offset, nested_blocksize);
  check_adapters(lora_A, lora_B, w);
  // A NaN or infinite scaling would silently turn every output into NaN/inf. (A host value: no device sync.)
  TORCH_CHECK_VALUE(std::isfinite(scaling), "scaling must be finite, got ", scaling);
  if (lora_x.has_value()) {
    TORCH_CHECK_VALUE(lora_x->sizes() == x.sizes(), "lora_x must have x's shape ", x.sizes(), ", got ",
                      lora_x->sizes());
    check_activation(*lora_x, "lora_x", w.K, "in_features", packed, "packed");
  }
  at::Tensor y = matmul_4bit(x, packed, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code,
                             offset, nested_blocksize);
  // The LoRA branch in the adapters' dtype, accumulated into the 4-bit result: y += scaling * (x_lora @ A.T) @ B.T.
  // On the CPU, kLoraRowChunk rows at a time, so that its copies of x and of the product in the adapters' dtype
  // (float32 adapters with 16-bit activations) stay small at large batches. (On a GPU, each chunk would cost kernel
  // launches: one step there.)
  const int64_t M = leading_rows(x);
  const int64_t chunk = x.is_cpu() ? kLoraRowChunk : std::max<int64_t>(M, 1);
  const at::Tensor lx_all = lora_x.value_or(x).reshape({M, w.K});
  at::Tensor y2 = y.view({M, w.N});
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    const at::Tensor h = at::mm(lx_all.narrow(0, m0, rows).to(lora_A.scalar_type()), lora_A.t());
    at::Tensor part = y2.narrow(0, m0, rows);
    if (y.scalar_type() == lora_A.scalar_type()) {
      part.addmm_(h, lora_B.t(), 1.0, scaling);
    } else {
      part.add_(at::mm(h, lora_B.t()).mul_(scaling).to(y.scalar_type()));
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fourbit, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("matmul_4bit", &matmul_4bit);
  m.impl("matmul_4bit_grad_x", &matmul_4bit_grad_x);
}

}  // namespace fourbit
