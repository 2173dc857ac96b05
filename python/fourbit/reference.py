# SPDX-License-Identifier: Apache-2.0
"""The executable specification of fourbit's quantization ops, in plain PyTorch.

Every kernel is tested against these functions: 4-bit codes and absmax byte for byte, dequantized values exactly.
They follow bitsandbytes' CPU backend (0.50.2) operation by operation, so they also define what "byte-compatible with
bitsandbytes" means:

* The input is flattened (row-major) and cut into blocks of ``blocksize`` elements; the last block may be partial.
* A full block is scaled by multiplying with the float32 reciprocal of ``max(absmax, 1e-38)`` and stores the raw
  absmax. The partial last block is divided by its clamped absmax, and stores the clamped value.
* A scaled value gets the code of the nearest level; a value exactly between two levels gets the lower one
  (``torch.bucketize(right=False)`` over float32 midpoints), and NaN gets the top bin.
* Two codes per byte, the first element in the high nibble; an odd element count is padded with a scaled 0.
* Double quantization stores ``absmax - offset`` in 8 bits (the signed dynamic map, blocks of 256, same scaling
  rules), where ``offset`` is the float64 mean of absmax over fixed chunks of 4096 values, rounded to float32.

Nothing here calls fourbit's compiled ops.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "NF4_LEVELS",
    "FP4_LEVELS",
    "MIN_ABSMAX",
    "fake_quantize_affine",
    "MEAN_CHUNK",
    "levels",
    "create_dynamic_map",
    "quantize_4bit",
    "dequantize_4bit",
    "double_quantize",
    "dequantize_absmax",
]

# NF4: bitsandbytes' hard-coded table (its normal-quantile construction needs scipy and is off in the last bit).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (E2M1 with exponent bias 2, no inf/NaN) in bit order: bit 3 is the sign. Divided by the largest magnitude (12)
# in float32. bitsandbytes writes the negative zero as the integer -0, so code 8 is +0.0 as well.
FP4_LEVELS = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

MIN_ABSMAX = 1e-38  # absmax is clamped to this (as float32) before scaling
MEAN_CHUNK = 4096  # chunk length of the deterministic float64 mean


def levels(quant_type: str) -> torch.Tensor:
    """The 16 levels of ``quant_type`` ("nf4" or "fp4") as float32, indexed by code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_LEVELS, dtype=torch.float32) / 12.0
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


@functools.cache
def create_dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (7 exponent bits): 256 sorted float32 values.

    For each decade 10^(i-6), i = 0..6, the midpoints of 2^i + 1 float32-linspaced points in [0.1, 1] are scaled into
    the decade (a float32 multiply) with both signs; then 0 and 1 are added.
    """
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _sorted_bins(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted levels, code of each sorted level); stable sort, so equal levels keep code order."""
    order = torch.argsort(table, stable=True)
    ordered = table[order]
    return (ordered[:-1] + ordered[1:]) / 2, order


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled float32 values and the stored absmax per block (the two scaling rules in the module docstring)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = (blocks * (1.0 / absmax.clamp(min=MIN_ABSMAX)).unsqueeze(1)).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=MIN_ABSMAX)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, flat[full:] / tail_max])
    return scaled, absmax


def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (packed uint8 [(n + 1) // 2, 1], absmax float32 [ceil(n / blocksize)])."""
    flat = A.detach().reshape(-1).float()
    scaled, absmax = _blockwise_scale(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    midpoints, code_of_bin = _sorted_bins(levels(quant_type).to(flat.device))
    codes = code_of_bin[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), absmax


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes of a packed buffer (any dtype, read as bytes), as int64."""
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)
    return codes[:n].long()


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape,
    dtype: torch.dtype,
) -> torch.Tensor:
    """levels[code] * absmax[block] in float32, then cast once to ``dtype``; absmax is float32 [blocks]."""
    n = math.prod(shape)
    values = levels(quant_type).to(packed.device)[unpack_codes(packed, n)]
    block_of = torch.arange(n, device=packed.device) // blocksize
    return (values * absmax[block_of]).to(dtype).reshape(shape)


def deterministic_mean(values: torch.Tensor) -> torch.Tensor:
    """float64 sum of each chunk of MEAN_CHUNK values in index order, then of the chunk sums, / n; as float32."""
    data = values.double().tolist()
    if not data:
        return torch.tensor(0.0)
    total = 0.0
    for start in range(0, len(data), MEAN_CHUNK):
        chunk_sum = 0.0
        for v in data[start : start + MEAN_CHUNK]:
            chunk_sum += v
        total += chunk_sum
    return torch.tensor(total / len(data), dtype=torch.float32)


def double_quantize(absmax: torch.Tensor, nested_blocksize: int = 256):
    """Returns (qabsmax uint8 [blocks], nested_absmax float32 [ceil(blocks / nested_blocksize)], offset float32 [])."""
    offset = deterministic_mean(absmax).to(absmax.device)
    centered = absmax.float() - offset
    scaled, nested_absmax = _blockwise_scale(centered, nested_blocksize)
    table = create_dynamic_map().to(absmax.device)
    qabsmax = torch.bucketize(scaled, (table[:-1] + table[1:]) / 2).to(torch.uint8)
    return qabsmax, nested_absmax, offset


def dequantize_absmax(
    qabsmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: torch.Tensor,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """nested_code[qabsmax] * nested_absmax[block] + offset, two float32 roundings."""
    block_of = torch.arange(qabsmax.numel(), device=qabsmax.device) // nested_blocksize
    product = nested_code[qabsmax.long()] * nested_absmax[block_of]
    return product + offset


# ---- affine fake quantization (QAT) ----
def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through (identity) gradient."""
    return v + (torch.round(v) - v).detach()


def fake_quantize_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """``(clamp(zp + round(x * (1 / scale)), qmin, qmax) - zp) * scale`` with the zero point rounded and clamped, in
    float32 for 16-bit inputs (float64 for float64), PyTorch's fake-quant arithmetic. Differentiable with autograd:
    rounding is straight-through, so the gradients are LSQ's (``dscale = round(x / s) - x / s`` inside the range,
    ``qmin - zp`` / ``qmax - zp`` outside; ``dzero_point = -scale`` outside), the formula fourbit's backward kernel
    implements."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    s = scale.to(compute)
    zp = _round_ste(zero_point.to(compute)).clamp(quant_min, quant_max)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, zp = s.reshape(shape), zp.reshape(shape)
    elif group_size is not None:
        xc = xc.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
        s = s.reshape(*x.shape[:-1], -1, 1)
        zp = zp.reshape(*x.shape[:-1], -1, 1)
    q = zp + _round_ste(xc * (1.0 / s))
    # clamp with gradient to the bound's own terms outside the range (torch.clamp would give zp no gradient there).
    below, above = q < quant_min, q > quant_max
    q = torch.where(below, torch.zeros_like(q) + quant_min, torch.where(above, torch.zeros_like(q) + quant_max, q))
    y = (q - zp) * s
    return y.reshape(x.shape).to(x.dtype)
