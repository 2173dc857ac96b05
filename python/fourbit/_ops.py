# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) implementations of fourbit's operators, for torch.compile, FakeTensor and torch.library.opcheck.

The schemas are declared once in csrc/ops.cpp (which points torch here with set_python_module). A fake computes
output shapes and dtypes only; it checks the same metadata rules as csrc/quant_checks.h with the same messages, so a
bad call fails the same way eagerly and under torch.compile.
"""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if not (32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize}")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got '{quant_type}'")


def _ceil_div(a, b):
    return (a + b - 1) // b


@torch.library.register_fake("fourbit::quantize_4bit")
def _quantize_4bit_fake(A, blocksize, quant_type):
    _check_quant_type(quant_type)
    if A.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"A (the tensor to quantize) must be float32, float16 or bfloat16, got {A.dtype}")
    _check_blocksize(blocksize)
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = A.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("fourbit::dequantize_4bit")
def _dequantize_4bit_fake(
    packed, absmax, blocksize, quant_type, shape, dtype, nested_absmax=None, nested_code=None, offset=None,
    nested_blocksize=256,
):  # fmt: skip
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype (the output dtype) must be float32, float16 or bfloat16, got {dtype}")
    n = math.prod(shape)
    torch._check(
        packed.numel() * packed.element_size() >= (n + 1) // 2,
        lambda: f"packed holds {packed.numel() * packed.element_size()} bytes but shape {list(shape)} needs "
        f"{(n + 1) // 2}",
    )
    torch._check(
        absmax.dim() == 1 and absmax.numel() == _ceil_div(n, blocksize),
        lambda: f"absmax must have {_ceil_div(n, blocksize)} values, got shape {tuple(absmax.shape)}",
    )
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("fourbit::dequantize_4bit_into")
def _dequantize_4bit_into_fake(
    packed, absmax, blocksize, quant_type, shape, out, nested_absmax=None, nested_code=None, offset=None,
    nested_blocksize=256,
):  # fmt: skip
    _dequantize_4bit_fake(packed, absmax, blocksize, quant_type, shape, out.dtype)
    torch._check(out.numel() == math.prod(shape), lambda: f"out must have {math.prod(shape)} elements")


@torch.library.register_fake("fourbit::double_quantize")
def _double_quantize_fake(absmax, nested_blocksize=256):
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32, got {absmax.dtype}")
    _check_blocksize(nested_blocksize, "nested_blocksize")
    n = absmax.numel()
    return (
        absmax.new_empty((n,), dtype=torch.uint8),
        absmax.new_empty((_ceil_div(n, nested_blocksize),)),
        absmax.new_empty(()),
    )


@torch.library.register_fake("fourbit::dequantize_absmax")
def _dequantize_absmax_fake(qabsmax, nested_absmax, nested_code, offset, nested_blocksize=256):
    return qabsmax.new_empty(qabsmax.shape, dtype=torch.float32)


@torch.library.register_fake("fourbit::quant_map")
def _quant_map_fake(name):
    if name not in ("nf4", "fp4", "dynamic"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got '{name}'")
    return torch.empty((256 if name == "dynamic" else 16,), dtype=torch.float32)


def _check_weight_shape(shape):
    if len(shape) != 2:
        raise ValueError(f"shape must be the weight's [out_features, in_features], got {list(shape)}")


@torch.library.register_fake("fourbit::matmul_4bit")
def _matmul_4bit_fake(
    x, packed, absmax, blocksize, quant_type, shape, bias=None, nested_absmax=None, nested_code=None, offset=None,
    nested_blocksize=256,
):  # fmt: skip
    _check_weight_shape(shape)
    torch._check(x.shape[-1] == shape[1], lambda: f"x must end in in_features = {shape[1]}, got shape {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("fourbit::matmul_4bit_grad_x")
def _matmul_4bit_grad_x_fake(
    grad_y, packed, absmax, blocksize, quant_type, shape, nested_absmax=None, nested_code=None, offset=None,
    nested_blocksize=256,
):  # fmt: skip
    _check_weight_shape(shape)
    torch._check(grad_y.shape[-1] == shape[0], lambda: f"grad_y must end in out_features = {shape[0]}")
    return grad_y.new_empty((*grad_y.shape[:-1], shape[1]))


# ---- autograd of matmul_4bit: gradients to x and bias; the 4-bit weight is frozen (no gradient). The backward
# dequantizes W again, tile by tile, instead of saving a dequantized copy from the forward.
def _matmul_4bit_setup_context(ctx, inputs, output):
    # Direct op calls may leave the trailing defaulted arguments out.
    (x, packed, absmax, blocksize, quant_type, shape, bias, nested_absmax, nested_code, offset,
     nested_blocksize) = inputs + (None,) * (11 - len(inputs))  # fmt: skip
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
    ctx.weight_args = (blocksize, quant_type, shape, 256 if nested_blocksize is None else nested_blocksize)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _matmul_4bit_backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    blocksize, quant_type, shape, nested_blocksize = ctx.weight_args
    # torch drops trailing arguments left at their defaults, so needs_input_grad may be shorter than the schema.
    needs = ctx.needs_input_grad
    grad_x = grad_bias = None
    if needs[0]:
        grad_x = torch.ops.fourbit.matmul_4bit_grad_x(
            grad, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize
        )
    if len(needs) > 6 and needs[6]:
        grad_bias = grad.reshape(-1, shape[0]).sum(0).to(ctx.bias_dtype)
    return (grad_x, None, None, None, None, None, grad_bias, None, None, None, None)[: len(needs)]


torch.library.register_autograd(
    "fourbit::matmul_4bit", _matmul_4bit_backward, setup_context=_matmul_4bit_setup_context
)


@torch.library.register_fake("fourbit::lora_linear")
def _lora_linear_fake(
    x, packed, absmax, blocksize, quant_type, shape, lora_A, lora_B, scaling, bias=None, lora_x=None,
    nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256,
):  # fmt: skip
    _check_weight_shape(shape)
    torch._check(x.shape[-1] == shape[1], lambda: f"x must end in in_features = {shape[1]}, got shape {tuple(x.shape)}")
    torch._check(
        lora_A.dim() == 2 and lora_A.shape[1] == shape[1],
        lambda: f"lora_A must have shape [r, in_features = {shape[1]}], got {list(lora_A.shape)}",
    )
    torch._check(
        lora_B.dim() == 2 and lora_B.shape[0] == shape[0] and lora_B.shape[1] == lora_A.shape[0],
        lambda: f"lora_B must have shape [out_features = {shape[0]}, r = {lora_A.shape[0]}], got {list(lora_B.shape)}",
    )
    return x.new_empty((*x.shape[:-1], shape[0]))


# ---- autograd of lora_linear: gradients to x (through the 4-bit weight and the adapters), lora_A, lora_B, bias and
# lora_x. Saved: the adapters and the LoRA input (h = lora_x @ A.T, r columns, is recomputed) -- never a dequantized
# W. setup_context only saves references: it runs no ops on the inputs.
def _lora_linear_setup_context(ctx, inputs, output):
    (x, packed, absmax, blocksize, quant_type, shape, lora_A, lora_B, scaling, bias, lora_x, nested_absmax,
     nested_code, offset, nested_blocksize) = inputs + (None,) * (15 - len(inputs))  # fmt: skip
    lora_input = x if lora_x is None else lora_x
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, lora_input)
    ctx.weight_args = (blocksize, quant_type, shape, 256 if nested_blocksize is None else nested_blocksize)
    ctx.scaling = scaling
    ctx.separate_lora_x = lora_x is not None
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _lora_linear_backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, lora_input = ctx.saved_tensors
    blocksize, quant_type, shape, nested_blocksize = ctx.weight_args
    lx = lora_input.reshape(-1, shape[1]).to(lora_A.dtype)
    needs = ctx.needs_input_grad
    need = lambda i: len(needs) > i and needs[i]  # noqa: E731  (trailing defaulted inputs are dropped)
    n_out, k_in = shape
    g = grad.reshape(-1, n_out)
    ga = g.to(lora_A.dtype)
    grad_h = (ga @ lora_B) * ctx.scaling  # [M, r]
    grad_x = grad_A = grad_B = grad_bias = grad_lora_x = None
    if need(6):
        grad_A = grad_h.t() @ lx
    if need(7):
        grad_B = (ga.t() @ (lx @ lora_A.t())) * ctx.scaling
    grad_lx = (grad_h @ lora_A) if (need(0) and not ctx.separate_lora_x) or need(10) else None
    if need(0):
        grad_x = torch.ops.fourbit.matmul_4bit_grad_x(
            grad, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize
        )
        if not ctx.separate_lora_x:
            grad_x = grad_x + grad_lx.reshape(ctx.x_shape).to(grad_x.dtype)
    if need(10):
        grad_lora_x = grad_lx.reshape(ctx.x_shape).to(ctx.x_dtype)
    if need(9):
        grad_bias = g.sum(0).to(ctx.bias_dtype)
    grads = (grad_x, None, None, None, None, None, grad_A, grad_B, None, grad_bias, grad_lora_x, None, None, None, None)
    return grads[: len(needs)]


torch.library.register_autograd("fourbit::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup_context)
