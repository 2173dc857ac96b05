# SPDX-License-Identifier: Apache-2.0
"""Concurrency and determinism (product.md section 4): the ops called from several Python threads at once give what
serial calls give; quantize, dequantize and fake-quant write identical bytes on any number of intra-op threads and in
another process (run after run)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import fourbit


def _inputs():
    g = torch.Generator().manual_seed(7)
    # Odd sizes (tail blocks, odd element counts), every dtype, and a non-contiguous view.
    return [
        torch.randn(515, 131, generator=g),
        torch.randn(3, 300, 33, generator=g).to(torch.bfloat16),
        torch.randn(1 << 15, generator=g).to(torch.float16),
        torch.randn(300, 128, generator=g).t(),
    ]


def _deterministic_work():
    """(name, thunk) pairs whose results must be bit-identical everywhere."""
    work = []
    for i, x in enumerate(_inputs()):
        for blocksize, quant_type, nested in ((64, "nf4", False), (4096, "fp4", True), (32, "nf4", True)):
            tag = f"{i}-{blocksize}-{quant_type}-{nested}"

            def quant(x=x, b=blocksize, q=quant_type, n=nested):
                packed, state = fourbit.quantize_4bit(x, b, q, n)
                parts = [packed, state.absmax]
                if n:
                    parts += [state.state2.absmax, state.offset]
                return parts + [fourbit.dequantize_4bit(packed, state), fourbit.dequantize_4bit(packed, state, torch.bfloat16)]

            work.append((f"quantize+dequantize-{tag}", quant))
            work.append((f"fake_quantize_4bit-{tag}",
                         lambda x=x, b=blocksize, q=quant_type, n=nested: [fourbit.fake_quantize_4bit(x, q, b, n)]))
        work.append((f"fake_quantize-{i}", lambda x=x: [fourbit.fake_quantize(x, 0.05, 3, -8, 7)]))
        if x.dim() == 2:
            scale = x.float().abs().amax(dim=0).clamp(min=1e-3) / 127
            work.append((f"fake_quantize-per-channel-{i}",
                         lambda x=x, s=scale: [fourbit.fake_quantize(x, s, torch.zeros_like(s, dtype=torch.int32),
                                                                     -128, 127, axis=1)]))  # fmt: skip
    return work


def _matmul_work():
    """(name, thunk) pairs compared with a tolerance (BLAS may split its sums differently)."""
    g = torch.Generator().manual_seed(3)
    packed, state = fourbit.quantize_4bit(torch.randn(384, 256, generator=g), 64, compress_statistics=True)
    A, B = torch.randn(8, 256, generator=g), torch.randn(384, 8, generator=g)
    work = []
    for batch in (1, 5, 96):
        x = torch.randn(batch, 256, generator=g)
        work.append((f"matmul-{batch}", lambda x=x: [fourbit.matmul_4bit(x, packed, state)]))
        work.append((f"lora_linear-{batch}", lambda x=x: [fourbit.lora_linear(x, packed, state, A, B, 0.5)]))
    return work


def _run_all(work):
    return {name: [t.clone() for t in thunk()] for name, thunk in work}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _digest(results) -> str:
    h = hashlib.sha256()
    for name in sorted(results):
        h.update(name.encode())
        for t in results[name]:
            h.update(_bytes(t).numpy().tobytes())
    return h.hexdigest()


def _assert_identical(a, b, context):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert x.dtype == y.dtype and x.shape == y.shape, f"{context}: {name}"
            assert torch.equal(_bytes(x), _bytes(y)), f"{context}: {name} differs"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_same_bytes_on_any_thread_count(restore_threads):
    work = _deterministic_work()
    torch.set_num_threads(1)
    serial = _run_all(work)
    for threads in (2, 3, 5):
        torch.set_num_threads(threads)
        _assert_identical(serial, _run_all(work), f"{threads} intra-op threads")


def test_python_threads_at_once_match_serial_calls():
    work = _deterministic_work()
    mm_work = _matmul_work()
    serial, serial_mm = _run_all(work), _run_all(mm_work)
    barrier = threading.Barrier(4)

    def worker(k):
        barrier.wait()  # all four start together
        order = (work + mm_work)[k:] + (work + mm_work)[:k]  # each thread in another order
        return {name: [t.clone() for t in thunk()] for name, thunk in order}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    for k, res in enumerate(results):
        _assert_identical(serial, {n: res[n] for n in serial}, f"python thread {k}")
        for name in serial_mm:
            for x, y in zip(serial_mm[name], res[name]):
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=f"python thread {k}: {name}")


def test_python_threads_share_one_layer():
    # One Linear4bit / QLoRA layer used by several threads at once (inference servers do this).
    torch.manual_seed(0)
    base = fourbit.nn.Linear4bit.from_linear(torch.nn.Linear(256, 128))
    layer = fourbit.nn.LoRALinear(base, r=8, init_lora_weights=False).eval()
    xs = [torch.randn(b, 256) for b in (1, 2, 7, 33, 64, 1, 3, 20)]
    with torch.no_grad():
        serial = [layer(x) for x in xs]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(layer, xs))
    for s, p in zip(serial, parallel):
        torch.testing.assert_close(p, s, rtol=1e-5, atol=1e-5)


def test_same_bytes_in_another_process_with_other_thread_counts(restore_threads):
    # Run after run: a fresh interpreter with one OpenMP thread hashes the same outputs to the same digest.
    torch.set_num_threads(2)
    here = _digest(_run_all(_deterministic_work()))
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_concurrency as t
        print("digest", t._digest(t._run_all(t._deterministic_work())))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"digest {here}" in proc.stdout
