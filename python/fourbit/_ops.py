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


def _as_rows(t, features):
    # Not reshape(-1, features): with features == 0 (a weight with no inputs or outputs is legal) -1 is ambiguous.
    return t.reshape(math.prod(t.shape[:-1]), features)


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


def _check_same_device(t, name, ref, ref_name):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


# The bias checks of matmul.cpp / linear_int.cpp.
def _check_bias(bias, out_features, weight, weight_name):
    if bias is None:
        return
    torch._check_value(
        bias.dim() == 1 and bias.shape[0] == out_features,
        lambda: f"bias must have shape [{out_features}], got {list(bias.shape)}",
    )
    _check_same_device(bias, "bias", weight, weight_name)


# csrc/tiled_matmul.h check_activation.
def _check_activation(t, name, features, what, weight, weight_name):
    if t.dtype not in (*_FLOAT_DTYPES, torch.float64):
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    torch._check_value(
        t.dim() >= 1 and t.shape[-1] == features,
        lambda: f"{name} must end in {what} = {features}, got shape {list(t.shape)}",
    )
    _check_same_device(t, name, weight, weight_name)


@torch.library.register_fake("fourbit::matmul_4bit")
def _matmul_4bit_fake(
    x, packed, absmax, blocksize, quant_type, shape, bias=None, nested_absmax=None, nested_code=None, offset=None,
    nested_blocksize=256,
):  # fmt: skip
    _check_weight_shape(shape)
    _check_activation(x, "x", shape[1], "in_features", packed, "packed")
    _check_bias(bias, shape[0], packed, "packed")
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
        grad_bias = _as_rows(grad, shape[0]).sum(0).to(ctx.bias_dtype)
    return (grad_x, None, None, None, None, None, grad_bias, None, None, None, None)[: len(needs)]


torch.library.register_autograd(
    "fourbit::matmul_4bit", _matmul_4bit_backward, setup_context=_matmul_4bit_setup_context
)


@torch.library.register_fake("fourbit::lora_linear")
def _lora_linear_fake(
    x, packed, absmax, blocksize, quant_type, shape, lora_A, lora_B, scaling, bias=None, lora_x=None,
    nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256,
):  # fmt: skip
    # The checks of csrc/matmul.cpp lora_linear and check_adapters, in the same order.
    _check_weight_shape(shape)
    if not lora_A.dtype.is_floating_point:
        raise TypeError(f"lora_A must be a float tensor, got {lora_A.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B must have lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    torch._check_value(
        lora_A.dim() == 2 and lora_A.shape[1] == shape[1],
        lambda: f"lora_A must have shape [r, in_features = {shape[1]}], got {list(lora_A.shape)}",
    )
    torch._check_value(
        lora_B.dim() == 2 and lora_B.shape[0] == shape[0] and lora_B.shape[1] == lora_A.shape[0],
        lambda: f"lora_B must have shape [out_features = {shape[0]}, r = {lora_A.shape[0]}], got {list(lora_B.shape)}",
    )
    _check_same_device(lora_A, "lora_A", packed, "packed")
    _check_same_device(lora_B, "lora_B", packed, "packed")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if lora_x is not None:
        torch._check_value(
            list(lora_x.shape) == list(x.shape),
            lambda: f"lora_x must have x's shape {list(x.shape)}, got {list(lora_x.shape)}",
        )
        _check_activation(lora_x, "lora_x", shape[1], "in_features", packed, "packed")
    return _matmul_4bit_fake(x, packed, absmax, blocksize, quant_type, shape, bias)


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


# Rows per step of the LoRA term in lora_linear's backward on the CPU (the forward's is kLoraRowChunk in
# csrc/matmul.cpp).
_LORA_ROW_CHUNK = 64


