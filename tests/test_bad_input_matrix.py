# SPDX-License-Identifier: Apache-2.0
"""The bad-input matrix: every public op and layer against wrong dtypes, devices, shapes, strides, ranks, blocksizes,
quant types, NaN/inf scales and quant states that disagree with the packed data.

Each case must raise the expected Python exception with a message that names the argument and the value it got
(product.md section 4). Cases that lie to the kernels directly (torch.ops.fourbit.* with metadata that disagrees with
the buffers) run in a subprocess as well, so that an out-of-bounds access would show as a dead process rather than
take pytest down; scripts/sanitize.sh runs this file under AddressSanitizer. tests/test_bad_input.py holds the first,
hand-written cases; this file is the systematic pass.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import fourbit
from fourbit import QuantState
from fourbit.nn import Linear4bit, LoRALinear

from conftest import requires_gpu

ops = torch.ops.fourbit


@dataclass
class Case:
    id: str
    call: Callable[[], object]
    error: type[BaseException]
    match: str  # regex that names the argument and the value
    lies_to_kernel: bool = False  # also run in a subprocess (see test_lying_calls_in_a_subprocess)


def _q(shape=(32, 64), blocksize=64, quant_type="nf4", nested=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return fourbit.quantize_4bit(torch.randn(shape, generator=g).to(dtype), blocksize, quant_type, nested)


def _with(state: QuantState, **changes) -> QuantState:
    """A copy of ``state`` with fields replaced, built without validation (what a careless caller can do)."""
    fields = dict(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                  quant_type=state.quant_type, dtype=state.dtype, offset=state.offset, state2=state.state2)  # fmt: skip
    fields.update(changes)
    return QuantState(**fields, validate=False)


def _with_nested(state: QuantState, **changes) -> QuantState:
    s2 = state.state2
    fields = dict(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
    fields.update(changes)
    return _with(state, state2=QuantState(**fields, validate=False))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, every other element of a buffer twice as long: non-contiguous."""
    flat = t.reshape(-1)
    return torch.stack([flat, flat], dim=1)[:, 0].reshape(t.shape)


def _deq_op(packed, state, **over):
    """Direct dequantize_4bit op call with state's metadata, any argument overridable."""
    absmax, na, nc, off, nbs = state.op_args()
    args = dict(packed=packed, absmax=absmax, blocksize=state.blocksize, quant_type=state.quant_type,
                shape=list(state.shape), dtype=state.dtype, nested_absmax=na, nested_code=nc, offset=off,
                nested_blocksize=nbs)  # fmt: skip
    args.update(over)
    return ops.dequantize_4bit(**args)


def _mm_op(x, packed, state, **over):
    absmax, na, nc, off, nbs = state.op_args()
    args = dict(x=x, packed=packed, absmax=absmax, blocksize=state.blocksize, quant_type=state.quant_type,
                shape=list(state.shape), bias=None, nested_absmax=na, nested_code=nc, offset=off,
                nested_blocksize=nbs)  # fmt: skip
    args.update(over)
    return ops.matmul_4bit(**args)


def _state_dict(nested=False, quant_type="nf4", shape=(32, 64)):
    layer = Linear4bit.from_linear(torch.nn.Linear(shape[1], shape[0]), quant_type=quant_type,
                                   compress_statistics=nested)  # fmt: skip
    return layer.state_dict()


def _blob_key(sd):
    return next(k for k in sd if "quant_state" in k)


def _with_blob(sd, **changes):
    """The state dict with fields of the JSON blob replaced (a key mapped to ... is removed)."""
    key = _blob_key(sd)
    values = json.loads(bytes(sd[key].tolist()))
    for k, v in changes.items():
        if v is ...:
            values.pop(k)
        else:
            values[k] = v
    out = dict(sd)
    out[key] = torch.tensor(list(json.dumps(values).encode()), dtype=torch.uint8)
    return out


def _load(sd, nested=False, shape=(32, 64)):
    Linear4bit(shape[1], shape[0], compress_statistics=nested).load_state_dict(sd)


def _qs_dict(nested=False, **changes):
    """QuantState.as_dict(packed=True) of a [32, 64] weight (keys relative to ``weight.``), entries replaced."""
    packed, state = _q(nested=nested)
    d = state.as_dict(packed=True)
    blob_changes = {k: v for k, v in changes.items() if k in ("shape", "blocksize", "dtype", "quant_type",
                                                             "nested_blocksize", "nested_offset", "nested_dtype")}
    if blob_changes:
        d = {k[len("weight."):]: v for k, v in _with_blob({"weight." + k: v for k, v in d.items()},
                                                          **blob_changes).items()}  # fmt: skip
    for k, v in changes.items():
        if k in blob_changes:
            continue
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return d


def _lora(x=None, lora_A=None, lora_B=None, scaling=2.0, bias=None, lora_x=None, state=None, packed=None):
    p, s = _q()
    return fourbit.lora_linear(
        torch.randn(3, 64) if x is None else x, p if packed is None else packed, s if state is None else state,
        torch.randn(4, 64) if lora_A is None else lora_A, torch.randn(32, 4) if lora_B is None else lora_B,
        scaling, bias, lora_x,
    )  # fmt: skip


def _multi(x=None, lora_A=None, lora_B=None, scaling=None, index=None):
    p, s = _q()
    return fourbit.lora_linear_multi(
        torch.randn(3, 64) if x is None else x, p, s,
        torch.randn(2, 4, 64) if lora_A is None else lora_A, torch.randn(2, 32, 4) if lora_B is None else lora_B,
        torch.ones(2) if scaling is None else scaling, torch.tensor([0, 1, -1]) if index is None else index,
    )  # fmt: skip


def _lora_layer(**kwargs):
    return LoRALinear(torch.nn.Linear(64, 32), **kwargs)


