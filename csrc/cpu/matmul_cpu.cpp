// SPDX-License-Identifier: Apache-2.0
// CPU entries of the 4-bit matmul (their loops are in matmul_kernels.h, one copy per instruction set): the small-batch
// GEMV, the panel path for the input gradient, the AMX path for bfloat16 and the column-tiled bfloat16 input gradient.
#include "cpu/matmul_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <numeric>

#include "cpu/isa.h"
#include "quant_checks.h"
#include "tiled_matmul.h"

namespace fourbit::cpu {

void gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const BlockScales& scales, int64_t blocksize,
               QuantType quant_type, const at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  // Chunk-major ([K / 32, M, 32]), each 32-element chunk of a row as its 16 even elements then its 16 odd ones: the
  // order in which one 16-byte load of codes decodes, with a chunk of every row of x side by side (see
  // matmul_kernels.h).
  const at::Tensor xs = x.to(at::kFloat).reshape({M, K / 32, 16, 2}).permute({1, 0, 3, 2}).contiguous();
  const at::Tensor out = y.scalar_type() == at::kFloat ? y : at::empty({M, N}, y.options().dtype(at::kFloat));
  Gemv4bitArgs args{};
  args.x = xs.const_data_ptr<float>();
  args.M = M;
  args.N = N;
  args.K = K;
  args.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  args.scales = scales;
  args.blocksize = blocksize;
  const Codebook4 cb = make_codebook4(quant_type);
  for (int c = 0; c < 16; ++c) args.lut[c] = cb.value[c];
  args.y = out.mutable_data_ptr<float>();
  const QuantKernels& kernels = select_kernels();
  // About 64 KiB of packed weight per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { kernels.gemv_4bit(args, begin, end); });
  if (!out.is_same(y)) y.copy_(out);
}

bool gemv_grad_available() { return select_kernels().gemv_grad_4bit != nullptr; }

void gemv_grad_x(const at::Tensor& grad_y, const Packed4bit& w, const at::Tensor& grad_x) {
  const int64_t M = grad_y.size(0), K = w.K;
  TORCH_INTERNAL_ASSERT(grad_y.scalar_type() == at::kFloat && grad_x.scalar_type() == at::kFloat &&
                        grad_x.is_contiguous());
  const at::Tensor g_t = grad_y.t().contiguous();
  GemvGradArgs args{};
  args.grad_y_t = g_t.const_data_ptr<float>();
  args.M = M;
  args.N = w.N;
  args.K = K;
  args.packed = static_cast<const uint8_t*>(w.packed.const_data_ptr());
  args.scales = w.scales;
  args.blocksize = w.blocksize;
  const Codebook4 cb = make_codebook4(w.quant_type);
  for (int c = 0; c < 16; ++c) args.lut[c] = cb.value[c];
  args.grad_x = grad_x.mutable_data_ptr<float>();
  const QuantKernels& kernels = select_kernels();
  // Four chunks (128 columns, one cache line of codes per row of W) per task at least.
  at::parallel_for(0, K / 32, 4, [&](int64_t begin, int64_t end) { kernels.gemv_grad_4bit(args, begin, end); });
}

