# SPDX-License-Identifier: Apache-2.0
"""QLoRA training throughput and per-rank memory: one process against DDP and FSDP2 (fourbit.distributed).

A Llama-style model built from a config (offline, random weights) is quantized to NF4 (double quantization), LoRA
r=16 goes on every linear but lm_head, and AdamW trains the adapters on random tokens. Reported per run: tokens/s
(all ranks together, after warm-up), the bytes of 4-bit weights + scales and of adapters each rank stores, and each
rank's peak memory during the timed steps (CUDA: max_memory_allocated; CPU: the process's peak RSS, reset after
the warm-up steps, so it includes the Python + torch + transformers runtime), and that peak above the memory in use
before the timed steps (runtime, model, optimizer state): activations, gradients and all-gather buffers.

    python bench/bench_distributed.py                                   # one process
    torchrun --nproc-per-node 2 bench/bench_distributed.py --mode fsdp  # FSDP2, 2 ranks (gloo on CPU, NCCL on GPU)
    torchrun --nproc-per-node 2 bench/bench_distributed.py --mode ddp
    python bench/bench_distributed.py --compare                         # the three above, one table

The global batch is the same in every run (each rank takes batch / world rows), so the runs do the same work per
step. On a CPU each process gets cores / world threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def build(args, device):
    import transformers

    import fourbit

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(device)
    fourbit.quantize_model(model, compute_dtype=args.compute_dtype, progress=False)
    fourbit.add_lora(model, fourbit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model


def run(args) -> dict:
    from fourbit import distributed as fd

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = args.device == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    torch.set_num_threads(max(1, (args.threads or os.cpu_count() or 1) // world))
    distributed = args.mode != "single"
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    model = build(args, device)
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
        fd.shard_model(model, mesh=init_device_mesh(device.type, (world,)), mp_policy=policy)
        step_model = model
    elif args.mode == "ddp":
        step_model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        step_model = model
    stored = fd.sharded_bytes(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the world size {world}")
    local = args.batch // world
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (local, args.seq), generator=gen).to(device)

    def step():
        loss = step_model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if use_cuda:
        torch.cuda.synchronize()
    # The peak of the timed steps: not of building the dense model before quantizing it, nor of one-time set-up
    # (FSDP's lazy init, modules imported on first use) in the warm-up steps.
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    before = torch.cuda.memory_allocated() if use_cuda else _current_rss()  # runtime, model, optimizer state
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if use_cuda:
        torch.cuda.synchronize()
    if distributed:
        dist.barrier()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if use_cuda else _peak_rss()
    row = {
        "mode": args.mode, "world": world, "rank": rank, "device": device.type,
        "tokens_per_s": args.batch * args.seq * args.steps / seconds,
        "stored_4bit_MiB": (stored["packed"] + stored["scales"]) / 2**20, "adapters_MiB": stored["adapters"] / 2**20,
        "peak_MiB": peak / 2**20, "peak_above_start_MiB": (peak - before) / 2**20,
        "loss": float(loss.detach()),
    }  # fmt: skip
    rows = [None] * world
    if distributed:
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    else:
        rows = [row]
    return rows


def check(args) -> None:
    """Device-agnostic equality check for the GPU script (NCCL, any world size, 1 included): FSDP2 forward and
    adapter gradients on each rank's rows against an unsharded copy run on the whole batch; raises on a mismatch."""
    import copy

    import fourbit
    from fourbit import distributed as fd

    use_cuda = args.device == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda" if use_cuda else "cpu")
    args.compute_dtype = None
    model = build(args, device)
    with torch.no_grad():  # non-zero lora_B, so every adapter matrix gets a gradient
        for layer in fourbit.lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.02)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    ref_out = ref(ids, labels=ids)
    ref_out.loss.backward()
    from torch.distributed.device_mesh import init_device_mesh

    fd.shard_model(model, mesh=init_device_mesh(device.type, (world,)))
    local = ids.chunk(world)[rank]
    out = model(local, labels=local)
    out.loss.backward()
    expected = ref_out.logits.chunk(world)[rank]
    logits_err = float((out.logits.detach() - expected.detach()).abs().max() / expected.detach().abs().max())
    ref_params = dict(ref.named_parameters())
    grad_err = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            g, r = p.grad.full_tensor(), ref_params[name].grad
            grad_err = max(grad_err, float((g - r).abs().max() / r.abs().max().clamp_min(1e-12)))
    stored, total = fd.sharded_bytes(model), fd.sharded_bytes(ref)
    ok = logits_err < 1e-3 and grad_err < 1e-3
    if rank == 0:
        print(f"distributed check ({device.type}, {'nccl' if use_cuda else 'gloo'}, world {world}): "
              f"max relative logits error {logits_err:.2e}, adapter grads {grad_err:.2e}; packed 4-bit bytes on "
              f"rank 0 {stored['packed']} of {total['packed']}: {'OK' if ok else 'MISMATCH'}")  # fmt: skip
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


def _reset_peak_rss() -> None:
    # Return freed heap pages to the OS (glibc), then reset the kernel's high-water mark (VmHWM) of this process.
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux/glibc: the peak then includes building the model


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def table(rows: list[dict]) -> str:
    lines = ["| run | world | tokens/s | 4-bit weights+scales per rank (MiB) | adapters per rank (MiB) "
             "| training peak per rank (MiB) | rise during a step per rank (MiB) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for group in rows:
        r0 = group[0]
        lines.append(
            f"| {r0['mode']} ({r0['device']}) | {r0['world']} | {r0['tokens_per_s']:.0f} | "
            + " / ".join(f"{r['stored_4bit_MiB']:.2f}" for r in group) + " | "
            + " / ".join(f"{r['adapters_MiB']:.2f}" for r in group) + " | "
            + " / ".join(f"{r['peak_MiB']:.0f}" for r in group) + " | "
            + " / ".join(f"{r['peak_above_start_MiB']:.0f}" for r in group) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["single", "ddp", "fsdp"], default=None,
                   help="default: fsdp under torchrun, single otherwise")  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--check", action="store_true",
                   help="FSDP2 vs an unsharded copy: logits and adapter grads must agree (exit 1 otherwise)")
    p.add_argument("--compare", action="store_true", help="run single, then torchrun 2-rank ddp and fsdp; one table")
    p.add_argument("--nproc", type=int, default=2, help="ranks for --compare")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="global batch (rows), split over the ranks")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for all processes together")
    p.add_argument("--bf16", action="store_true", help="bf16 compute (compute_dtype, and FSDP2 param_dtype)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    args.compute_dtype = torch.bfloat16 if args.bf16 else None
    if args.check:
        return check(args)
    if args.compare:
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--compare",)]
        passthrough = [a for i, a in enumerate(passthrough)
                       if not (a == "--json" or (i and passthrough[i - 1] == "--json"))]  # fmt: skip
        groups = []
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}"]
        for mode, launcher in [("single", [sys.executable]), ("ddp", torchrun), ("fsdp", torchrun)]:
            out = subprocess.run([*launcher, __file__, "--mode", mode, *passthrough, "--json", "-"],
                                 check=True, capture_output=True, text=True)  # fmt: skip
            groups.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(groups))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(groups, f, indent=1)
        return
    if args.mode is None:
        args.mode = "fsdp" if "WORLD_SIZE" in os.environ else "single"
    rows = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json == "-":
            print(json.dumps(rows))
        else:
            print(table([rows]))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