def _cases() -> list[Case]:
    P, S = _q()
    PN, SN = _q(nested=True)
    x = torch.randn(3, 64)
    nan = float("nan")
    c: list[Case] = []
    add = lambda *a, **k: c.append(Case(*a, **k))  # noqa: E731

    # ---------------------------------------------------------------- quantize_4bit
    for dt in (torch.int32, torch.int64, torch.float64, torch.bool, torch.uint8, torch.complex64, torch.int8):
        add(f"quantize-dtype-{dt}", lambda dt=dt: fourbit.quantize_4bit(torch.ones(64, dtype=dt)), TypeError,
            rf"A \(the tensor to quantize\) must be float32, float16 or bfloat16, got")
    for bad in ([1.0, 2.0], None, 3.0, "x"):
        add(f"quantize-A-{type(bad).__name__}", lambda bad=bad: fourbit.quantize_4bit(bad), TypeError,
            f"A must be a torch.Tensor, got {type(bad).__name__}")
    for bs in (0, 1, 16, 31, 48, 100, 8192, -64, 1 << 20, 4095):
        add(f"quantize-blocksize-{bs}", lambda bs=bs: fourbit.quantize_4bit(torch.randn(128), bs), ValueError,
            rf"blocksize must be a power of two in \[32, 4096\], got {bs}")
    for qt in ("int4", "", "NF4", "nf4 ", "dynamic"):
        add(f"quantize-quant_type-{qt!r}", lambda qt=qt: fourbit.quantize_4bit(torch.randn(128), 64, qt), ValueError,
            f"quant_type must be 'nf4' or 'fp4', got '{qt}'")
    add("quantize-quant_storage-str", lambda: fourbit.quantize_4bit(torch.randn(64), quant_storage="uint8"),
        TypeError, "quant_storage must be a torch.dtype, got 'uint8'")
    for dt in (torch.int32, torch.float64):
        add(f"quantize-op-dtype-{dt}", lambda dt=dt: ops.quantize_4bit(torch.ones(10, dtype=dt), 64, "nf4"),
            TypeError, "A \\(the tensor to quantize\\) must be float32, float16 or bfloat16")

    # ---------------------------------------------------------------- dequantize_4bit (functional)
    add("dequantize-packed-list", lambda: fourbit.dequantize_4bit([1, 2], S), TypeError,
        "packed must be a torch.Tensor, got list")
    add("dequantize-state-dict", lambda: fourbit.dequantize_4bit(P, S.as_dict()), TypeError,
        "quant_state must be a fourbit.QuantState, got dict")
    add("dequantize-state-None", lambda: fourbit.dequantize_4bit(P, None), TypeError,
        "quant_state must be a fourbit.QuantState, got NoneType")
    for cut in (1, 2, P.numel() // 2, P.numel()):
        add(f"dequantize-packed-short-by-{cut}", lambda cut=cut: fourbit.dequantize_4bit(P[: P.numel() - cut], S),
            ValueError, rf"packed holds {P.numel() - cut} bytes but shape \[32, 64\] needs 1024", lies_to_kernel=True)
    add("dequantize-packed-strided", lambda: fourbit.dequantize_4bit(_strided(P), S), ValueError,
        r"packed must be contiguous, got strides \[2, ")
    add("dequantize-packed-int32-short", lambda: fourbit.dequantize_4bit(P[:1000].view(-1).view(torch.int32), S),
        ValueError, r"packed holds 1000 bytes but shape \[32, 64\] needs 1024", lies_to_kernel=True)
    for shape in ((64, 64), (32, 65), (1 << 20,), (1 << 40, 2)):
        blocks = math.ceil(math.prod(shape) / 64)
        add(f"dequantize-shape-larger-{shape}", lambda shape=shape: fourbit.dequantize_4bit(P, _with(S, shape=shape)),
            ValueError, rf"packed holds 1024 bytes but shape \[{', '.join(map(str, shape))}\] needs", lies_to_kernel=True)
        add(f"dequantize-shape-larger-enough-bytes-{shape}",
            lambda shape=shape: fourbit.dequantize_4bit(torch.zeros(math.prod(shape) // 2 + 1, dtype=torch.uint8)
                                                        if math.prod(shape) < 1 << 24 else P, _with(S, shape=shape)),
            ValueError, rf"(absmax must have {blocks} values|packed holds)", lies_to_kernel=True)  # fmt: skip
    add("dequantize-shape-negative", lambda: _deq_op(P, S, shape=[-32, -64]), ValueError,
        r"shape must not have negative sizes, got \[-32, -64\]", lies_to_kernel=True)
    add("dequantize-shape-overflow", lambda: _deq_op(P, S, shape=[1 << 40, 1 << 40]), ValueError,
        r"shape \[1099511627776, 1099511627776\] has too many elements", lies_to_kernel=True)
    for n in (31, 33, 1, 0):
        add(f"dequantize-absmax-{n}-values", lambda n=n: fourbit.dequantize_4bit(P, _with(S, absmax=torch.ones(n))),
            ValueError, rf"absmax must have 32 values \(one per block of 64 for shape \[32, 64\]\), got shape \[{n}\]",
            lies_to_kernel=True)
    add("dequantize-absmax-2d", lambda: fourbit.dequantize_4bit(P, _with(S, absmax=S.absmax.reshape(4, 8))),
        ValueError, r"absmax must have 32 values .* got shape \[4, 8\]")
    add("dequantize-absmax-strided", lambda: fourbit.dequantize_4bit(P, _with(S, absmax=_strided(S.absmax))),
        ValueError, r"absmax must be contiguous, got strides \[2\]")
    for dt in (torch.float16, torch.float64, torch.int32, torch.bfloat16):
        add(f"dequantize-absmax-{dt}", lambda dt=dt: fourbit.dequantize_4bit(P, _with(S, absmax=S.absmax.to(dt))),
            TypeError, "absmax must be float32, got")
    add("dequantize-absmax-uint8-unnested", lambda: fourbit.dequantize_4bit(P, _with(S, absmax=SN.absmax)),
        TypeError, "absmax must be float32, got Byte \\(a uint8 absmax needs nested_absmax")
    for dt in (torch.float64, torch.int32, torch.uint8, torch.bool):
        add(f"dequantize-out_dtype-{dt}", lambda dt=dt: fourbit.dequantize_4bit(P, S, dt), TypeError,
            r"dtype \(the output dtype\) must be float32, float16 or bfloat16, got")
    for bs in (0, 16, 100, 8192, -64):
        add(f"dequantize-blocksize-{bs}", lambda bs=bs: fourbit.dequantize_4bit(P, _with(S, blocksize=bs)),
            ValueError, rf"blocksize must be a power of two in \[32, 4096\], got {bs}")
    add("dequantize-blocksize-lie-128", lambda: fourbit.dequantize_4bit(P, _with(S, blocksize=128)), ValueError,
        r"absmax must have 16 values \(one per block of 128", lies_to_kernel=True)
    add("dequantize-blocksize-lie-32", lambda: fourbit.dequantize_4bit(P, _with(S, blocksize=32)), ValueError,
        r"absmax must have 64 values \(one per block of 32", lies_to_kernel=True)
    for qt in ("int4", "NF4", ""):
        add(f"dequantize-quant_type-{qt!r}", lambda qt=qt: fourbit.dequantize_4bit(P, _with(S, quant_type=qt)),
            ValueError, f"quant_type must be 'nf4' or 'fp4', got '{qt}'")
    # out=
    add("dequantize-out-numel", lambda: fourbit.dequantize_4bit(P, S, out=torch.empty(2047)), ValueError,
        r"out must be contiguous with 2048 elements, got shape \[2047\]", lies_to_kernel=True)
    add("dequantize-out-numel-large", lambda: fourbit.dequantize_4bit(P, S, out=torch.empty(4096)), ValueError,
        r"out must be contiguous with 2048 elements, got shape \[4096\]")
    add("dequantize-out-strided", lambda: fourbit.dequantize_4bit(P, S, out=torch.empty(64, 32).t()), ValueError,
        r"out must be contiguous with 2048 elements, got shape \[32, 64\] and strides \[1, 32\]", lies_to_kernel=True)
    for dt in (torch.int32, torch.float64):
        add(f"dequantize-out-{dt}", lambda dt=dt: fourbit.dequantize_4bit(P, S, out=torch.empty(32, 64, dtype=dt)),
            TypeError, r"out must be float32, float16 or bfloat16, got torch\.(int32|float64)")
    add("dequantize-out-dtype-disagrees",
        lambda: fourbit.dequantize_4bit(P, S, torch.float16, out=torch.empty(32, 64)), ValueError,
        "out_dtype torch.float16 disagrees with out.dtype torch.float32")
    # double-quantized states that disagree with their scales
    for n in (0, 2, 100):
        add(f"dequantize-nested_absmax-{n}-values",
            lambda n=n: fourbit.dequantize_4bit(PN, _with_nested(SN, absmax=torch.ones(n))), ValueError,
            rf"nested_absmax must have 1 contiguous values \(32 blocks / nested_blocksize 256\), got shape \[{n}\]",
            lies_to_kernel=True)
    add("dequantize-nested_absmax-float16",
        lambda: fourbit.dequantize_4bit(PN, _with_nested(SN, absmax=SN.state2.absmax.half())), TypeError,
        "nested_absmax must be float32, got Half")
    for nbs in (100, 3, 0, -256):
        add(f"dequantize-nested_blocksize-{nbs}", lambda nbs=nbs: fourbit.dequantize_4bit(PN, _with_nested(SN, blocksize=nbs)),
            ValueError, f"nested_blocksize must be a positive power of two, got {nbs}")
    add("dequantize-nested_blocksize-lie-16", lambda: fourbit.dequantize_4bit(PN, _with_nested(SN, blocksize=16)),
        ValueError, r"nested_absmax must have 2 contiguous values \(32 blocks / nested_blocksize 16\)",
        lies_to_kernel=True)
    for n in (255, 16, 0, 257):
        add(f"dequantize-nested_code-{n}", lambda n=n: fourbit.dequantize_4bit(PN, _with_nested(SN, code=torch.ones(n))),
            ValueError, rf"nested_code must be 256 contiguous values, got shape \[{n}\]", lies_to_kernel=True)
    add("dequantize-nested_code-float64",
        lambda: fourbit.dequantize_4bit(PN, _with_nested(SN, code=SN.state2.code.double())), TypeError,
        "nested_code must be float32, got Double")
    add("dequantize-nested_code-strided",
        lambda: fourbit.dequantize_4bit(PN, _with_nested(SN, code=_strided(SN.state2.code))), ValueError,
        r"nested_code must be 256 contiguous values, got shape \[256\]")
    add("dequantize-offset-2-values", lambda: fourbit.dequantize_4bit(PN, _with(SN, offset=torch.ones(2))), ValueError,
        r"offset must hold one value, got shape \[2\]", lies_to_kernel=True)
    add("dequantize-offset-empty", lambda: fourbit.dequantize_4bit(PN, _with(SN, offset=torch.ones(0))), ValueError,
        r"offset must hold one value, got shape \[0\]", lies_to_kernel=True)
    add("dequantize-offset-float64", lambda: fourbit.dequantize_4bit(PN, _with(SN, offset=SN.offset.double())),
        TypeError, "offset must be float32, got Double")
    add("dequantize-nested-absmax-float32", lambda: fourbit.dequantize_4bit(PN, _with(SN, absmax=S.absmax)),
        TypeError, "absmax must be uint8 under double quantization, got Float")
    add("dequantize-nested-partial", lambda: _deq_op(PN, SN, nested_code=None), ValueError,
        "nested_absmax, nested_code and offset must be given together .*got nested_absmax, no nested_code, offset")
    add("dequantize-nested-offset-only", lambda: _deq_op(P, S, offset=torch.zeros(())), ValueError,
        "must be given together .*got no nested_absmax, no nested_code, offset")
    # the remaining direct ops
    add("double_quantize-float16", lambda: ops.double_quantize(S.absmax.half(), 256), TypeError,
        "absmax must be float32, got Half")
    add("double_quantize-2d", lambda: ops.double_quantize(S.absmax.reshape(4, 8), 256), ValueError,
        r"absmax must be 1-D, got shape \[4, 8\]")
    add("double_quantize-blocksize", lambda: ops.double_quantize(S.absmax, 100), ValueError,
        "nested_blocksize must be a power of two in \\[32, 4096\\], got 100")
    add("dequantize_absmax-2d", lambda: ops.dequantize_absmax(SN.absmax.reshape(4, 8), SN.state2.absmax,
                                                              SN.state2.code, SN.offset, 256),
        ValueError, r"qabsmax must be 1-D and contiguous, got shape \[4, 8\]")  # fmt: skip
    add("dequantize_absmax-nested-short", lambda: ops.dequantize_absmax(torch.zeros(600, dtype=torch.uint8),
                                                                       SN.state2.absmax, SN.state2.code, SN.offset, 256),
        ValueError, r"nested_absmax must have 3 contiguous values \(600 blocks", lies_to_kernel=True)  # fmt: skip
    add("dequantize_absmax-float-q", lambda: ops.dequantize_absmax(S.absmax, SN.state2.absmax, SN.state2.code,
                                                                  SN.offset, 256),
        TypeError, "absmax must be uint8 under double quantization, got Float")  # fmt: skip
    add("quant_map-unknown", lambda: ops.quant_map("int4"), ValueError, "quant_type must be 'nf4' or 'fp4', got 'int4'")

    # ---------------------------------------------------------------- matmul_4bit
    add("matmul-state-dict", lambda: fourbit.matmul_4bit(x, P, S.as_dict()), TypeError,
        "quant_state must be a fourbit.QuantState, got dict")
    for shape in ((2048,), (2, 32, 32), ()):
        add(f"matmul-weight-rank-{len(shape)}", lambda shape=shape: fourbit.matmul_4bit(x, P, _with(S, shape=shape)),
            ValueError, rf"matmul_4bit needs a 2-D weight, got quant_state.shape \({', '.join(map(str, shape))},?\)")
        add(f"matmul-op-weight-rank-{len(shape)}", lambda shape=shape: _mm_op(x, P, S, shape=list(shape)), ValueError,
            r"shape must be the weight's \[out_features, in_features\], got")
    for dt in (torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8):
        add(f"matmul-x-{dt}", lambda dt=dt: fourbit.matmul_4bit(torch.ones(3, 64, dtype=dt), P, S), TypeError,
            "x must be float32, float16, bfloat16 or float64, got")
    for shape in ((3, 63), (3, 65), (64, 3), (), (0,)):
        add(f"matmul-x-shape-{shape}", lambda shape=shape: fourbit.matmul_4bit(torch.randn(shape), P, S), ValueError,
            rf"x must end in in_features = 64, got shape \[{', '.join(map(str, shape))}\]")
    for shape in ((33,), (31,), (1, 32), (32, 1), ()):
        add(f"matmul-bias-{shape}", lambda shape=shape: fourbit.matmul_4bit(x, P, S, torch.randn(shape)), ValueError,
            rf"bias must have shape \[32\], got \[{', '.join(map(str, shape))}\]")
    add("matmul-packed-short", lambda: fourbit.matmul_4bit(x, P[:-1], S), ValueError,
        r"packed holds 1023 bytes but shape \[32, 64\] needs 1024", lies_to_kernel=True)
    add("matmul-packed-strided", lambda: fourbit.matmul_4bit(x, _strided(P), S), ValueError,
        r"packed must be contiguous")
    add("matmul-shape-larger", lambda: fourbit.matmul_4bit(torch.randn(3, 128), P, _with(S, shape=(32, 128))),
        ValueError, r"packed holds 1024 bytes but shape \[32, 128\] needs 2048", lies_to_kernel=True)
    add("matmul-shape-larger-batch", lambda: fourbit.matmul_4bit(torch.randn(300, 128), P, _with(S, shape=(32, 128))),
        ValueError, r"packed holds 1024 bytes but shape \[32, 128\] needs 2048", lies_to_kernel=True)
    add("matmul-absmax-short", lambda: fourbit.matmul_4bit(x, P, _with(S, absmax=S.absmax[:-1])), ValueError,
        r"absmax must have 32 values .* got shape \[31\]", lies_to_kernel=True)
    add("matmul-absmax-float16", lambda: fourbit.matmul_4bit(x, P, _with(S, absmax=S.absmax.half())), TypeError,
        "absmax must be float32, got Half")
    add("matmul-blocksize", lambda: fourbit.matmul_4bit(x, P, _with(S, blocksize=48)), ValueError,
        r"blocksize must be a power of two in \[32, 4096\], got 48")
    add("matmul-quant_type", lambda: fourbit.matmul_4bit(x, P, _with(S, quant_type="int4")), ValueError,
        "quant_type must be 'nf4' or 'fp4', got 'int4'")
    add("matmul-nested-short", lambda: fourbit.matmul_4bit(x, PN, _with_nested(SN, absmax=torch.ones(0))), ValueError,
        r"nested_absmax must have 1 contiguous values", lies_to_kernel=True)
    add("matmul-nested_code-short", lambda: fourbit.matmul_4bit(x, PN, _with_nested(SN, code=torch.ones(16))),
        ValueError, r"nested_code must be 256 contiguous values, got shape \[16\]", lies_to_kernel=True)
    add("matmul-large-batch-nested_code-short",
        lambda: fourbit.matmul_4bit(torch.randn(100, 64), PN, _with_nested(SN, code=torch.ones(16))),
        ValueError, r"nested_code must be 256 contiguous values, got shape \[16\]", lies_to_kernel=True)
    add("matmul_grad_x-shape", lambda: ops.matmul_4bit_grad_x(torch.randn(3, 31), P, S.absmax, 64, "nf4", [32, 64]),
        ValueError, r"grad_y must end in out_features = 32, got shape \[3, 31\]")
    add("matmul_grad_x-packed-short", lambda: ops.matmul_4bit_grad_x(torch.randn(3, 32), P[:10], S.absmax, 64, "nf4",
                                                                   [32, 64]),
        ValueError, r"packed holds 10 bytes but shape \[32, 64\] needs 1024", lies_to_kernel=True)  # fmt: skip

    # ---------------------------------------------------------------- lora_linear
    for dt in (torch.int32, torch.bool):
        add(f"lora-A-{dt}", lambda dt=dt: _lora(lora_A=torch.ones(4, 64, dtype=dt), lora_B=torch.ones(32, 4, dtype=dt)),
            TypeError, "lora_A must be a float tensor, got")
    add("lora-B-dtype", lambda: _lora(lora_B=torch.randn(32, 4, dtype=torch.float64)), TypeError,
        "lora_B must have lora_A's dtype Float, got Double")
    for shape in ((4, 63), (64, 4), (4,), (1, 4, 64)):
        add(f"lora-A-shape-{shape}", lambda shape=shape: _lora(lora_A=torch.randn(shape)), ValueError,
            rf"lora_A must have shape \[r, in_features = 64\], got \[{', '.join(map(str, shape))}\]")
    for shape in ((32, 5), (31, 4), (4, 32), (32,)):
        add(f"lora-B-shape-{shape}", lambda shape=shape: _lora(lora_B=torch.randn(shape)), ValueError,
            rf"lora_B must have shape \[out_features = 32, r = 4\], got \[{', '.join(map(str, shape))}\]")
    add("lora-lora_x-shape", lambda: _lora(lora_x=torch.randn(2, 64)), ValueError,
        r"lora_x must have x's shape \[3, 64\], got \[2, 64\]")
    add("lora-x-shape", lambda: _lora(x=torch.randn(3, 65)), ValueError, r"x must end in in_features = 64, got shape")
    add("lora-x-int", lambda: _lora(x=torch.ones(3, 64, dtype=torch.int32)), TypeError, "x must be float32")
    add("lora-bias-shape", lambda: _lora(bias=torch.randn(31)), ValueError, r"bias must have shape \[32\], got \[31\]")
    add("lora-weight-rank", lambda: _lora(state=_with(S, shape=(2048,))), ValueError,
        r"lora_linear needs a 2-D weight, got quant_state.shape \(2048,\)")
    add("lora-packed-short", lambda: _lora(packed=P[:100]), ValueError, "packed holds 100 bytes", lies_to_kernel=True)
    add("lora-scaling-str", lambda: _lora(scaling="two"), TypeError, "scaling must be a number, got 'two'")
    for s in (nan, float("inf"), -float("inf")):
        add(f"lora-scaling-{s}", lambda s=s: _lora(scaling=s), ValueError, f"scaling must be finite, got {s}")

    # ---------------------------------------------------------------- lora_linear_multi
    add("multi-A-rank", lambda: _multi(lora_A=torch.randn(4, 64)), ValueError,
        r"lora_A must be \[adapters, r, in_features\] and lora_B \[adapters, out_features, r\], got \[4, 64\]")
    add("multi-B-adapters", lambda: _multi(lora_B=torch.randn(3, 32, 4)), ValueError,
        r"got \[2, 4, 64\] and \[3, 32, 4\]")
    add("multi-scaling-shape", lambda: _multi(scaling=torch.ones(3)), ValueError, r"scaling must have shape \[2\], got \[3\]")
    add("multi-index-float", lambda: _multi(index=torch.zeros(3)), ValueError,
        r"adapter_index must be an integer tensor of shape \[3\] .* got torch.float32 \[3\]")
    add("multi-index-length", lambda: _multi(index=torch.zeros(4, dtype=torch.long)), ValueError,
        r"adapter_index must be an integer tensor of shape \[3\] .* got torch.int64 \[4\]")

    # ---------------------------------------------------------------- Linear4bit
    for i, o in ((0, 32), (64, 0), (-1, 32)):
        add(f"Linear4bit-features-{i}-{o}", lambda i=i, o=o: Linear4bit(i, o), ValueError,
            f"in_features and out_features must be positive, got {i} and {o}")
    add("Linear4bit-from-conv", lambda: Linear4bit.from_linear(torch.nn.Conv1d(4, 4, 1)), TypeError,
        "linear must be a torch.nn.Linear, got Conv1d")
    add("Linear4bit-blocksize", lambda: Linear4bit.from_linear(torch.nn.Linear(64, 32), blocksize=100), ValueError,
        r"blocksize must be a power of two in \[32, 4096\], got 100")
    add("Linear4bit-quant_type", lambda: Linear4bit.from_linear(torch.nn.Linear(64, 32), quant_type="int4"),
        ValueError, "quant_type must be 'nf4' or 'fp4', got 'int4'")
    add("Linear4bit-forward-shape", lambda: Linear4bit(64, 32)(torch.randn(3, 65)), ValueError,
        r"x must end in in_features = 64, got shape \[3, 65\]")
    add("Linear4bit-forward-int", lambda: Linear4bit(64, 32)(torch.ones(3, 64, dtype=torch.long)), TypeError,
        "x must be float32, float16, bfloat16 or float64, got Long")
    # load_state_dict of corrupt checkpoints (load_state_dict gathers the messages into one RuntimeError)
    sd, sdn = _state_dict(), _state_dict(nested=True)
    key = _blob_key(sd)
    add("load-missing-absmax", lambda: _load({k: v for k, v in sd.items() if k != "weight.absmax"}), RuntimeError,
        "weight: quant_state is missing 'absmax'")
    add("load-missing-blob", lambda: _load({k: v for k, v in sd.items() if k != key}), RuntimeError,
        "weight: quant_state is missing 'quant_type'")
    add("load-missing-weight", lambda: _load({k: v for k, v in sd.items() if k != "weight"}), RuntimeError,
        "Missing key\\(s\\) in state_dict: \"weight\"")
    add("load-no-quant-state", lambda: _load({"weight": sd["weight"], "bias": sd["bias"]}), RuntimeError,
        "weight: no quantization state")
    add("load-packed-short", lambda: _load({**sd, "weight": sd["weight"][:100]}), RuntimeError,
        "weight holds 100 bytes, the quantization state needs 1024")
    add("load-packed-empty", lambda: _load({**sd, "weight": sd["weight"][:0]}), RuntimeError,
        "weight holds 0 bytes, the quantization state needs 1024")
    add("load-absmax-short", lambda: _load({**sd, "weight.absmax": sd["weight.absmax"][:-1]}), RuntimeError,
        r"absmax must have 32 values \(one per block of 64 for shape \(32, 64\)\), got shape \(31,\)")
    add("load-absmax-nan", lambda: _load({**sd, "weight.absmax": sd["weight.absmax"].clone().fill_(nan)}),
        RuntimeError, r"absmax holds a non-finite value \(nan\)")
    add("load-absmax-inf", lambda: _load({**sd, "weight.absmax": torch.full_like(sd["weight.absmax"], float("inf"))}),
        RuntimeError, r"absmax holds a non-finite value \(inf\)")
    add("load-absmax-float16", lambda: _load({**sd, "weight.absmax": sd["weight.absmax"].half()}), RuntimeError,
        "absmax must be float32, got torch.float16")
    add("load-quant_map-fp4", lambda: _load({**sd, "weight.quant_map": fourbit.quant_state.quant_map("fp4")}),
        RuntimeError, "code \\(quant_map\\) is not the nf4 codebook")
    add("load-quant_map-short", lambda: _load({**sd, "weight.quant_map": torch.ones(8)}), RuntimeError,
        r"code \(quant_map\) must be 16 float32 values, got \(8,\)")
    add("load-shape-mismatch", lambda: _load(_with_blob(sd, shape=[64, 32])), RuntimeError,
        r"weight shape \(64, 32\) does not match this layer's \(32, 64\)")
    add("load-shape-larger-than-data", lambda: _load(_with_blob(sd, shape=[64, 64])), RuntimeError,
        r"absmax must have 64 values .* got shape \(32,\)")
    add("load-shape-negative", lambda: _load(_with_blob(sd, shape=[-32, -64])), RuntimeError,
        r"shape must be a list of non-negative integers, got \[-32, -64\]")
    add("load-shape-float", lambda: _load(_with_blob(sd, shape=[32.0, 64])), RuntimeError,
        r"shape must be a list of non-negative integers, got \[32.0, 64\]")
    add("load-shape-str", lambda: _load(_with_blob(sd, shape="32x64")), RuntimeError,
        "shape must be a list of non-negative integers, got '32x64'")
    add("load-blocksize-100", lambda: _load(_with_blob(sd, blocksize=100)), RuntimeError,
        r"blocksize must be a power of two in \[32, 4096\], got 100")
    add("load-blocksize-lie", lambda: _load(_with_blob(sd, blocksize=128)), RuntimeError,
        r"absmax must have 16 values \(one per block of 128")
    add("load-blocksize-str", lambda: _load(_with_blob(sd, blocksize="64")), RuntimeError,
        "blocksize must be an integer, got '64'")
    add("load-dtype-float64", lambda: _load(_with_blob(sd, dtype="float64")), RuntimeError,
        "dtype must be one of float32, float16, bfloat16, got 'float64'")
    add("load-dtype-int", lambda: _load(_with_blob(sd, dtype=5)), RuntimeError,
        "dtype must be one of float32, float16, bfloat16, got 5")
    add("load-json-quant_type-unknown", lambda: _load(_with_blob(sd, quant_type="int4")), RuntimeError,
        "quant_state.bitsandbytes__nf4 says quant_type 'int4', its key says 'nf4'")
    add("load-json-quant_type-missing", lambda: _load(_with_blob(sd, quant_type=...)), RuntimeError,
        "says quant_type None, its key says 'nf4'")
    add("load-blob-key-unknown-quant_type",
        lambda: _load({("weight.quant_state.bitsandbytes__int4" if k == key else k): v for k, v in sd.items()}),
        RuntimeError, "packed quant_state key 'quant_state.bitsandbytes__int4' must end in bitsandbytes__nf4 or")
    add("load-json-unknown-field", lambda: _load(_with_blob(sd, evil="x")), RuntimeError,
        "unknown field 'evil' in quant_state.bitsandbytes__nf4")
    add("load-json-invalid", lambda: _load({**sd, key: torch.tensor(list(b"{not json"), dtype=torch.uint8)}),
        RuntimeError, "quant_state.bitsandbytes__nf4 does not hold valid UTF-8 JSON")
    add("load-json-not-utf8", lambda: _load({**sd, key: torch.tensor([0xFF, 0xFE, 0x00], dtype=torch.uint8)}),
        RuntimeError, "does not hold valid UTF-8 JSON")
    add("load-json-array", lambda: _load({**sd, key: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)}), RuntimeError,
        r"must hold a JSON object, got \[1, 2\]")
    add("load-blob-int32", lambda: _load({**sd, key: sd[key].int()}), RuntimeError,
        "quant_state.bitsandbytes__nf4 must be a 1-D uint8 tensor, got torch.int32")
    add("load-blob-2d", lambda: _load({**sd, key: sd[key].reshape(1, -1)}), RuntimeError,
        "must be a 1-D uint8 tensor, got torch.uint8 \\(1, ")
    add("load-unknown-quant-key", lambda: _load({**sd, "weight.evil": torch.ones(1)}), RuntimeError,
        "unknown quant_state key 'evil'")
    add("load-two-blobs", lambda: _load({**sd, "weight.quant_state.bitsandbytes__fp4": sd[key]}), RuntimeError,
        "more than one packed quant_state entry")
    add("load-bias-shape", lambda: _load({**sd, "bias": torch.zeros(33)}), RuntimeError,
        r"bias: shape \(33,\), expected \(32,\)")
    add("load-absmax-not-tensor", lambda: _load({**sd, "weight.absmax": [1.0] * 32}), RuntimeError,
        "weight: absmax must be a tensor, got list")
    # double-quantized checkpoints
    add("load-nested-missing-offset", lambda: _load(_with_blob(sdn, nested_offset=...), nested=True), RuntimeError,
        r"double-quantized quant_state is missing \['nested_offset'\]")
    add("load-nested-missing-absmax", lambda: _load({k: v for k, v in sdn.items() if k != "weight.nested_absmax"},
                                                    nested=True),
        RuntimeError, r"double-quantized quant_state is missing \['nested_absmax'\]")  # fmt: skip
    add("load-nested-offset-str", lambda: _load(_with_blob(sdn, nested_offset="0.1"), nested=True), RuntimeError,
        "nested_offset must be a number, got '0.1'")
    add("load-nested-offset-nan", lambda: _load(_with_blob(sdn, nested_offset=nan), nested=True), RuntimeError,
        r"offset holds a non-finite value \(nan\)")
    add("load-nested-offset-huge-int", lambda: _load(_with_blob(sdn, nested_offset=10**400), nested=True),
        RuntimeError, "nested_offset must be a finite float32 number, got 1000000")
    add("load-nested-offset-overflow", lambda: _load(_with_blob(sdn, nested_offset=1e39), nested=True),
        RuntimeError, r"nested_offset must be a finite float32 number, got 1e\+39")
    add("load-nested-blocksize-100", lambda: _load(_with_blob(sdn, nested_blocksize=100), nested=True), RuntimeError,
        r"nested_blocksize must be a positive power of two \(at most 2\*\*62\), got 100")
    add("load-nested-blocksize-lie", lambda: _load(_with_blob(sdn, nested_blocksize=8), nested=True), RuntimeError,
        r"nested_absmax must have 4 values \(32 blocks / nested_blocksize 8\), got 1")
    add("load-nested-blocksize-huge", lambda: _load(_with_blob(sdn, nested_blocksize=1 << 80), nested=True),
        RuntimeError, rf"nested_blocksize must be a positive power of two \(at most 2\*\*62\), got {1 << 80}")
    add("load-nested-dtype", lambda: _load(_with_blob(sdn, nested_dtype="float16"), nested=True), RuntimeError,
        "nested_dtype must be float32, got 'float16'")
    add("load-nested-absmax-nan",
        lambda: _load({**sdn, "weight.nested_absmax": torch.full_like(sdn["weight.nested_absmax"], nan)}, nested=True),
        RuntimeError, r"nested_absmax holds a non-finite value \(nan\)")
    add("load-nested-quant_map-short", lambda: _load({**sdn, "weight.nested_quant_map": torch.ones(16)}, nested=True),
        RuntimeError, "nested_quant_map must be 256 float32 values")
    add("load-nested-quant_map-inf",
        lambda: _load({**sdn, "weight.nested_quant_map": torch.full((256,), float("inf"))}, nested=True),
        RuntimeError, r"nested_quant_map holds a non-finite value \(inf\)")
    add("load-nested-qabsmax-float", lambda: _load({**sdn, "weight.absmax": sd["weight.absmax"]}, nested=True),
        RuntimeError, "absmax must be uint8 under double quantization, got torch.float32")
    add("load-nested-qabsmax-short", lambda: _load({**sdn, "weight.absmax": sdn["weight.absmax"][:5]}, nested=True),
        RuntimeError, r"absmax must have 32 values .*got shape \(5,\)")

    # ---------------------------------------------------------------- QuantState / from_dict directly
    add("from_dict-list", lambda: QuantState.from_dict([1, 2]), TypeError, "qs_dict must be a mapping, got list")
    add("from_dict-blocksize-float", lambda: QuantState.from_dict(_qs_dict(blocksize=64.0)), ValueError,
        "blocksize must be an integer, got 64.0")
    add("from_dict-blocksize-bool", lambda: QuantState.from_dict(_qs_dict(blocksize=True)), ValueError,
        "blocksize must be an integer, got True")
    add("from_dict-shape-bool", lambda: QuantState.from_dict(_qs_dict(shape=[True, 64])), ValueError,
        r"shape must be a list of non-negative integers, got \[True, 64\]")
    add("from_dict-shape-huge", lambda: QuantState.from_dict(_qs_dict(shape=[1 << 70, 1 << 70])), ValueError,
        "absmax must have .* values")
    add("from_dict-quant_map-nan", lambda: QuantState.from_dict(_qs_dict(quant_map=torch.full((16,), nan))),
        ValueError, "code \\(quant_map\\) is not the nf4 codebook")
    add("from_dict-nested-absmax-float-unnested",
        lambda: QuantState.from_dict(_qs_dict(absmax=torch.zeros(32, dtype=torch.uint8))), TypeError,
        "absmax must be float32, got torch.uint8 \\(uint8 absmax needs state2\\)")
    add("QuantState-absmax-nan", lambda: QuantState(torch.full((32,), nan), (32, 64), S.code, 64, "nf4", torch.float32),
        ValueError, r"absmax holds a non-finite value \(nan\); the checkpoint is corrupt")
    add("QuantState-absmax-inf", lambda: QuantState(torch.full((32,), -float("inf")), (32, 64), S.code, 64, "nf4",
                                                     torch.float32),
        ValueError, r"absmax holds a non-finite value \(-inf\)")  # fmt: skip
    add("QuantState-dtype-float64", lambda: QuantState(S.absmax, (32, 64), S.code, 64, "nf4", torch.float64),
        TypeError, "dtype must be float32, float16 or bfloat16, got torch.float64")
    add("QuantState-offset-without-state2", lambda: QuantState(S.absmax, (32, 64), S.code, 64, "nf4", torch.float32,
                                                                offset=torch.zeros(())),
        ValueError, "a double-quantized state needs both state2 and offset, got offset")  # fmt: skip

    # ---------------------------------------------------------------- LoRALinear
    add("LoRALinear-base", lambda: LoRALinear(torch.nn.Conv2d(2, 2, 1)), TypeError,
        "base_layer must be nn.Linear, transformers' Conv1D or fourbit.nn.Linear4bit, got Conv2d")
    for r in (0, -1, 2.5, "8", None):
        add(f"LoRALinear-r-{r!r}", lambda r=r: _lora_layer(r=r), ValueError, f"r must be a positive integer, got {r!r}")
    for p in (1.0, -0.1, 2):
        add(f"LoRALinear-dropout-{p}", lambda p=p: _lora_layer(lora_dropout=p), ValueError,
            rf"lora_dropout must be in \[0, 1\), got {p}")
    add("LoRALinear-init", lambda: _lora_layer(init_lora_weights="xavier"), ValueError,
        "init_lora_weights must be True, False or 'gaussian', got 'xavier'")
    for a in (nan, float("inf"), "8"):
        add(f"LoRALinear-alpha-{a!r}", lambda a=a: _lora_layer(lora_alpha=a), ValueError,
            f"lora_alpha must be a finite number, got {a!r}")
    add("LoRALinear-set_adapter", lambda: _lora_layer().set_adapter("other"), ValueError,
        r"unknown adapter 'other'; this layer has \['default'\]")
    add("LoRALinear-forward-shape", lambda: LoRALinear(Linear4bit(64, 32))(torch.randn(3, 63)), ValueError,
        r"x must end in in_features = 64, got shape \[3, 63\]")
    add("LoRALinear-adapter_names-length", lambda: _lora_layer()(torch.randn(3, 64), adapter_names=["default"]),
        ValueError, "adapter_names has 1 entries but the batch has 3 rows")

    # ---------------------------------------------------------------- QAT: fake_quantize, fake_quantize_4bit
    fq = fourbit.fake_quantize
    ch = lambda n: (torch.ones(n), torch.zeros(n, dtype=torch.int32))  # noqa: E731  (per-channel parameters)
    for dt in (torch.int32, torch.bool, torch.uint8):
        add(f"fake_quantize-x-{dt}", lambda dt=dt: fq(torch.ones(4, dtype=dt), 0.1, 0, -8, 7), TypeError,
            "x must be float32, float16, bfloat16 or float64, got")
    add("fake_quantize-x-list", lambda: fq([1.0], 0.1, 0, -8, 7), TypeError, "x must be a torch.Tensor, got list")
    for v in (0.0, -1.0, nan, float("inf")):
        add(f"fake_quantize-scale-{v}", lambda v=v: fq(x, v, 0, -8, 7), ValueError,
            f"scale must be positive and finite, got {v:g} at index 0")
    add("fake_quantize-scale-int", lambda: fq(x, torch.ones(1, dtype=torch.int32), 0, -8, 7), TypeError,
        "scale must be a float tensor, got Int")
    add("fake_quantize-scale-2-values", lambda: fq(x, torch.ones(2), 0, -8, 7), ValueError,
        r"scale must hold 1 value \(per tensor\), got shape \[2\]")
    add("fake_quantize-zero_point-nan", lambda: fq(x, 0.1, torch.tensor(nan), -8, 7), ValueError,
        "zero_point must be finite, got nan at index 0")
    for lo, hi in ((7, 7), (8, -8)):
        add(f"fake_quantize-range-{lo}-{hi}", lambda lo=lo, hi=hi: fq(x, 0.1, 0, lo, hi), ValueError,
            f"quant_min must be less than quant_max, got quant_min={lo} and quant_max={hi}")
    add("fake_quantize-range-huge", lambda: fq(x, 0.1, 0, -(1 << 40), 1 << 40), ValueError,
        r"quant_min and quant_max must lie in \[-2\^24, 2\^24\], got -1099511627776 and 1099511627776")
    for axis in (2, -3, 100):
        add(f"fake_quantize-axis-{axis}", lambda axis=axis: fq(x, *ch(3), -8, 7, axis=axis), ValueError,
            rf"axis must be in \[-2, 2\) for x of shape \[3, 64\], got {axis}")
    add("fake_quantize-axis-scalar-x", lambda: fq(torch.tensor(1.0), *ch(1), -8, 7, axis=0), ValueError,
        r"axis must be in \[0, 0\) for x of shape \[\], got 0")
    add("fake_quantize-channel-scale-length", lambda: fq(x, *ch(5), -8, 7, axis=0), ValueError,
        r"scale must hold one value per channel \(x.shape\[axis\]\) = 3, got shape \[5\]")
    add("fake_quantize-channel-zero_point-length", lambda: fq(x, torch.ones(3), torch.zeros(2, dtype=torch.int32),
                                                              -8, 7, axis=0),
        ValueError, r"zero_point must have scale's 3 values, got shape \[2\]")  # fmt: skip
    for g in (48, 0, -32, 128):
        add(f"fake_quantize-group_size-{g}", lambda g=g: fq(x, *ch(6), -8, 7, group_size=g), ValueError,
            f"group_size must be positive and divide x.shape\\[-1\\] = 64, got {g}")
    add("fake_quantize-group-scale-length", lambda: fq(x, *ch(5), -8, 7, group_size=32), ValueError,
        r"scale must hold one value per group \(x.numel\(\) / group_size\) = 6, got shape \[5\]")
    add("fake_quantize-axis-and-group", lambda: fq(x, *ch(6), -8, 7, axis=0, group_size=32), ValueError,
        "give axis \\(per channel\\) or group_size \\(per group\\), not both; got axis=0 and group_size=32")
    add("fake_quantize_4bit-int", lambda: fourbit.fake_quantize_4bit(torch.ones(4, dtype=torch.int32)), TypeError,
        "A \\(the tensor to quantize\\) must be float32, float16 or bfloat16, got Int")
    add("fake_quantize_4bit-blocksize", lambda: fourbit.fake_quantize_4bit(x, "nf4", 100), ValueError,
        r"blocksize must be a power of two in \[32, 4096\], got 100")
    add("fake_quantize_4bit-quant_type", lambda: fourbit.fake_quantize_4bit(x, "int4"), ValueError,
        "quant_type must be 'nf4' or 'fp4', got 'int4'")
    add("fake_quantize_4bit-nested_blocksize", lambda: ops.fake_quantize_4bit(x, 64, "nf4", True, 1 << 40), ValueError,
        r"nested_blocksize must be a power of two in \[32, 4096\], got 1099511627776")

    # ---------------------------------------------------------------- LinearInt and its ops
    from fourbit.nn import LinearInt

    li = LinearInt.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32)
    q, qs, qz = li.weight, li.weight_scale, li.weight_zero_point
    for kw, match in (({"bits": 3}, "bits must be 4 or 8, got 3"),
                      ({"group_size": 48}, r"group_size must be positive \(even for int4\) and divide in_features = 64, got 48"),
                      ({"group_size": 0}, "divide in_features = 64, got 0")):  # fmt: skip
        add(f"LinearInt-{kw}", lambda kw=kw: LinearInt(64, 32, **kw), ValueError, match)
    add("LinearInt-features", lambda: LinearInt(0, 32), ValueError, "in_features and out_features must be positive, got 0")
    add("LinearInt-forward-shape", lambda: li(torch.randn(3, 65)), ValueError, r"x must end in in_features = 64, got shape \[3, 65\]")
    add("LinearInt-forward-int", lambda: li(torch.ones(3, 64, dtype=torch.long)), TypeError, "x must be float32")
    deq_int = lambda *a, shape=(32, 64), dtype=torch.float32: ops.dequantize_int(*a, list(shape), dtype)  # noqa: E731
    add("dequantize_int-qweight-short", lambda: deq_int(q[:16], qs, qz, 4, 32), ValueError,
        r"qweight must be contiguous with shape \[32, 32\] \(4-bit codes of \[32, 64\]\), got shape \[16, 32\]",
        lies_to_kernel=True)
    add("dequantize_int-shape-lie", lambda: deq_int(q, qs, qz, 4, 32, shape=(64, 64)), ValueError,
        r"qweight must be contiguous with shape \[64, 32\]", lies_to_kernel=True)
    add("dequantize_int-shape-huge", lambda: deq_int(q, qs, qz, 4, 32, shape=(1 << 40, 64)), ValueError,
        r"qweight must be contiguous with shape \[1099511627776, 32\]", lies_to_kernel=True)
    add("dequantize_int-shape-1d", lambda: deq_int(q, qs, qz, 4, 32, shape=(2048,)), ValueError,
        r"shape must be the weight's \[out_features, in_features\], got \[2048\]")
    add("dequantize_int-shape-negative", lambda: deq_int(q, qs, qz, 4, 32, shape=(-32, 64)), ValueError,
        r"shape must be the weight's \[out_features, in_features\], got \[-32, 64\]", lies_to_kernel=True)
    add("dequantize_int-group_size-lie", lambda: deq_int(q, qs, qz, 4, 16), ValueError,
        r"scale must be contiguous with shape \[32, 4\], got shape \[32, 2\]", lies_to_kernel=True)
    add("dequantize_int-bits-lie", lambda: deq_int(q, qs, qz, 8, 32), ValueError,
        r"qweight must be contiguous with shape \[32, 64\] \(8-bit codes", lies_to_kernel=True)
    add("dequantize_int-bits-2", lambda: deq_int(q, qs, qz, 2, 32), ValueError, "bits must be 4 or 8, got 2")
    add("dequantize_int-scale-float16", lambda: deq_int(q, qs.half(), qz, 4, 32), TypeError, "scale must be float32, got Half")
    add("dequantize_int-zero_point-int32", lambda: deq_int(q, qs, qz.int(), 4, 32), TypeError, "zero_point must be uint8, got Int")
    add("dequantize_int-zero_point-short", lambda: deq_int(q, qs, qz[:10], 4, 32), ValueError,
        r"zero_point must be contiguous with shape \[32, 2\], got shape \[10, 2\]", lies_to_kernel=True)
    add("dequantize_int-dtype", lambda: deq_int(q, qs, qz, 4, 32, dtype=torch.int32), TypeError,
        r"dtype \(the output dtype\) must be float32, float16 or bfloat16, got Int")
    add("dequantize_int_into-out-short", lambda: ops.dequantize_int_into(q, qs, qz, 4, 32, [32, 64], torch.empty(100)),
        ValueError, r"out must be contiguous with 2048 elements, got shape \[100\]", lies_to_kernel=True)
    add("matmul_int-qweight-short", lambda: ops.matmul_int(torch.randn(3, 64), q[:3], qs, qz, 4, 32, [32, 64]),
        ValueError, r"qweight must be contiguous with shape \[32, 32\]", lies_to_kernel=True)
    add("matmul_int-bias", lambda: ops.matmul_int(torch.randn(3, 64), q, qs, qz, 4, 32, [32, 64], torch.randn(31)),
        ValueError, r"bias must have shape \[32\], got \[31\]")
    add("matmul_int_grad_x-shape", lambda: ops.matmul_int_grad_x(torch.randn(3, 31), q, qs, qz, 4, 32, [32, 64]),
        ValueError, r"grad_y must end in out_features = 32, got shape \[3, 31\]")
    return c


