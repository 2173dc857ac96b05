# SPDX-License-Identifier: Apache-2.0
"""Kernel benchmarks, side by side with the installed peers, following the method of the product spec:

* every contender runs interleaved with the others in the same process, after a warm-up, and the median of at least
  11 runs is reported (these machines are noisy: ratios measured in one run are what count);
* inputs rotate over enough copies that they total at least 4x the last-level cache (CPU: L3, GPU: L2), so the
  figures measure memory, not cache;
* on the CPU, 2 threads (``torch.set_num_threads(2)``) unless told otherwise.

Each case reports the median time, the achieved GB/s (bytes read + written by the op), and the ratio to each peer.
``python -m fourbit bench`` runs the suites; ``bench/`` holds scripts that call them.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import fourbit

__all__ = ["Case", "Result", "last_level_cache_bytes", "rotations", "run_cases", "format_table", "quant_cases", "qat_cases"]


@dataclass
class Case:
    """One benchmark: fourbit's call and the peers it is compared with.

    Each callable takes the rotation index ``i`` and should use the i-th copy of its inputs.
    ``bytes_moved``: bytes read + written by fourbit's op in one call (for GB/s).
    ``target``: the spec's target, as (peer name, minimum peer_time / fourbit_time).
    """

    name: str
    fourbit: Callable[[int], Any]
    peers: dict[str, Callable[[int], Any]] = field(default_factory=dict)
    bytes_moved: int = 0
    target: tuple[str, float] | None = None


@dataclass
class Result:
    name: str
    fourbit_ms: float
    peer_ms: dict[str, float]
    gbps: float
    target: tuple[str, float] | None

    def ratio(self, peer: str) -> float:
        """How many times faster fourbit is than ``peer`` (peer time / fourbit time)."""
        return self.peer_ms[peer] / self.fourbit_ms

    def meets_target(self) -> bool | None:
        if self.target is None:
            return None
        peer, minimum = self.target
        return self.ratio(peer) >= minimum

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "fourbit_ms": self.fourbit_ms,
            "peer_ms": self.peer_ms,
            "ratios": {p: self.ratio(p) for p in self.peer_ms},
            "gbps": self.gbps,
            "target": list(self.target) if self.target else None,
            "meets_target": self.meets_target(),
        }


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:  # Linux: the largest cache level of CPU 0
        sizes = []
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
        return max(sizes)
    except (OSError, ValueError, KeyError):
        return 32 << 20


def rotations(bytes_per_copy: int, device: torch.device, cache_bytes: int | None = None, minimum: int = 2) -> int:
    """How many copies of an input of this size total at least 4x the last-level cache (or ``cache_bytes``)."""
    cache = last_level_cache_bytes(device) if cache_bytes is None else cache_bytes
    return max(minimum, math.ceil(4 * cache / max(1, bytes_per_copy)))


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    if device.type == "cuda":

        def time_cuda(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return time_cuda

    def time_cpu(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return time_cpu


def run_cases(cases: list[Case], device: torch.device, repeats: int = 11, warmup: int = 2, progress=None) -> list[Result]:
    """Times every case: fourbit and its peers interleaved, ``warmup`` untimed rounds, median of ``repeats`` (on a GPU,
    each sample averages 10 consecutive calls)."""
    timer = _timer(device)
    calls = 10 if device.type == "cuda" else 1
    results = []
    for case in cases:
        contenders = {"fourbit": case.fourbit, **case.peers}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(warmup + repeats):
            for name, fn in contenders.items():
                # On a GPU one sample is several back-to-back calls (each on the next copy of the inputs): a single
                # call of a microsecond kernel would time the host's dispatch, not the kernel.
                t = timer(lambda: [fn(r * calls + j) for j in range(calls)]) / calls
                if r >= warmup:
                    times[name].append(t)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        fourbit_ms = medians.pop("fourbit")
        gbps = case.bytes_moved / (fourbit_ms * 1e-3) / 1e9 if case.bytes_moved else 0.0
        results.append(Result(case.name, fourbit_ms, medians, gbps, case.target))
        if progress is not None:
            progress(results[-1])
    return results


def format_table(results: list[Result]) -> str:
    rows = [("case", "fourbit ms", "GB/s", "peer", "peer ms", "peer/fourbit", "target")]
    for res in results:
        peers = list(res.peer_ms) or ["-"]
        for i, peer in enumerate(peers):
            target = ""
            if res.target and res.target[0] == peer:
                verdict = "met" if res.meets_target() else "MISSED"
                target = f">= {res.target[1]:g}x ({verdict})"
            rows.append(
                (
                    res.name if i == 0 else "",
                    f"{res.fourbit_ms:.3f}" if i == 0 else "",
                    f"{res.gbps:.1f}" if i == 0 and res.gbps else "",
                    peer,
                    f"{res.peer_ms[peer]:.3f}" if peer in res.peer_ms else "",
                    f"{res.ratio(peer):.2f}x" if peer in res.peer_ms else "",
                    target,
                )
            )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _bitsandbytes():
    """bitsandbytes' functional module, or None when it is not installed (quietly: it logs on import)."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def quant_cases(
    device: torch.device,
    shape=(4096, 4096),
    quant_type: str = "nf4",
    blocksize: int = 64,
    cache_bytes: int | None = None,
) -> list[Case]:
    """quantize_4bit and dequantize_4bit (to fp32 and bf16) against bitsandbytes, and against the memory floor
    (``fill_`` / ``copy_`` of a tensor of the output's size). ``cache_bytes`` overrides the detected last-level cache
    size that sets how many input copies are rotated (smoke tests make it small)."""
    bnb = _bitsandbytes() if device.type == "cpu" else None
    n = math.prod(shape)
    copies = rotations(n * 4, device, cache_bytes)
    weights = [torch.randn(shape, device=device) for _ in range(copies)]
    packed_bytes = (n + 1) // 2 + 4 * math.ceil(n / blocksize)
    cases = []

    quant_peers = {}
    if bnb is not None:
        quant_peers["bitsandbytes"] = lambda i: bnb.quantize_4bit(weights[i % copies], blocksize=blocksize, quant_type=quant_type)
    cases.append(
        Case(
            f"quantize_4bit fp32 -> {quant_type} {shape[0]}x{shape[1]}",
            lambda i: fourbit.quantize_4bit(weights[i % copies], blocksize, quant_type),
            quant_peers,
            bytes_moved=n * 4 + packed_bytes,
            target=("bitsandbytes", 20.0) if bnb is not None else None,
        )
    )
    q_copies = rotations(packed_bytes, device, cache_bytes)
    quantized = [fourbit.quantize_4bit(weights[i % copies], blocksize, quant_type) for i in range(q_copies)]
    bnb_quantized = (
        [bnb.quantize_4bit(weights[i % copies], blocksize=blocksize, quant_type=quant_type) for i in range(q_copies)]
        if bnb is not None
        else []
    )
    for out_dtype in (torch.float32, torch.bfloat16):
        dname = {torch.float32: "fp32", torch.bfloat16: "bf16"}[out_dtype]
        size = n * out_dtype.itemsize
        out_copies = rotations(size, device, cache_bytes)
        # zeros, not empty: the first write to fresh pages would otherwise be timed as page faults.
        outs = [torch.zeros(shape, dtype=out_dtype, device=device) for _ in range(out_copies)]
        peers = {}
        if bnb is not None:
            # bitsandbytes dequantizes to the state's dtype; give it states of the wanted dtype.
            for packed, state in bnb_quantized:
                state.dtype = out_dtype
            peers["bitsandbytes"] = lambda i: bnb.dequantize_4bit(*bnb_quantized[i % q_copies])
        peers["torch.empty+fill_"] = lambda i, dt=out_dtype: torch.empty(shape, dtype=dt, device=device).fill_(1.0)
        cases.append(
            Case(
                f"dequantize_4bit {quant_type} -> {dname} (allocating)",
                lambda i, dt=out_dtype: fourbit.dequantize_4bit(*quantized[i % q_copies], dt),
                peers,
                bytes_moved=packed_bytes + size,
                target=("bitsandbytes", 5.0) if bnb is not None else None,
            )
        )
        floor_name = "fill_" if device.type == "cpu" else "copy_"
        src = torch.empty(shape, dtype=out_dtype, device=device)
        floor = (
            (lambda i, o=outs: o[i % out_copies].fill_(1.0))
            if device.type == "cpu"
            else (lambda i, o=outs, s=src: o[i % out_copies].copy_(s))
        )
        cases.append(
            Case(
                f"dequantize_4bit {quant_type} -> {dname} (into out=)",
                lambda i, o=outs: fourbit.dequantize_4bit(*quantized[i % q_copies], out=o[i % out_copies]),
                {floor_name: floor},
                bytes_moved=packed_bytes + size,
                # "within 1.5x of fill_": fill_time / fourbit_time >= 1 / 1.5
                target=(floor_name, 1 / 1.5) if device.type == "cpu" and out_dtype == torch.float32 else None,
            )
        )
    return cases