namespace {

// A panel's dequantized bytes: about a quarter of a core's L2 on current x86 server parts (1-2 MiB), so the panel,
// the slice of x or grad_y and BLAS's own packing buffers stay in that core's cache.
constexpr int64_t kPanelBytes = int64_t{512} << 10;

// Dequantizes rows [row0, row0 + rows) of W into `out` (contiguous, rows x K elements of out's dtype), on the calling
// thread. row0 * K and (row0 + rows) * K are block starts (or the end of W), which panel_rows guarantees.
void dequantize_rows(const Packed4bit& w, const QuantKernels& kernels, int64_t row0, int64_t rows,
                     const at::Tensor& out) {
  Dequantize4bitArgs args{};
  args.packed = static_cast<const uint8_t*>(w.packed.const_data_ptr());
  args.scales = w.scales;
  args.n = w.N * w.K;
  args.blocksize = w.blocksize;
  const Codebook4 cb = make_codebook4(w.quant_type);
  for (int c = 0; c < 16; ++c) args.lut[c] = cb.value[c];
  args.out = out.mutable_data_ptr();
  args.out_type = out.scalar_type() == at::kFloat  ? ElemType::kFloat32
                  : out.scalar_type() == at::kHalf ? ElemType::kFloat16
                                                   : ElemType::kBFloat16;
  args.out_first = row0 * w.K;
  kernels.dequantize_4bit(args, row0 * w.K / w.blocksize, ceil_div((row0 + rows) * w.K, w.blocksize));
}

// Calls fn(row0, rows, panel) for the panels [begin, end) of W, dequantized into one buffer of this thread.
template <typename F>
void for_each_panel(const Packed4bit& w, int64_t panel, at::ScalarType dtype, int64_t begin, int64_t end, F&& fn) {
  // Worker threads do not inherit the caller's dispatch state: without this guard, at::mm on inputs that require
  // grad would go through autograd (which refuses out= arguments) although the op runs below it.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const QuantKernels& kernels = select_kernels();
  const at::Tensor buffer = at::empty({panel, w.K}, w.packed.options().dtype(dtype));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t row0 = p * panel, rows = std::min(panel, w.N - row0);
    const at::Tensor part = buffer.narrow(0, 0, rows);
    dequantize_rows(w, kernels, row0, rows, part);
    fn(row0, rows, part);
  }
}

}  // namespace

int64_t panel_rows(const Packed4bit& w, at::ScalarType dtype) {
  if (w.K == 0 || w.N == 0) return 0;
  const int64_t align = w.blocksize / std::gcd(w.K, w.blocksize);  // rows whose element count is a whole block
  const int64_t fit = kPanelBytes / (w.K * c10::elementSize(dtype)) / align * align;
  if (fit == 0) return 0;
  // At least one panel per thread, so that every core has work.
  const int64_t per_thread = ceil_div(ceil_div(w.N, at::get_num_threads()), align) * align;
  return std::min(fit, per_thread);
}

void panel_grad_x(const at::Tensor& grad_y, const Packed4bit& w, const at::Tensor& grad_x) {
  const at::ScalarType dtype = grad_y.scalar_type();
  const int64_t panel = panel_rows(w, dtype), panels = ceil_div(w.N, panel);
  // Contiguous runs of panels, one float32 accumulator each (a disjoint slice of the sum over N), added up at the
  // end. 16-bit products are rounded once per panel before they are accumulated.
  const int64_t runs = std::min<int64_t>(at::get_num_threads(), panels);
  const at::Tensor partial = at::zeros({runs, grad_y.size(0), w.K}, grad_y.options().dtype(at::kFloat));
  at::parallel_for(0, runs, 1, [&](int64_t run_begin, int64_t run_end) {
    for (int64_t run = run_begin; run < run_end; ++run) {
      at::Tensor acc = partial[run];
      const int64_t begin = panels * run / runs, end = panels * (run + 1) / runs;
      for_each_panel(w, panel, dtype, begin, end, [&](int64_t row0, int64_t rows, const at::Tensor& W) {
        const at::Tensor g = grad_y.narrow(1, row0, rows);
        if (dtype == at::kFloat) {
          acc.addmm_(g, W);
        } else {
          acc.add_(at::mm(g, W));
        }
      });
    }
  });
  grad_x.copy_(partial.sum(0));
}