def _lora_linear_backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, lora_input = ctx.saved_tensors
    blocksize, quant_type, shape, nested_blocksize = ctx.weight_args
    needs = ctx.needs_input_grad
    need = lambda i: len(needs) > i and needs[i]  # noqa: E731  (trailing defaulted inputs are dropped)
    n_out, k_in = shape
    grad_x = grad_A = grad_B = grad_bias = grad_lora_x = None
    # The 4-bit product first: its kernels' buffers are gone before the LoRA term's temporaries exist.
    if need(0):
        grad_x = torch.ops.fourbit.matmul_4bit_grad_x(
            grad, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize
        )
    g = _as_rows(grad, n_out)
    if need(9):
        grad_bias = g.sum(0).to(ctx.bias_dtype)
    lx_all = _as_rows(lora_input, k_in)
    add_to_x = need(0) and not ctx.separate_lora_x
    gx_rows = _as_rows(grad_x, k_in) if add_to_x else None
    if need(10):
        grad_lora_x = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=grad.device)
        glx_rows = _as_rows(grad_lora_x, k_in)
    if need(6):
        grad_A = torch.zeros_like(lora_A)
    if need(7):
        grad_B = torch.zeros_like(lora_B)
    # On the CPU, the LoRA term _LORA_ROW_CHUNK rows at a time: its copies of grad and of the input in the adapters'
    # dtype (float32 adapters with 16-bit activations) stay small at large batches. (On a GPU, one step: each chunk
    # would cost kernel launches.)
    chunk = _LORA_ROW_CHUNK if grad.device.type == "cpu" else max(g.shape[0], 1)
    for m0 in range(0, g.shape[0], chunk):
        ga = g[m0 : m0 + chunk].to(lora_A.dtype)
        grad_h = (ga @ lora_B) * ctx.scaling  # [rows, r]
        if need(6) or need(7):
            lx = lx_all[m0 : m0 + chunk].to(lora_A.dtype)
            if need(6):
                grad_A.addmm_(grad_h.t(), lx)
            if need(7):
                grad_B.addmm_(ga.t(), lx @ lora_A.t(), alpha=ctx.scaling)
        if add_to_x or need(10):
            grad_lx = grad_h @ lora_A
            if need(10):
                glx_rows[m0 : m0 + chunk] = grad_lx
            if add_to_x:
                gx_rows[m0 : m0 + chunk] += grad_lx.to(grad_x.dtype)
    grads = (grad_x, None, None, None, None, None, grad_A, grad_B, None, grad_bias, grad_lora_x, None, None, None, None)
    return grads[: len(needs)]