def write_json(results: list[Result], path: str | Path, meta: dict[str, Any]) -> None:
    payload = {"meta": meta, "results": [r.as_dict() for r in results]}
    Path(path).write_text(json.dumps(payload, indent=2))


def plot(results: list[Result], path: str | Path, title: str) -> None:
    """A bar chart of peer time / fourbit time per case and peer (needs matplotlib: pip install fourbit[bench])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios = [], []
    for res in results:
        for peer in res.peer_ms:
            labels.append(f"{res.name}\nvs {peer}")
            ratios.append(res.ratio(peer))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    ax.barh(range(len(labels)), ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("peer time / fourbit time (higher is better for fourbit)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def matmul_cases(
    device: torch.device,
    shape=(4096, 4096),
    layers: int = 16,
    dtypes=(torch.float32, torch.bfloat16),
    batches=(1, 16, 512),
) -> list[Case]:
    """matmul_4bit against the dense layer of the same dtype and bitsandbytes' matmul_4bit (NF4, blocksize 64,
    double quantization). Batch 1: forward through a stack of ``layers`` layers, so that the weights exceed the
    cache. Larger batches: forward + backward (gradient to x) of one layer."""
    import torch.nn.functional as F

    bnb_functional = _bitsandbytes() if device.type == "cpu" else None
    n, k = shape
    masters = [torch.randn(shape, device=device) / k**0.5 for _ in range(layers)]
    ours = [fourbit.quantize_4bit(w, 64, "nf4", compress_statistics=True) for w in masters]
    cases = []
    for dtype in dtypes:
        dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        dense = [w.to(dtype) for w in masters]
        peers_quant = []
        if bnb_functional is not None:
            import bitsandbytes as bnb

            for w in masters:
                packed, state = bnb_functional.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4",
                                                             compress_statistics=True)  # fmt: skip
                peers_quant.append((packed, state))
        for batch in batches:
            x = torch.randn(batch, k, device=device, dtype=dtype)
            if batch == 1:
                peers = {"dense": lambda i, x=x, d=dense: [F.linear(x, w) for w in d]}
                if peers_quant:
                    peers["bitsandbytes"] = lambda i, x=x: [bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in peers_quant]
                cases.append(
                    Case(
                        f"matmul_4bit {dname} batch 1, forward, {layers} layers {n}x{k}",
                        lambda i, x=x: [fourbit.matmul_4bit(x, p, s) for p, s in ours],
                        peers,
                        bytes_moved=sum(p.numel() + s.absmax.numel() for p, s in ours),
                        target=("dense", 1.5),
                    )
                )
                continue
            xg = x.clone().requires_grad_()
            grad = torch.randn(batch, n, device=device, dtype=dtype)

            def ours_fwd_bwd(i, xg=xg, grad=grad):
                p, s = ours[i % layers]
                torch.autograd.grad(fourbit.matmul_4bit(xg, p, s), xg, grad)

            def dense_fwd_bwd(i, xg=xg, grad=grad, d=dense):
                torch.autograd.grad(F.linear(xg, d[i % layers]), xg, grad)

            peers = {"dense": dense_fwd_bwd}
            if peers_quant:

                def bnb_fwd_bwd(i, xg=xg, grad=grad):
                    p, s = peers_quant[i % layers]
                    torch.autograd.grad(bnb.matmul_4bit(xg, p.t(), quant_state=s), xg, grad)

                peers["bitsandbytes"] = bnb_fwd_bwd
            cases.append(
                Case(
                    f"matmul_4bit {dname} batch {batch}, forward+backward {n}x{k}",
                    ours_fwd_bwd,
                    peers,
                    bytes_moved=0,
                    target=("dense", 1.0 if batch <= 16 else 1 / 1.15),
                )
            )
    return cases


def lora_cases(
    device: torch.device,
    shape=(4096, 4096),
    layers: int = 16,
    rank: int = 16,
    dtypes=(torch.float32, torch.bfloat16),
    batches=(1, 16, 512),
) -> list[Case]:
    """The QLoRA layer (``LoRALinear`` over ``Linear4bit``, NF4 blocksize 64 with double quantization, rank 16)
    against an unquantized LoRA layer of the same dtype (PEFT over ``nn.Linear`` when PEFT is installed) and PEFT's
    LoRA over bitsandbytes' ``Linear4bit``. Batch 1: forward through ``layers`` layers (weights beyond the cache);
    larger batches: forward + backward of one layer (gradients to x and the adapters)."""
    from torch import nn

    from .nn import Linear4bit, LoRALinear

    try:
        import peft
    except ImportError:
        peft = None
    bnb_functional = _bitsandbytes() if device.type == "cpu" else None
    n, k = shape
    torch.manual_seed(0)
    masters = [nn.Linear(k, n, device=device) for _ in range(layers)]

    def stack(dtype, kind):
        """A stack of `layers` LoRA layers: "fourbit" (QLoRA), "dense" (LoRA over nn.Linear), "bnb" (PEFT QLoRA)."""
        if kind == "fourbit":
            mods = [LoRALinear(Linear4bit.from_linear(m, compute_dtype=dtype), r=rank, lora_alpha=rank,
                               init_lora_weights=False) for m in masters]  # fmt: skip
            return nn.Sequential(*mods).to(device)
        if kind == "dense":
            base = nn.Sequential(*[nn.Linear(k, n, device=device) for _ in range(layers)])
            base.load_state_dict(nn.Sequential(*masters).state_dict())
            base = base.to(dtype)
        else:
            import bitsandbytes as bnb

            mods = []
            for m in masters:
                q = bnb.nn.Linear4bit(k, n, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)  # fmt: skip
                q.bias = nn.Parameter(m.bias.data.to(dtype))
                mods.append(q.to(device))
            base = nn.Sequential(*mods)
        if peft is None:
            return nn.Sequential(*[LoRALinear(m, r=rank, lora_alpha=rank, init_lora_weights=False) for m in base])
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=[str(i) for i in range(layers)],
                                 init_lora_weights=False)  # fmt: skip
        return peft.get_peft_model(base, config)

    kinds = ["fourbit", "dense"] + (["bnb"] if bnb_functional is not None and peft is not None else [])
    peer_names = {"dense": "unquantized LoRA", "bnb": "PEFT+bitsandbytes"}
    cases = []
    for dtype in dtypes:
        dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        models = {kind: stack(dtype, kind) for kind in kinds}
        for batch in batches:
            x = torch.randn(batch, k, device=device, dtype=dtype)
            if batch == 1:

                def forward_stack(i, model, x=x):
                    with torch.no_grad():
                        for layer in (model.base_model.model if hasattr(model, "base_model") else model):
                            layer(x)

                run = {kind: (lambda i, m=models[kind], f=forward_stack: f(i, m)) for kind in kinds}
                cases.append(
                    Case(f"QLoRA {dname} batch 1, forward, {layers} layers {n}x{k} r{rank}", run.pop("fourbit"),
                         {peer_names[kind]: fn for kind, fn in run.items()}, target=("unquantized LoRA", 1.5))  # fmt: skip
                )
                continue
            xg = x.clone().requires_grad_()

            def forward_backward(i, model, xg=xg):
                seq = model.base_model.model if hasattr(model, "base_model") else model
                layer = seq[i % layers]
                params = [p for p in layer.parameters() if p.requires_grad]
                y = layer(xg)
                torch.autograd.grad(y, [xg, *params], torch.ones_like(y))

            run = {kind: (lambda i, m=models[kind], f=forward_backward: f(i, m)) for kind in kinds}
            target = ("unquantized LoRA", 1.0 if batch <= 16 else 1 / 1.15)
            cases.append(
                Case(f"QLoRA {dname} batch {batch}, forward+backward {n}x{k} r{rank}", run.pop("fourbit"),
                     {peer_names[kind]: fn for kind, fn in run.items()}, target=target)  # fmt: skip
            )
    return cases


def _peak_memory_child(kind: str, dtype_name: str, batch: int, n: int, k: int, rank: int) -> None:
    """Runs in a fresh process (see peak_memory): one layer forward + backward, printing the growth of peak RSS
    (VmHWM) over the RSS after setup, in bytes. Linux only (/proc/self/clear_refs resets the peak)."""
    import json as json_module

    from torch import nn

    from .nn import Linear4bit, LoRALinear

    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    dense = nn.Linear(k, n)
    if kind == "fourbit":
        layer = LoRALinear(Linear4bit.from_linear(dense, compute_dtype=dtype), r=rank, lora_alpha=rank,
                           init_lora_weights=False)  # fmt: skip
    elif kind == "dense":
        layer = LoRALinear(dense.to(dtype), r=rank, lora_alpha=rank, init_lora_weights=False)
        layer.base_layer.requires_grad_(False)
    else:
        import bitsandbytes as bnb
        import peft

        q = bnb.nn.Linear4bit(k, n, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)  # fmt: skip
        wrapper = nn.Sequential(q.to("cpu"))
        layer = peft.get_peft_model(wrapper, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
    x = torch.randn(batch, k, dtype=dtype, requires_grad=True)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    y = layer(x)
    y.float().square().sum().backward()
    print(json_module.dumps({"extra_peak_bytes": status("VmHWM:") - before}))


def peak_memory(kind: str, dtype: torch.dtype, batch: int, shape=(4096, 4096), rank: int = 16) -> int:
    """Extra peak resident memory (bytes) of one forward + backward of a LoRA layer, measured in a fresh process:
    "fourbit" (LoRALinear over Linear4bit), "dense" (LoRALinear over nn.Linear) or "bnb" (PEFT over bitsandbytes)."""
    import subprocess
    import sys

    code = (
        "from fourbit.benchmark import _peak_memory_child; "
        f"_peak_memory_child({kind!r}, {str(dtype).removeprefix('torch.')!r}, {batch}, {shape[0]}, {shape[1]}, {rank})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_peak_bytes"]


def memory_report(shape=(4096, 4096), dtypes=(torch.float32, torch.bfloat16), batches=(16, 512)) -> str:
    """A table of extra peak memory per layer forward + backward, and fourbit's extra over the unquantized LoRA
    layer as a share of the dequantized weight's bytes (the spec's target: <= 25%)."""
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401

        kinds = ("fourbit", "dense", "bnb")
    except ImportError:
        kinds = ("fourbit", "dense")
    rows = [("dtype", "batch", *[f"{k} MiB" for k in kinds], "fourbit - dense, % of dequantized W")]
    for dtype in dtypes:
        weight_bytes = shape[0] * shape[1] * dtype.itemsize
        for batch in batches:
            peaks = {kind: peak_memory(kind, dtype, batch, shape) for kind in kinds}
            share = 100 * (peaks["fourbit"] - peaks["dense"]) / weight_bytes
            rows.append((str(dtype).removeprefix("torch."), str(batch), *[f"{peaks[k] / 2**20:.1f}" for k in kinds],
                         f"{share:.1f}%"))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def qat_cases(device: torch.device, shape=(4096, 4096), cache_bytes: int | None = None) -> list[Case]:
    """fake_quantize against PyTorch's own fake-quant ops (per tensor, per channel, per group as channels of the
    [groups, group_size] view, and the learnable LSQ ops), forward and forward + backward; fake_quantize_4bit
    against quantize_4bit + dequantize_4bit composed (fourbit's, and bitsandbytes' on the CPU when installed)."""
    n_out, k = shape
    n = n_out * k
    copies = rotations(n * 4, device, cache_bytes)
    weights = [torch.randn(shape, device=device) for _ in range(copies)]
    grads = [torch.randn(shape, device=device) for _ in range(copies)]
    cases = []

    # ---- affine: int8 per tensor and per channel, int4 per group of 32 ----
    scale_t, zp_t = torch.tensor([0.02], device=device), torch.tensor([3], dtype=torch.int32, device=device)
    cases.append(Case(
        "fake_quantize int8 per-tensor fp32 forward",
        lambda i: fourbit.fake_quantize(weights[i % copies], scale_t, zp_t, -128, 127),
        {"torch.fake_quantize_per_tensor_affine": lambda i: torch.fake_quantize_per_tensor_affine(
            weights[i % copies], 0.02, 3, -128, 127)},
        bytes_moved=2 * 4 * n,
    ))  # fmt: skip
    scale_c = torch.rand(n_out, device=device) * 0.02 + 0.01
    zp_c = torch.randint(-10, 10, (n_out,), dtype=torch.int32, device=device)
    cases.append(Case(
        "fake_quantize int8 per-channel fp32 forward",
        lambda i: fourbit.fake_quantize(weights[i % copies], scale_c, zp_c, -128, 127, axis=0),
        {"torch.fake_quantize_per_channel_affine": lambda i: torch.fake_quantize_per_channel_affine(
            weights[i % copies], scale_c, zp_c, 0, -128, 127)},
        bytes_moved=2 * 4 * n,
    ))  # fmt: skip
    group = 32
    scale_g = torch.rand(n_out, k // group, device=device) * 0.2 + 0.1
    zp_g = torch.zeros(n_out, k // group, dtype=torch.int32, device=device)
    cases.append(Case(
        f"fake_quantize int4 per-group({group}) fp32 forward",
        lambda i: fourbit.fake_quantize(weights[i % copies], scale_g, zp_g, -8, 7, group_size=group),
        {"torch per-channel on [groups, 32]": lambda i: torch.fake_quantize_per_channel_affine(
            weights[i % copies].view(-1, group), scale_g.view(-1), zp_g.view(-1), 0, -8, 7)},
        bytes_moved=2 * 4 * n,
    ))  # fmt: skip
    leaves = [w.clone().requires_grad_() for w in weights]

    def ours_ste(i):
        x = leaves[i % copies]
        fourbit.fake_quantize(x, scale_c, zp_c, -128, 127, axis=0).backward(grads[i % copies])
        x.grad = None

    def torch_ste(i):
        x = leaves[i % copies]
        torch.fake_quantize_per_channel_affine(x, scale_c, zp_c, 0, -128, 127).backward(grads[i % copies])
        x.grad = None

    cases.append(Case("fake_quantize int8 per-channel fp32 forward+backward (STE)", ours_ste,
                      {"torch.fake_quantize_per_channel_affine": torch_ste}, bytes_moved=5 * 4 * n))  # fmt: skip
    s_learn = scale_c.clone().requires_grad_()
    z_learn = zp_c.float().requires_grad_()
    gf = 1.0 / (n * 127) ** 0.5

    def ours_lsq(i):
        x = leaves[i % copies]
        fourbit.fake_quantize(x, s_learn, z_learn, -128, 127, axis=0, grad_factor=gf).backward(grads[i % copies])
        x.grad = s_learn.grad = z_learn.grad = None

    def torch_lsq(i):
        x = leaves[i % copies]
        torch._fake_quantize_learnable_per_channel_affine(x, s_learn, z_learn, 0, -128, 127, gf).backward(
            grads[i % copies])
        x.grad = s_learn.grad = z_learn.grad = None

    cases.append(Case("fake_quantize int8 per-channel fp32 forward+backward (LSQ)", ours_lsq,
                      {"torch._fake_quantize_learnable_per_channel_affine": torch_lsq}, bytes_moved=5 * 4 * n))  # fmt: skip
    s_tensor = torch.tensor([0.02], device=device, requires_grad=True)
    z_tensor = torch.tensor([3.0], device=device, requires_grad=True)

    def ours_lsq_tensor(i):
        x = leaves[i % copies]
        fourbit.fake_quantize(x, s_tensor, z_tensor, -128, 127, grad_factor=gf).backward(grads[i % copies])
        x.grad = s_tensor.grad = z_tensor.grad = None

    def torch_lsq_tensor(i):
        x = leaves[i % copies]
        torch._fake_quantize_learnable_per_tensor_affine(x, s_tensor, z_tensor, -128, 127, gf).backward(
            grads[i % copies])
        x.grad = s_tensor.grad = z_tensor.grad = None

    cases.append(Case("fake_quantize int8 per-tensor fp32 forward+backward (LSQ)", ours_lsq_tensor,
                      {"torch._fake_quantize_learnable_per_tensor_affine": torch_lsq_tensor},
                      bytes_moved=5 * 4 * n))  # fmt: skip

    # ---- 4-bit: one pass against quantize + dequantize ----
    bnb = _bitsandbytes() if device.type == "cpu" else None
    for dtype in (torch.float32, torch.bfloat16):
        dname = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        inputs = [w.to(dtype) for w in weights]
        for nested in (False, True):
            peers = {"fourbit quantize_4bit + dequantize_4bit": lambda i, xs=inputs, d=nested: fourbit.dequantize_4bit(
                *fourbit.quantize_4bit(xs[i % copies], 64, "nf4", compress_statistics=d))}
            if bnb is not None:
                peers["bitsandbytes quantize_4bit + dequantize_4bit"] = lambda i, xs=inputs, d=nested: (
                    bnb.dequantize_4bit(*bnb.quantize_4bit(xs[i % copies], blocksize=64, quant_type="nf4",
                                                           compress_statistics=d)))  # fmt: skip
            cases.append(Case(
                f"fake_quantize_4bit nf4 {dname}{' double-quant' if nested else ''}",
                lambda i, xs=inputs, d=nested: fourbit.fake_quantize_4bit(xs[i % copies], "nf4", 64, d),
                peers,
                bytes_moved=2 * dtype.itemsize * n,
            ))  # fmt: skip
    return cases