namespace {

// Rows of W per forward panel: [32, K] bfloat16, 256 KiB at K = 4096. Two AMX tiles of rows. (Tried and not kept:
// slices of 512 or 1024 columns, which keep the decoded panel in L1, were 10-20% slower at batch 16, eight brgemm
// calls instead of one; 256-row panels decoded 512 columns at a time, which read x once per 256 rows of W, still ran
// batch 512 at 0.75-0.8x of the dense layer, against 0.95x on the tiled path.)
constexpr int64_t kAmxForwardRows = 32;
// The input gradient: threads take 512 columns of grad_x at a time and walk down W in panels of 512 rows, decoded to
// VNNI pairs ([256][512][2] bfloat16, 512 KiB); each panel feeds one brgemm over all its columns with a 512-row
// reduction, accumulated into the strip's float32 sums [M, 512]. Wide panels matter twice: each row of W is read 256
// contiguous bytes at a time (a walk down 64-column strips touches a new page every other row), and each brgemm call
// costs microseconds of setup, so a few long reductions beat many short ones. (One brgemm per 64 columns instead:
// the same at batch 16-64, 1.35x slower at batch 512.)
constexpr int64_t kAmxGradPanelColumns = 512;
constexpr int64_t kAmxGradRows = 512;

PanelBf16Args panel_args(const Packed4bit& w) {
  PanelBf16Args args{};
  args.packed = static_cast<const uint8_t*>(w.packed.const_data_ptr());
  args.scales = w.scales;
  args.N = w.N;
  args.K = w.K;
  args.blocksize = w.blocksize;
  const Codebook4 cb = make_codebook4(w.quant_type);
  for (int c = 0; c < 16; ++c) args.lut[c] = cb.value[c];
  return args;
}

const at::BFloat16* as_bf16(const void* p) { return static_cast<const at::BFloat16*>(p); }

}  // namespace

void column_tiled_grad_x_bf16(const at::Tensor& grad_y, const Packed4bit& w, const at::Tensor& grad_x) {
  const int64_t M = grad_y.size(0), N = w.N, K = w.K;
  // The tiled path's tile size: half of it (512 columns at 4096 x 4096) made the GEMMs half as fast (oneDNN, bf16).
  const int64_t columns = std::clamp<int64_t>(tile_elements(N * K) / N / 32 * 32, 32, K);
  const at::Tensor tile = at::empty({N * columns}, grad_y.options());
  const at::Tensor part = at::empty({M * columns}, grad_y.options());
  const QuantKernels& kernels = select_kernels();
  PanelBf16Args args = panel_args(w);
  for (int64_t k0 = 0; k0 < K; k0 += columns) {
    const int64_t width = std::min(columns, K - k0);
    args.k_begin = k0;
    args.k_end = k0 + width;
    uint16_t* const out = static_cast<uint16_t*>(tile.mutable_data_ptr());
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / width), [&](int64_t begin, int64_t end) {
      PanelBf16Args a = args;
      a.out = out + begin * width;
      kernels.decode_rows_bf16(a, begin, end);
    });
    at::Tensor product = part.narrow(0, 0, M * width).view({M, width});
    at::mm_out(product, grad_y, tile.narrow(0, 0, N * width).view({N, width}));
    grad_x.narrow(1, k0, width).copy_(product);
  }
}

// torch's headers announce the bf16 brgemm with this macro (older releases may lack it: then the path is off).
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
bool amx_bf16_available() {
  static const bool available = at::native::cpublas::could_pack(at::kBFloat16);
  return available;
}

