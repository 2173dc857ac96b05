# SPDX-License-Identifier: Apache-2.0
"""More than 2^31 elements: quantize and dequantize index with 64 bits (product.md section 4).

One bfloat16 tensor of 2^31 + 12325 elements (4 GiB): quantized, checked chunk by chunk (a sample of chunks and
all those past 2^31) against the same kernel on each chunk alone (whose offsets all fit in 32 bits) and, around the
2^31 boundary and at the tail, against the pure-PyTorch reference; then freed before the 4 GiB dequantized output is made and checked the same way, for plain
and double-quantized scales. Peak memory stays near 5.3 GiB (input or output, plus the 1 GiB of packed codes); no
full-size reference copy is ever made. About 30 s on 2 idle cores.
"""

from __future__ import annotations

import gc

import pytest
import torch

import fourbit
from fourbit import QuantState, reference

from conftest import requires_gpu

N = (1 << 31) + 3 * 4096 + 37  # odd, with a partial last block for every blocksize
CHUNK = 1 << 24  # elements per check; a multiple of every blocksize and of 256 blocks (the nested block)
BLOCKSIZE = 64


def _fill(x: torch.Tensor) -> None:
    """Position-dependent values without a full-size random draw: one random pattern, shifted by a different amount
    (not a multiple of the block size) per chunk, so that no two chunks hold the same blocks (a wrong offset would
    read another chunk's data)."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(CHUNK + 4096, generator=g).to(x.dtype)
    for i, start in enumerate(range(0, x.numel(), CHUNK)):
        count = min(CHUNK, x.numel() - start)
        shift = (i * 977) % 4096
        x[start : start + count].copy_(pattern[shift : shift + count])


def _chunks(n):
    """Every 8th chunk and the last two (the ones past 2^31 elements): the same kernel alone on each. (Only the last
    chunks index beyond 2^31; the others are a sample, to keep the test near 30 s.)"""
    starts = list(range(0, n, CHUNK))
    for i, start in enumerate(starts):
        if i % 8 == 0 or i >= len(starts) - 2:
            yield start, min(CHUNK, n - start)


def _boundary_slices(n):
    """Element ranges checked against the reference: the start, across 2^31, and the tail."""
    tail = (n - 5000) // BLOCKSIZE * BLOCKSIZE  # block aligned, like every slice here
    return [(0, 1 << 16), ((1 << 31) - (1 << 15), min(1 << 16, n - (1 << 31) + (1 << 15))), (tail, n - tail)]


def _dequantize_chunk(packed, state, start, count, dtype):
    """The same kernel on one chunk alone: the chunk's bytes and scales as a tensor of its own."""
    b0, b1 = start // BLOCKSIZE, -(-(start + count) // BLOCKSIZE)
    piece = packed.reshape(-1)[start // 2 : (start + count + 1) // 2]
    if state.nested:
        nb = state.state2.blocksize
        state2 = QuantState(state.state2.absmax[b0 // nb : -(-b1 // nb)], code=state.state2.code, blocksize=nb,
                            dtype=torch.float32, validate=False)  # fmt: skip
        sub = QuantState(state.absmax[b0:b1], (count,), state.code, BLOCKSIZE, state.quant_type, state.dtype,
                         state.offset, state2, validate=False)  # fmt: skip
    else:
        sub = QuantState(state.absmax[b0:b1], (count,), state.code, BLOCKSIZE, state.quant_type, state.dtype,
                         validate=False)  # fmt: skip
    return fourbit.dequantize_4bit(piece, sub, dtype)


def _check_codes(x, packed, state):
    flat = packed.reshape(-1)
    for start, count in _chunks(x.numel()):
        p, s = fourbit.quantize_4bit(x[start : start + count], BLOCKSIZE, state.quant_type)
        b0 = start // BLOCKSIZE
        assert torch.equal(flat[start // 2 : start // 2 + p.numel()], p.reshape(-1)), f"codes of chunk at {start}"
        assert torch.equal(state.absmax[b0 : b0 + s.absmax.numel()], s.absmax), f"absmax of chunk at {start}"
    for start, count in _boundary_slices(x.numel()):
        ref_packed, ref_absmax = reference.quantize_4bit(x[start : start + count].float(), BLOCKSIZE, state.quant_type)
        b0 = start // BLOCKSIZE
        assert torch.equal(flat[start // 2 : start // 2 + ref_packed.numel()], ref_packed.reshape(-1)), start
        assert torch.equal(state.absmax[b0 : b0 + ref_absmax.numel()], ref_absmax), start


def _check_values(out, packed, state):
    flat = out.reshape(-1)
    for start, count in _chunks(out.numel()):
        expected = _dequantize_chunk(packed, state, start, count, out.dtype)
        assert torch.equal(flat[start : start + count], expected), f"values of chunk at {start}"
    if not state.nested:
        for start, count in _boundary_slices(out.numel()):
            b0, b1 = start // BLOCKSIZE, -(-(start + count) // BLOCKSIZE)
            piece = packed.reshape(-1)[start // 2 : (start + count + 1) // 2]
            ref = reference.dequantize_4bit(piece, state.absmax[b0:b1], BLOCKSIZE, state.quant_type, (count,), out.dtype)
            assert torch.equal(flat[start : start + count], ref), start


def test_more_than_2_31_elements_cpu():
    x = torch.empty(N, dtype=torch.bfloat16)
    _fill(x)
    packed, state = fourbit.quantize_4bit(x, BLOCKSIZE, "nf4")
    assert packed.shape == ((N + 1) // 2, 1) and state.absmax.numel() == -(-N // BLOCKSIZE)
    _check_codes(x, packed, state)
    # The last element sits in the high nibble of the last byte; its low nibble is the padding code of 0 (0x7).
    assert int(packed[-1]) & 0x0F == 0x7
    del x
    gc.collect()

    out = fourbit.dequantize_4bit(packed, state)  # bfloat16, 4 GiB
    assert out.shape == (N,) and out.dtype == torch.bfloat16
    _check_values(out, packed, state)
    # Double-quantized scales over the same codes, written into the same buffer (out=).
    qabsmax, nested_absmax, offset = torch.ops.fourbit.double_quantize(state.absmax, 256)
    state2 = QuantState(nested_absmax, code=fourbit.quant_state.quant_map("dynamic"), blocksize=256,
                        dtype=torch.float32, validate=False)  # fmt: skip
    nested = QuantState(qabsmax, state.shape, state.code, BLOCKSIZE, "nf4", torch.bfloat16, offset, state2)
    fourbit.dequantize_4bit(packed, nested, out=out)
    _check_values(out, packed, nested)


@requires_gpu
def test_more_than_2_31_elements_cuda():
    # The CUDA kernels index with 64 bits: the same tensor on the GPU gives the CPU kernel's bytes chunk by chunk
    # (at the start, across 2^31 and at the tail).
    x = torch.empty(N, dtype=torch.bfloat16, device="cuda")
    _fill(x)
    packed, state = fourbit.quantize_4bit(x, BLOCKSIZE, "nf4")
    out = fourbit.dequantize_4bit(packed, state)
    cpu_packed = packed.cpu()
    cpu_state = QuantState(state.absmax.cpu(), state.shape, state.code.cpu(), BLOCKSIZE, "nf4", torch.bfloat16)
    for start, count in [(0, CHUNK), ((1 << 31) - CHUNK // 2, CHUNK), (N - N % CHUNK, N % CHUNK)]:
        p, s = fourbit.quantize_4bit(x[start : start + count].cpu(), BLOCKSIZE, "nf4")
        assert torch.equal(cpu_packed.reshape(-1)[start // 2 : start // 2 + p.numel()], p.reshape(-1)), start
        b0 = start // BLOCKSIZE
        assert torch.equal(cpu_state.absmax[b0 : b0 + s.absmax.numel()], s.absmax), start
        expected = _dequantize_chunk(cpu_packed, cpu_state, start, count, torch.bfloat16)
        assert torch.equal(out[start : start + count].cpu(), expected), start