torch.library.register_autograd("fourbit::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup_context)


# ---- QAT: affine fake quantization (STE / LSQ), 4-bit fake quantization, LinearInt ----
def _check_fake_quantize_args(x, scale, zero_point, quant_min, quant_max, axis, group_size):
    """The metadata rules of csrc/qat_checks.h (check_fake_quantize_args), with the same messages."""
    if x.dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not quant_min < quant_max:
        raise ValueError(f"quant_min must be less than quant_max, got quant_min={quant_min} and quant_max={quant_max}")
    if quant_min < -(1 << 24) or quant_max > (1 << 24):
        raise ValueError(f"quant_min and quant_max must lie in [-2^24, 2^24], got {quant_min} and {quant_max}")
    if not scale.dtype.is_floating_point:
        raise TypeError(f"scale must be a float tensor, got {scale.dtype}")
    if zero_point.dtype == torch.bool or zero_point.dtype.is_complex:
        raise TypeError(f"zero_point must be an integer or float tensor, got {zero_point.dtype}")
    if axis is not None and group_size is not None:
        raise ValueError(f"give axis (per channel) or group_size (per group), not both; got axis={axis} and group_size={group_size}")
    if axis is not None:
        if not (x.dim() > 0 and -x.dim() <= axis < x.dim()):
            raise ValueError(f"axis must be in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {axis}")
        expected, what = x.shape[axis], "one value per channel (x.shape[axis]) = "
    elif group_size is not None:
        if x.dim() == 0:
            raise ValueError("group_size needs x with at least one dimension, got a scalar")
        if not (group_size > 0 and x.shape[-1] % group_size == 0):
            raise ValueError(f"group_size must be positive and divide x.shape[-1] = {x.shape[-1]}, got {group_size}")
        expected, what = x.numel() // group_size, "one value per group (x.numel() / group_size) = "
    else:
        expected, what = 1, "1 value (per tensor)"
    torch._check(
        scale.numel() == expected,
        lambda: f"scale must hold {what}{'' if what.endswith(')') else expected}, got shape "
        f"{list(scale.shape)}",
    )
    torch._check(
        zero_point.numel() == scale.numel(),
        lambda: f"zero_point must have scale's {scale.numel()} values, got shape {tuple(zero_point.shape)}",
    )


@torch.library.register_fake("fourbit::fake_quantize_affine")
def _fake_quantize_affine_fake(x, scale, zero_point, quant_min, quant_max, axis=None, group_size=None, grad_factor=1.0):
    _check_fake_quantize_args(x, scale, zero_point, quant_min, quant_max, axis, group_size)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fourbit::fake_quantize_affine_backward")
def _fake_quantize_affine_backward_fake(
    grad, x, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor, param_grads
):  # fmt: skip
    _check_fake_quantize_args(x, scale, zero_point, quant_min, quant_max, axis, group_size)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if not param_grads:
        return dx, scale.new_empty((0,)), zero_point.new_empty((0,))
    return dx, torch.empty_like(scale), torch.empty_like(zero_point)


def _fake_quantize_affine_setup_context(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor = inputs + (None, None, 1.0)[
        len(inputs) - 5 :
    ]  # fmt: skip
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (quant_min, quant_max, axis, group_size, 1.0 if grad_factor is None else grad_factor)


def _fake_quantize_affine_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    quant_min, quant_max, axis, group_size, grad_factor = ctx.args
    needs = ctx.needs_input_grad
    param_grads = needs[1] or needs[2]
    grad_x, grad_scale, grad_zero_point = torch.ops.fourbit.fake_quantize_affine_backward(
        grad, x, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor, param_grads
    )
    grads = (
        grad_x if needs[0] else None,
        grad_scale if needs[1] else None,
        grad_zero_point if needs[2] and zero_point.dtype.is_floating_point else None,
    )
    return grads + (None,) * (len(needs) - 3)


torch.library.register_autograd(
    "fourbit::fake_quantize_affine", _fake_quantize_affine_backward, setup_context=_fake_quantize_affine_setup_context
)


@torch.library.register_fake("fourbit::fake_quantize_4bit")
def _fake_quantize_4bit_fake(x, blocksize, quant_type, compress_statistics=False, nested_blocksize=256):
    _check_quant_type(quant_type)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"A (the tensor to quantize) must be float32, float16 or bfloat16, got {x.dtype}")
    _check_blocksize(blocksize)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# The straight-through estimator: the gradient passes through the 4-bit rounding unchanged.
def _fake_quantize_4bit_setup_context(ctx, inputs, output):
    ctx.n_inputs = len(inputs)


def _fake_quantize_4bit_backward(ctx, grad):
    return (grad,) + (None,) * (ctx.n_inputs - 1)


torch.library.register_autograd(
    "fourbit::fake_quantize_4bit", _fake_quantize_4bit_backward, setup_context=_fake_quantize_4bit_setup_context
)


def _check_int_weight(qweight, scale, zero_point, bits, group_size, shape):
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    _check_weight_shape(shape)
    n, k = shape
    torch._check(
        group_size > 0 and k % group_size == 0 and (bits == 8 or group_size % 2 == 0),
        lambda: f"group_size must be positive and divide in_features = {k}, got {group_size}",
    )
    torch._check(
        tuple(qweight.shape) == (n, k * bits // 8),
        lambda: f"qweight must be contiguous with shape [{n}, {k * bits // 8}], got shape {tuple(qweight.shape)}",
    )
    torch._check(
        tuple(scale.shape) == (n, k // group_size),
        lambda: f"scale must be contiguous with shape [{n}, {k // group_size}], got shape {tuple(scale.shape)}",
    )


@torch.library.register_fake("fourbit::dequantize_int_into")
def _dequantize_int_into_fake(qweight, scale, zero_point, bits, group_size, shape, out):
    _check_int_weight(qweight, scale, zero_point, bits, group_size, shape)


@torch.library.register_fake("fourbit::dequantize_int")
def _dequantize_int_fake(qweight, scale, zero_point, bits, group_size, shape, dtype):
    _check_int_weight(qweight, scale, zero_point, bits, group_size, shape)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype (the output dtype) must be float32, float16 or bfloat16, got {dtype}")
    return qweight.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("fourbit::matmul_int")
def _matmul_int_fake(x, qweight, scale, zero_point, bits, group_size, shape, bias=None):
    _check_int_weight(qweight, scale, zero_point, bits, group_size, shape)
    _check_activation(x, "x", shape[1], "in_features", qweight, "qweight")
    _check_bias(bias, shape[0], qweight, "qweight")
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("fourbit::matmul_int_grad_x")
def _matmul_int_grad_x_fake(grad_y, qweight, scale, zero_point, bits, group_size, shape):
    _check_int_weight(qweight, scale, zero_point, bits, group_size, shape)
    _check_activation(grad_y, "grad_y", shape[0], "out_features", qweight, "qweight")
    return grad_y.new_empty((*grad_y.shape[:-1], shape[1]))


# ---- autograd of matmul_int: gradients to x and bias (the integer weight is frozen), W re-dequantized tile by tile.
def _matmul_int_setup_context(ctx, inputs, output):
    x, qweight, scale, zero_point, bits, group_size, shape, bias = inputs + (None,) * (8 - len(inputs))
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.weight_args = (bits, group_size, shape)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _matmul_int_backward(ctx, grad):
    qweight, scale, zero_point = ctx.saved_tensors
    bits, group_size, shape = ctx.weight_args
    needs = ctx.needs_input_grad
    grad_x = grad_bias = None
    if needs[0]:
        grad_x = torch.ops.fourbit.matmul_int_grad_x(grad, qweight, scale, zero_point, bits, group_size, shape)
    if len(needs) > 7 and needs[7]:
        grad_bias = _as_rows(grad, shape[0]).sum(0).to(ctx.bias_dtype)
    return (grad_x, None, None, None, None, None, None, grad_bias)[: len(needs)]


torch.library.register_autograd("fourbit::matmul_int", _matmul_int_backward, setup_context=_matmul_int_setup_context)