void amx_forward(const at::Tensor& x, const Packed4bit& w, const at::Tensor& y) {
  const int64_t M = x.size(0), N = w.N, K = w.K;
  // brgemm computes y.T [N, M] = W [N, K] @ x.T [K, M]; its B operand (x.T) goes in VNNI layout [K / 2][M][2].
  const at::Tensor xv = x.view({M, K / 2, 2}).permute({1, 0, 2}).contiguous();
  const QuantKernels& kernels = select_kernels();
  const PanelBf16Args args = panel_args(w);
  at::parallel_for(0, ceil_div(N, kAmxForwardRows), 1, [&](int64_t begin, int64_t end) {
    // Per thread: a panel of W and its float32 sums (rows x M), written out to y panel by panel.
    const at::Tensor panel = at::empty({kAmxForwardRows, K}, x.options());
    const at::Tensor sums = at::empty({kAmxForwardRows, M}, x.options().dtype(at::kFloat));
    PanelBf16Args a = args;
    a.out = static_cast<uint16_t*>(panel.mutable_data_ptr());
    a.k_begin = 0;
    a.k_end = K;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kAmxForwardRows, rows = std::min(kAmxForwardRows, N - n0);
      kernels.decode_rows_bf16(a, n0, n0 + rows);
      at::native::cpublas::brgemm(rows, M, K, /*ld_a=*/K, /*ld_b=*/M, /*ld_c=*/M, /*add_C=*/false, as_bf16(a.out),
                                  as_bf16(xv.const_data_ptr()), sums.mutable_data_ptr<float>());
      y.narrow(1, n0, rows).copy_(sums.narrow(0, 0, rows).t());
    }
    at::native::cpublas::brgemm_release();
  });
}

void amx_grad_x(const at::Tensor& grad_y, const Packed4bit& w, const at::Tensor& grad_x) {
  const int64_t M = grad_y.size(0), N = w.N, K = w.K;
  // The reduction runs over pairs of rows of W (VNNI); an odd N gets a zero column in grad_y and a zero row of W.
  const int64_t N2 = N + N % 2;
  const at::Tensor g = N2 == N ? grad_y : at::constant_pad_nd(grad_y, {0, 1});
  const QuantKernels& kernels = select_kernels();
  const PanelBf16Args args = panel_args(w);
  TORCH_INTERNAL_ASSERT(grad_x.is_contiguous());
  at::parallel_for(0, ceil_div(K, kAmxGradPanelColumns), 1, [&](int64_t begin, int64_t end) {
    // Per thread: a panel of W and the float32 sums of one strip of grad_x (M x 512).
    const at::Tensor buffer = at::empty({kAmxGradRows, kAmxGradPanelColumns}, grad_y.options());
    const at::Tensor sums = at::empty({M, kAmxGradPanelColumns}, grad_y.options().dtype(at::kFloat));
    PanelBf16Args a = args;
    a.out = static_cast<uint16_t*>(buffer.mutable_data_ptr());
    float* C = sums.mutable_data_ptr<float>();
    for (int64_t p = begin; p < end; ++p) {
      a.k_begin = p * kAmxGradPanelColumns;
      a.k_end = std::min(K, a.k_begin + kAmxGradPanelColumns);
      const int64_t width = a.k_end - a.k_begin;
      for (int64_t n0 = 0; n0 < N2; n0 += kAmxGradRows) {
        const int64_t rows = std::min(kAmxGradRows, N2 - n0);
        kernels.decode_row_pairs_bf16(a, n0, n0 + rows);
        at::native::cpublas::brgemm(M, width, rows, /*ld_a=*/N2, /*ld_b=*/width, /*ld_c=*/kAmxGradPanelColumns,
                                    /*add_C=*/n0 > 0, as_bf16(g.const_data_ptr()) + n0, as_bf16(a.out), C);
      }
      // The panels hold each 32-column chunk as its 16 even columns, then its 16 odd ones (see
      // decode_row_pairs_bf16), and so do the sums' columns.
      const at::Tensor strip = sums.narrow(1, 0, width);
      grad_x.narrow(1, a.k_begin, width)
          .view({M, width / 32, 16, 2})
          .copy_(strip.view({M, width / 32, 2, 16}).transpose(2, 3));
    }
    at::native::cpublas::brgemm_release();
  });
}
#else
bool amx_bf16_available() { return false; }
void amx_forward(const at::Tensor&, const Packed4bit&, const at::Tensor&) {
  TORCH_CHECK(false, "fourbit was built against a torch without the bf16 brgemm");
}
void amx_grad_x(const at::Tensor&, const Packed4bit&, const at::Tensor&) {
  TORCH_CHECK(false, "fourbit was built against a torch without the bf16 brgemm");
}
#endif

}  // namespace fourbit::cpu
