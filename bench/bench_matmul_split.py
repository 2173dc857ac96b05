# SPDX-License-Identifier: Apache-2.0
"""The two directions of matmul_4bit timed apart, against the dense layer's same products.

    python bench/bench_matmul_split.py                      # batches 1, 16, 64; fp32 and bf16; 2 threads
    python bench/bench_matmul_split.py --batches 16 --threads 1

For each dtype and batch: the forward (fourbit.matmul_4bit against F.linear) and the input gradient
(torch.ops.fourbit.matmul_4bit_grad_x against grad_y @ W), 4096 x 4096, NF4 blocksize 64 with double quantization.
Each is timed over --layers layers in turn (16 by default: 128 MiB of codes, 1 GiB of dense fp32 weights), and the
minimum of --repeats calls is kept: on a noisy machine the minimum is the steadiest figure of what a kernel can do.
The suites of `python -m fourbit bench` (medians, whole layers) remain the figures the targets are checked against;
this script says which direction a ratio comes from.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fourbit


def minimum_ms(fn, repeats: int) -> float:
    times = []
    for r in range(repeats + 3):
        start = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - start)
    return min(times[3:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = k = 4096
    torch.manual_seed(0)
    masters = [torch.randn(n, k) / k**0.5 for _ in range(args.layers)]
    ours = [fourbit.quantize_4bit(w, 64, "nf4", compress_statistics=True) for w in masters]
    op_args = [(packed, state.op_args()) for packed, state in ours]

    def grad_x(g, i):
        packed, (absmax, nested_absmax, nested_code, offset, nested_blocksize) = op_args[i % args.layers]
        return torch.ops.fourbit.matmul_4bit_grad_x(g, packed, absmax, 64, "nf4", [n, k], nested_absmax, nested_code,
                                                    offset, nested_blocksize)  # fmt: skip

    print(f"{n}x{k} nf4 blocksize 64, nested; {args.threads} threads; min of {args.repeats}; {args.layers} layers")
    print(f"{'dtype':6} {'batch':>5}  {'forward ms':>10} {'dense':>7} {'ratio':>6}  {'grad_x ms':>9} {'dense':>7} {'ratio':>6}")
    for dtype in (torch.float32, torch.bfloat16):
        dense = [w.to(dtype) for w in masters]
        for batch in args.batches:
            x = torch.randn(batch, k, dtype=dtype)
            g = torch.randn(batch, n, dtype=dtype)
            ours_fwd = minimum_ms(lambda i: fourbit.matmul_4bit(x, *ours[i % args.layers]), args.repeats)
            dense_fwd = minimum_ms(lambda i: F.linear(x, dense[i % args.layers]), args.repeats)
            ours_grad = minimum_ms(lambda i: grad_x(g, i), args.repeats)
            dense_grad = minimum_ms(lambda i: g @ dense[i % args.layers], args.repeats)
            name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
            print(f"{name:6} {batch:5}  {ours_fwd:10.2f} {dense_fwd:7.2f} {dense_fwd / ours_fwd:5.2f}x "
                  f" {ours_grad:9.2f} {dense_grad:7.2f} {dense_grad / ours_grad:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