CASES = _cases()


def test_matrix_size():
    # The number reported in the issue's closing note; ids are unique so a failure names its case.
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(CASES) >= 300


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def test_lying_calls_in_a_subprocess():
    """The cases whose metadata lies about the buffers, in a fresh interpreter: every one raises and it exits 0."""
    ids = [c.id for c in CASES if c.lies_to_kernel]
    assert len(ids) >= 30
    code = textwrap.dedent(
        f"""
        import sys, os
        sys.path.insert(0, {repr(str(__import__("pathlib").Path(__file__).parent))})
        import test_bad_input_matrix as m
        cases = {{c.id: c for c in m.CASES}}
        for i in {ids!r}:
            print("case", i, flush=True)
            c = cases[i]
            try:
                c.call()
            except c.error:
                continue
            print("did not raise", i, flush=True)
            sys.exit(3)
        print("all raised", len({ids!r}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    last = [line for line in proc.stdout.splitlines() if line.startswith("case")][-1:]
    assert proc.returncode == 0, f"exit {proc.returncode} after {last}: {proc.stderr[-3000:]}"
    assert f"all raised {len(ids)}" in proc.stdout


# ---------------------------------------------------------------- edge inputs that are valid (no error, right result)
@pytest.mark.parametrize("shape", [(0,), (0, 64), (32, 0), (5, 0, 3)])
@pytest.mark.parametrize("nested", [False, True])
def test_empty_tensors_round_trip(shape, nested):
    packed, state = fourbit.quantize_4bit(torch.randn(shape), 64, compress_statistics=nested)
    assert packed.shape == (0, 1) and state.absmax.numel() == 0
    out = fourbit.dequantize_4bit(packed, state)
    assert out.shape == shape
    state.validate()


@pytest.mark.parametrize("batch", [1, 3, 40, 100])
def test_matmul_with_empty_dimensions(batch):
    # Empty batch, a weight with no input features (K = 0: the result is the bias) and none with no outputs.
    packed, state = fourbit.quantize_4bit(torch.randn(8, 0), 64)
    bias = torch.randn(8)
    y = fourbit.matmul_4bit(torch.randn(batch, 0), packed, state, bias)
    assert torch.equal(y, bias.expand(batch, 8))
    y = fourbit.lora_linear(torch.randn(batch, 0), packed, state, torch.randn(2, 0), torch.randn(8, 2), 1.0, bias)
    assert torch.equal(y, bias.expand(batch, 8))
    x = torch.randn(batch, 0, requires_grad=True)
    fourbit.matmul_4bit(x, packed, state).sum().backward()
    assert x.grad.shape == (batch, 0)
    packed, state = fourbit.quantize_4bit(torch.randn(0, 64), 64)
    assert fourbit.matmul_4bit(torch.randn(batch, 64), packed, state).shape == (batch, 0)
    P, S = _q()
    assert fourbit.matmul_4bit(torch.randn(0, 64), P, S).shape == (0, 32)
    assert fourbit.matmul_4bit(torch.randn(2, 0, 64), P, S).shape == (2, 0, 32)


@pytest.mark.parametrize("batch", [1, 4, 100])
def test_non_contiguous_inputs_give_the_contiguous_result(batch):
    P, S = _q()
    x = torch.randn(64, batch).t()  # strides (1, batch)
    assert not x.is_contiguous() or batch == 1
    assert torch.equal(fourbit.matmul_4bit(x, P, S), fourbit.matmul_4bit(x.contiguous(), P, S))
    A, B = torch.randn(64, 4).t(), torch.randn(4, 32).t()
    y = fourbit.lora_linear(x, P, S, A, B, 0.5)
    assert torch.allclose(y, fourbit.lora_linear(x.contiguous(), P, S, A.contiguous(), B.contiguous(), 0.5), atol=1e-4)
    w = torch.randn(64, 32).t()
    assert torch.equal(fourbit.quantize_4bit(w)[0], fourbit.quantize_4bit(w.contiguous())[0])


def test_huge_nested_blocksize_is_one_block():
    # Any power of two is a valid nested block size (bitsandbytes always writes 256): one larger than the number of
    # blocks simply means one nested block. It must not overflow in the kernels' shift arithmetic.
    packed, state = _q(nested=True)
    ref = fourbit.dequantize_4bit(packed, state)
    for nbs in (1 << 20, 1 << 40, 1 << 62):
        absmax = ops.dequantize_absmax(state.absmax, state.state2.absmax, state.state2.code, state.offset, 256)
        qabsmax, nested_absmax, offset = ops.double_quantize(absmax, 4096)
        out = _deq_op(packed, state, absmax=qabsmax, nested_absmax=nested_absmax, offset=offset, nested_blocksize=nbs)
        assert out.shape == ref.shape and bool(torch.isfinite(out).all())


# ---------------------------------------------------------------- devices (GPU machines only)
@requires_gpu
@pytest.mark.parametrize("what", ["x", "bias", "lora_A", "lora_B", "absmax", "nested_absmax", "offset", "out"])
def test_device_mismatch(what):
    P, S = _q(nested=True)
    Pc, Sc = P.cuda(), QuantState.from_dict(S.as_dict(packed=True), device="cuda")
    x = torch.randn(3, 64, device="cuda")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=f"{what} is on cpu but .* is on cuda:0"):
        if what == "x":
            fourbit.matmul_4bit(x.to(cpu), Pc, Sc)
        elif what == "bias":
            fourbit.matmul_4bit(x, Pc, Sc, torch.randn(32))
        elif what in ("lora_A", "lora_B"):
            A, B = torch.randn(4, 64, device="cuda"), torch.randn(32, 4, device="cuda")
            fourbit.lora_linear(x, Pc, Sc, A.cpu() if what == "lora_A" else A, B.cpu() if what == "lora_B" else B, 1.0)
        elif what == "absmax":
            fourbit.dequantize_4bit(Pc, _with(Sc, absmax=Sc.absmax.cpu()))
        elif what == "nested_absmax":
            fourbit.dequantize_4bit(Pc, _with_nested(Sc, absmax=Sc.state2.absmax.cpu()))
        elif what == "offset":
            fourbit.dequantize_4bit(Pc, _with(Sc, offset=Sc.offset.cpu()))
        else:
            fourbit.dequantize_4bit(Pc, Sc, out=torch.empty(32, 64))


# ---------------------------------------------------------------- gaps this matrix found (fixed since)
@pytest.mark.parametrize("index", [5, -2])
def test_lora_linear_multi_adapter_index_out_of_range(index):
    # 5: torch's IndexError, naming neither the argument nor the range (a device-side assert on CUDA); -2: silently
    # treated as "no adapter".
    with pytest.raises(ValueError, match=rf"adapter_index must hold values in \[-1, 2\), got {index}"):
        _multi(index=torch.tensor([0, index, -1]))


@pytest.mark.parametrize("blocksize", [64.0, "64", 1 << 70])
def test_quantize_blocksize_of_the_wrong_type(blocksize):
    with pytest.raises((TypeError, ValueError), match="blocksize"):
        fourbit.quantize_4bit(torch.randn(128), blocksize)


def test_refused_adapter_leaves_no_layers(tmp_path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = fourbit.add_lora(transformers.LlamaForCausalLM(config), fourbit.LoraConfig(r=4, target_modules=["q_proj"]))
    fourbit.save_adapter(model, tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    adapter_config["modules_to_save"] = ["no_such_module"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config))
    fresh = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="modules_to_save entry 'no_such_module' matches no module"):
        fourbit.load_adapter(fresh, tmp_path)
    assert not fourbit.lora_layers(fresh)
