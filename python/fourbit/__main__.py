# SPDX-License-Identifier: Apache-2.0
"""Command line: ``python -m fourbit info | demo | bench``."""

from __future__ import annotations

import argparse
import sys

import torch


def cmd_info(args: argparse.Namespace) -> int:
    import fourbit

    info = fourbit.build_info()
    print(f"fourbit {info['fourbit']}")
    print(f"torch {info['torch']} (fourbit built against {info['torch_built']})")
    if info["cuda_kernels"]:
        print(f"CUDA kernels: compiled for {', '.join(info['cuda_archs'])}")
    else:
        print(f"CUDA kernels: not compiled ({info['cuda_skipped_reason']})")
    print(f"CUDA device: {info['cuda_device'] or 'none visible'}")
    print(f"CPU instruction set: {info['cpu_isa']} (supported here: {', '.join(info['cpu_isas_supported'])}; "
          "force one with FOURBIT_CPU_ISA)")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fourbit import benchmark

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape = (1024, 4096) if args.quick else (4096, 4096)
    repeats = 5 if args.quick else args.repeats
    print(f"fourbit bench on {device} ({torch.get_num_threads()} threads), {shape[0]}x{shape[1]} nf4 blocksize 64, "
          f"median of {repeats}, inputs rotated over >= 4x the last-level cache", flush=True)
    cases = []
    if args.suite in ("quant", "all"):
        cases += benchmark.quant_cases(device, shape=shape)
    if args.suite in ("lora", "all"):
        cases += benchmark.lora_cases(device, shape=shape, layers=4 if args.quick else 16,
                                      batches=(1, 16) if args.quick else (1, 16, 512))  # fmt: skip
    if args.suite in ("matmul", "all"):
        cases += benchmark.matmul_cases(device, shape=shape, layers=4 if args.quick else 16,
                                        batches=(1, 16) if args.quick else (1, 16, 512))  # fmt: skip
    if args.suite in ("qat", "all"):
        cases += benchmark.qat_cases(device, shape=shape)
    results = benchmark.run_cases(cases, device, repeats=repeats, progress=lambda r: print(f"  done: {r.name}", flush=True))
    if results:
        print(benchmark.format_table(results))
    if args.suite in ("memory", "all") and device.type == "cpu":
        print("extra peak resident memory of one layer's forward + backward (fresh process each):")
        print(benchmark.memory_report(shape=shape, batches=(16,) if args.quick else (16, 512)))
    if args.quick:
        print("(--quick: small shapes and few layers, mostly in cache; the targets are meant for the full run)")
    meta = {"device": str(device), "threads": torch.get_num_threads(), "shape": shape, "repeats": repeats,
            "torch": torch.__version__}
    if args.json:
        benchmark.write_json(results, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot:
        benchmark.plot(results, args.plot, f"fourbit vs peers on {device}")
        print(f"wrote {args.plot}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fourbit import demo

    try:
        config = demo.config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo.run_demo(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fourbit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, CUDA kernels and CPU instruction set").set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="a short QLoRA fine-tune of a small model, against an unquantized base")
    from fourbit.demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="kernel benchmarks against the installed peers")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, the spec's method)")
    bench.add_argument("--repeats", type=int, default=11)
    bench.add_argument("--quick", action="store_true", help="a smaller shape and 5 repeats (a smoke run)")
    bench.add_argument("--suite", choices=["quant", "matmul", "lora", "memory", "qat", "all"], default="all")
    bench.add_argument("--json", help="write the results as JSON here")
    bench.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
