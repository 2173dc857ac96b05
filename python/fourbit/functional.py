# SPDX-License-Identifier: Apache-2.0
"""The functional API: blockwise 4-bit quantization compatible with bitsandbytes."""

from __future__ import annotations

import torch

from .quant_state import QuantState, quant_map

__all__ = [
    "quantize_4bit",
    "dequantize_4bit",
    "matmul_4bit",
    "lora_linear",
    "lora_linear_multi",
    "fake_quantize",
    "fake_quantize_4bit",
]

NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double quantization of absmax


def _check_quant_state(quant_state) -> None:
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a fourbit.QuantState, got {type(quant_state).__name__}")


def _check_weight_state(quant_state, op: str) -> None:
    _check_quant_state(quant_state)
    if len(quant_state.shape) != 2:
        raise ValueError(f"{op} needs a 2-D weight, got quant_state.shape {tuple(quant_state.shape)}")


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantizes ``A`` to 4 bits per element, blockwise, bitsandbytes' layout bit for bit.

    Args:
        A: float32, float16 or bfloat16 tensor of any shape (non-contiguous and empty tensors are fine).
        blocksize: elements per absmax block, a power of two in [32, 4096].
        quant_type: "nf4" (the default here; bitsandbytes defaults to "fp4") or "fp4".
        compress_statistics: double quantization: absmax stored in 8 bits (blocks of 256) around its mean.
        quant_storage: dtype of the returned packed tensor; the same bytes, viewed (padded with the code of 0 to a
            whole number of elements).

    Returns:
        ``(packed, state)``: packed codes ``[(n + 1) // 2, 1]`` uint8 (or the ``quant_storage`` view), first element in
        the high nibble; and the QuantState needed to dequantize.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch.dtype, got {quant_storage!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, got {blocksize!r}")
    if not 32 <= blocksize <= 4096:  # before the op: a Python int beyond int64 would fail in the cast, unnamed
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    packed, absmax = torch.ops.fourbit.quantize_4bit(A.detach(), blocksize, quant_type)
    code = quant_map(quant_type, A.device)
    if compress_statistics:
        qabsmax, nested_absmax, offset = torch.ops.fourbit.double_quantize(absmax, NESTED_BLOCKSIZE)
        state2 = QuantState(
            absmax=nested_absmax,
            code=quant_map("dynamic", A.device),
            blocksize=NESTED_BLOCKSIZE,
            dtype=torch.float32,
            validate=False,
        )
        state = QuantState(qabsmax, A.shape, code, blocksize, quant_type, A.dtype, offset, state2, validate=False)
    else:
        state = QuantState(absmax, A.shape, code, blocksize, quant_type, A.dtype, validate=False)
    if quant_storage != torch.uint8:
        packed = _view_as_storage(packed, quant_storage, quant_type)
    return packed, state


def _view_as_storage(packed: torch.Tensor, storage: torch.dtype, quant_type: str) -> torch.Tensor:
    itemsize = storage.itemsize
    pad = -packed.numel() % itemsize
    if pad:
        zero_pair = 0x77 if quant_type == "nf4" else 0x00  # two codes of 0.0
        packed = torch.cat([packed.reshape(-1), packed.new_full((pad,), zero_pair)])
    return packed.reshape(-1).view(storage).reshape(-1, 1)


def dequantize_4bit(
    packed: torch.Tensor,
    quant_state: QuantState,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The tensor that ``packed`` and ``quant_state`` encode: shape ``quant_state.shape``, dtype ``out_dtype`` or
    ``quant_state.dtype``. Each value is ``level[code] * absmax`` in float32, rounded once to the output dtype;
    double-quantized scales are decoded inside the same kernel.

    ``out``: a contiguous tensor with the same number of elements to write into (its dtype is the output dtype, and
    it is returned). Reusing one buffer avoids allocating, which on the CPU costs more than the dequantization.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    _check_quant_state(quant_state)
    absmax, nested_absmax, nested_code, offset, nested_blocksize = quant_state.op_args()
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"out must be float32, float16 or bfloat16, got {out.dtype}")
        if out_dtype is not None and out_dtype != out.dtype:
            raise ValueError(f"out_dtype {out_dtype} disagrees with out.dtype {out.dtype}")
        torch.ops.fourbit.dequantize_4bit_into(
            packed, absmax, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), out,
            nested_absmax, nested_code, offset, nested_blocksize,
        )  # fmt: skip
        return out
    return torch.ops.fourbit.dequantize_4bit(
        packed,
        absmax,
        quant_state.blocksize,
        quant_state.quant_type,
        list(quant_state.shape),
        out_dtype or quant_state.dtype,
        nested_absmax,
        nested_code,
        offset,
        nested_blocksize,
    )


def matmul_4bit(
    x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` where W ``[out_features, in_features]`` is the 4-bit weight (``quant_state.shape``).

    x: ``[..., in_features]``, float32 / float16 / bfloat16 (float64 for gradient checks); the result has x's dtype.
    Differentiable in x and bias (the weight is frozen). No full dequantized copy of W is ever kept: small CPU batches
    decode the nibbles in registers, larger ones dequantize a cache-sized tile of rows at a time.
    """
    _check_weight_state(quant_state, "matmul_4bit")
    absmax, nested_absmax, nested_code, offset, nested_blocksize = quant_state.op_args()
    return torch.ops.fourbit.matmul_4bit(
        x, packed, absmax, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), bias,
        nested_absmax, nested_code, offset, nested_blocksize,
    )  # fmt: skip


def lora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    lora_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """The QLoRA forward in one op: ``x @ W.T + scaling * (lora_x @ lora_A.T) @ lora_B.T + bias``.

    W is the 4-bit weight ``[out_features, in_features]``; ``lora_A`` ``[r, in_features]`` and ``lora_B``
    ``[out_features, r]`` share one float dtype (float32 adapters with 16-bit x work: the LoRA input is cast to the
    adapters' dtype and the LoRA term back to x's, as PEFT does). ``lora_x`` defaults to ``x``; pass ``dropout(x)``
    for LoRA dropout. Differentiable in x, lora_A, lora_B, bias and lora_x; the backward re-dequantizes W tile by tile
    and never keeps a full dequantized copy.
    """
    _check_weight_state(quant_state, "lora_linear")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a number, got {scaling!r}")
    absmax, nested_absmax, nested_code, offset, nested_blocksize = quant_state.op_args()
    return torch.ops.fourbit.lora_linear(
        x, packed, absmax, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), lora_A, lora_B,
        float(scaling), bias, lora_x, nested_absmax, nested_code, offset, nested_blocksize,
    )  # fmt: skip


def lora_linear_multi(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Serving several adapters on one 4-bit base in one pass over W (Punica / S-LoRA style).

    Row ``i`` of the batch (``x[i]``, all its tokens) gets ``scaling[j] * (x[i] @ lora_A[j].T) @ lora_B[j].T`` for
    ``j = adapter_index[i]``, or no adapter when ``j == -1``; the base ``x @ W.T + bias`` is computed once for all rows.

    Args:
        x: ``[batch, ..., in_features]``.
        lora_A: ``[adapters, r, in_features]``; lora_B: ``[adapters, out_features, r]`` (adapters of lower rank padded
            with zeros, which changes nothing); scaling: ``[adapters]``.
        adapter_index: integer ``[batch]`` with values in ``[-1, adapters)``.
    """
    if lora_A.dim() != 3 or lora_B.dim() != 3 or lora_A.shape[0] != lora_B.shape[0] or lora_A.shape[1] != lora_B.shape[2]:
        raise ValueError(
            f"lora_A must be [adapters, r, in_features] and lora_B [adapters, out_features, r], got "
            f"{list(lora_A.shape)} and {list(lora_B.shape)}"
        )
    adapters = lora_A.shape[0]
    if not isinstance(scaling, torch.Tensor) or not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"scaling and adapter_index must be tensors, got {type(scaling).__name__} and "
                        f"{type(adapter_index).__name__}")  # fmt: skip
    if scaling.shape != (adapters,):
        raise ValueError(f"scaling must have shape [{adapters}], got {list(scaling.shape)}")
    if adapter_index.dtype not in (torch.int32, torch.int64) or adapter_index.shape != (x.shape[0],):
        raise ValueError(
            f"adapter_index must be an integer tensor of shape [{x.shape[0]}] (one adapter per batch row), got "
            f"{adapter_index.dtype} {list(adapter_index.shape)}"
        )
    if adapter_index.device.type == "cpu" and adapter_index.numel():
        # Values are checked where that costs no device synchronisation (on a GPU an out-of-range index is a
        # device-side assert in the gather below).
        low, high = int(adapter_index.min()), int(adapter_index.max())
        if low < -1 or high >= adapters:
            raise ValueError(f"adapter_index must hold values in [-1, {adapters}), got {low if low < -1 else high}")
    y = matmul_4bit(x, packed, quant_state, bias)
    index = adapter_index.long()
    valid = index >= 0
    safe = index.clamp(min=0)
    rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(lora_A.dtype)  # [batch, tokens, in]
    h = torch.bmm(rows, lora_A[safe].transpose(1, 2))  # [batch, tokens, r]
    term = torch.bmm(h, lora_B[safe].transpose(1, 2))  # [batch, tokens, out]
    term = term * (scaling.to(term.dtype)[safe] * valid.to(term.dtype)).view(-1, 1, 1)
    return y + term.reshape(y.shape).to(y.dtype)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
    group_size: int | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Affine fake quantization: ``(clamp(zero_point + round(x / scale), quant_min, quant_max) - zero_point) * scale``.

    The result equals ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` bit for
    bit (same rounding: ``round(x * (1 / scale))`` half to even, in float32 for 16-bit inputs; float64 inputs compute
    in float64). Granularity:

    * per tensor: ``scale`` and ``zero_point`` hold one value;
    * per channel: ``axis`` given, ``x.shape[axis]`` values;
    * per group: ``group_size`` given, one value per ``group_size`` consecutive elements along the last dimension
      (``x.numel() // group_size`` values, e.g. shaped ``x.shape[:-1] + (x.shape[-1] // group_size,)``).

    ``zero_point`` may be an integer or a float tensor; it is rounded half to even and clamped to
    ``[quant_min, quant_max]`` (as PyTorch's learnable fake-quant ops do).

    Gradients: to ``x`` straight through inside the clamp range and zero outside; to ``scale`` and a float
    ``zero_point`` that require grad, LSQ's (as ``torch._fake_quantize_learnable_per_tensor_affine`` /
    ``..._per_channel_affine``), multiplied by ``grad_factor`` (LSQ suggests ``1 / sqrt(x.numel() * quant_max)``).

    Raises ValueError for ``quant_min >= quant_max``, an ``axis`` out of range, a ``group_size`` that does not divide
    the last dimension, parameter counts that do not match, and (CPU; on CUDA the outputs become NaN instead of
    synchronising to check) a scale that is not positive and finite.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    if not isinstance(zero_point, torch.Tensor):
        zero_point = torch.tensor(int(zero_point), dtype=torch.int32, device=x.device)
    return torch.ops.fourbit.fake_quantize_affine(
        x, scale, zero_point, int(quant_min), int(quant_max), axis, group_size, float(grad_factor)
    )


def fake_quantize_4bit(
    x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = False
) -> torch.Tensor:
    """``dequantize_4bit(*quantize_4bit(x, blocksize, quant_type, compress_statistics))`` bit for bit, in one op.
    Without ``compress_statistics`` it is one pass over ``x`` (no packed bytes are written). With it, every block's
    absmax is needed before any block can be decoded (double quantization subtracts their mean), so the op quantizes,
    double-quantizes the scales and decodes, which reads ``x`` once. Same shape and dtype as ``x``; the gradient
    passes straight through (identity): QAT toward the NF4/FP4 format of ``Linear4bit``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    return torch.ops.fourbit.fake_quantize_4bit(x, blocksize, quant_type, bool(compress_statistics), NESTED_BLOCKSIZE)
