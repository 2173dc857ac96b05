# SPDX-License-Identifier: Apache-2.0
"""fourbit.nn.LinearInt and its ops: the dequantized weight equals the fake-quantized weight bit for bit, matmul_int
against F.linear, gradients, state_dict round trip, dtype casts, bad input, opcheck, CUDA."""

import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import fourbit
from fourbit.nn import LinearInt
from fourbit.nn.linear_int import int_qparams, quantize_int_weight
from conftest import DTYPES, dtype_id, requires_gpu

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
CONFIGS = [(4, 32, True), (4, 16, False), (8, 64, True), (8, 32, False), (4, 2, True)]


def _fake_quantized(weight, bits, group_size, symmetric):
    scale, zp, qmin, qmax = int_qparams(weight, bits, group_size, symmetric)
    return fourbit.fake_quantize(weight, scale, zp, qmin, qmax, group_size=group_size)


@pytest.mark.parametrize("bits, group_size, symmetric", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dequantized_weight_equals_fake_quantized(cpu_isa, bits, group_size, symmetric, dtype):
    linear = torch.nn.Linear(128, 48).to(dtype)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row
        linear.weight[5, :7] *= 50  # outliers
    layer = LinearInt.from_linear(linear, bits, group_size, symmetric)
    expected = _fake_quantized(linear.weight, bits, group_size, symmetric)
    assert torch.equal(layer.dequantize(), expected)
    assert layer.dequantize().dtype == dtype
    if dtype == torch.float32:  # other output dtypes: the float32 value rounded once
        for out_dtype in DTYPES:
            assert torch.equal(layer.dequantize(out_dtype), expected.to(out_dtype))


def test_codes_and_layout():
    w = torch.tensor([[0.0, 1.0, -1.0, 0.5]])
    qweight, scale, zp = quantize_int_weight(w, torch.tensor([[0.25]]), torch.tensor([[0.0]]), -8, 7, 4, 4)
    # levels 0, 4, -4, 2 shifted by 8 -> 8, 12, 4, 10; first element in the high nibble
    assert qweight.tolist() == [[0x8C, 0x4A]] and zp.tolist() == [[8]] and scale.tolist() == [[0.25]]
    q8, _, zp8 = quantize_int_weight(w, torch.tensor([[0.25]]), torch.tensor([[3.0]]), 0, 255, 8, 4)
    assert q8.tolist() == [[3, 7, 0, 5]] and zp8.tolist() == [[3]]


@pytest.mark.parametrize("bits, group_size, symmetric", CONFIGS[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("batch", [(1,), (5, 7), (70,)], ids=str)
def test_forward_backward_against_dense(bits, group_size, symmetric, dtype, batch):
    linear = torch.nn.Linear(128, 96).to(dtype)
    layer = LinearInt.from_linear(linear, bits, group_size, symmetric)
    dense = layer.dequantize(dtype)
    x = torch.randn(*batch, 128, dtype=dtype, requires_grad=True)
    y = layer(x)
    expected = F.linear(x.detach(), dense, linear.bias.detach())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, expected, **tol)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ dense, **tol)
    assert layer.bias.grad is not None and layer.weight.grad is None


def test_large_layer_uses_several_tiles_and_float64():
    linear = torch.nn.Linear(512, 2304)  # 1.2M weights: several 64K..4M-element tiles
    layer = LinearInt.from_linear(linear, 4, 64)
    x = torch.randn(3, 512, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    dense = layer.dequantize(torch.float32).double()
    torch.testing.assert_close(y, F.linear(x.detach(), dense, linear.bias.detach().double()))
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ dense)
    small = LinearInt.from_linear(torch.nn.Linear(8, 4), 8, 8)
    assert torch.autograd.gradcheck(small, (torch.randn(2, 8, dtype=torch.float64, requires_grad=True),))


def test_state_dict_round_trip_and_casts():
    linear = torch.nn.Linear(64, 32)
    layer = LinearInt.from_linear(linear, 4, 32, symmetric=False)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "weight_zero_point", "bias"}
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    fresh = LinearInt(64, 32, bits=4, group_size=32)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))
    half = copy.deepcopy(layer).half()
    assert half.weight_scale.dtype == torch.float32 and torch.equal(half.weight_scale, layer.weight_scale)
    assert half.weight.dtype == torch.uint8 and half.bias.dtype == torch.float16
    torch.testing.assert_close(half(x.half()).float(), layer(x), rtol=1e-2, atol=1e-2)
    bad = dict(sd)
    bad["weight_scale"] = -sd["weight_scale"]
    with pytest.raises(RuntimeError, match="scales must be positive and finite"):
        fresh.load_state_dict(bad)
    bad["weight_scale"] = sd["weight_scale"][:, :0]
    with pytest.raises(RuntimeError, match="weight_scale: expected torch.float32 of shape"):
        fresh.load_state_dict(bad)


def test_bad_input():
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        LinearInt(64, 32, bits=3)
    with pytest.raises(ValueError, match="group_size must be positive .* divide in_features = 64, got 24"):
        LinearInt(64, 32, group_size=24)
    with pytest.raises(ValueError, match="group_size must be positive and divide in_features = 64, got 48"):
        LinearInt.from_linear(torch.nn.Linear(64, 8), 8, 48)
    layer = LinearInt(64, 32)
    with pytest.raises(ValueError, match="x must end in in_features = 64"):
        layer(torch.randn(2, 63))
    args = list(layer._op_args())
    with pytest.raises(ValueError, match="qweight must be contiguous with shape \\[32, 32\\]"):
        torch.ops.fourbit.dequantize_int(args[0][:, :5], *args[1:], torch.float32)
    with pytest.raises(ValueError, match="scale must be contiguous with shape \\[32, 2\\]"):
        torch.ops.fourbit.dequantize_int(args[0], args[1][:4], *args[2:], torch.float32)
    with pytest.raises(TypeError, match="zero_point must be uint8"):
        torch.ops.fourbit.dequantize_int(args[0], args[1], args[2].int(), *args[3:], torch.float32)
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 2"):
        torch.ops.fourbit.dequantize_int(args[0], args[1], args[2], 2, *args[4:], torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n, k", [(8, 0), (0, 32)], ids=["no_inputs", "no_outputs"])
@pytest.mark.parametrize("rows", [(1,), (3,), (40,), (2, 5)], ids=str)
def test_matmul_int_empty_weight_forward_and_backward(bits, n, k, rows):
    # LinearInt refuses in_features or out_features 0 at construction, but the op takes such a weight, like
    # matmul_4bit: the output is the bias (K = 0) or empty (N = 0), the gradients zero or empty.
    qweight = torch.zeros(n, k * bits // 8, dtype=torch.uint8)
    scale, zero_point = torch.ones(n, k // 32), torch.zeros(n, k // 32, dtype=torch.uint8)
    x = torch.randn(*rows, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    y = torch.ops.fourbit.matmul_int(x, qweight, scale, zero_point, bits, 32, [n, k], bias)
    torch.testing.assert_close(y, bias.detach().expand(*rows, n), rtol=0, atol=0)
    grad = torch.randn_like(y)
    grad_x, grad_bias = torch.autograd.grad(y, (x, bias), grad)
    assert grad_x.shape == x.shape and not grad_x.any()
    torch.testing.assert_close(grad_bias, grad.flatten(0, -2).sum(0))


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize(
    "op, overrides, error, message",
    [
        ("matmul_int", dict(x=torch.randn(3, 65)), ValueError, r"x must end in in_features = 64, got shape \[3, 65\]"),
        ("matmul_int", dict(x=torch.ones(3, 64, dtype=torch.int32)), TypeError, "x must be float32, float16, bfloat16"),
        ("matmul_int", dict(bias=torch.randn(25)), ValueError, r"bias must have shape \[24\], got \[25\]"),
        ("matmul_int_grad_x", dict(x=torch.randn(3, 23)), ValueError, "grad_y must end in out_features = 24"),
    ],
    ids=["x_features", "x_dtype", "bias_shape", "grad_y_features"],
)
def test_fake_refuses_bad_input_as_eager_does(fake, op, overrides, error, message):
    # Under FakeTensorMode (torch.compile's tracing) the op's fake must refuse what the eager op refuses, with the
    # same exception type and message.
    layer = LinearInt.from_linear(torch.nn.Linear(64, 24), 4, 32)
    call = dict(x=torch.randn(3, 64) if op == "matmul_int" else torch.randn(3, 24), bias=None)
    call.update(overrides)
    args = layer._op_args()
    mode = torch._subclasses.fake_tensor.FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        if fake:
            call = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in call.items()}
            args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        with pytest.raises(error, match=message):
            if op == "matmul_int":
                torch.ops.fourbit.matmul_int(call["x"], *args, call["bias"])
            else:
                torch.ops.fourbit.matmul_int_grad_x(call["x"], *args)


@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck(bits):
    layer = LinearInt.from_linear(torch.nn.Linear(64, 24), bits, 32)
    args = layer._op_args()
    torch.library.opcheck(torch.ops.fourbit.dequantize_int.default, (*args, torch.bfloat16), test_utils=OPCHECK_TESTS)
    out = torch.empty(24, 64)
    torch.library.opcheck(torch.ops.fourbit.dequantize_int_into.default, (*args, out), test_utils=OPCHECK_TESTS)
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.fourbit.matmul_int.default, (x, *args, layer.bias.detach()),
                          test_utils=OPCHECK_TESTS)  # fmt: skip
    torch.library.opcheck(torch.ops.fourbit.matmul_int_grad_x.default, (torch.randn(3, 24), *args),
                          test_utils=OPCHECK_TESTS)  # fmt: skip


@requires_gpu
@pytest.mark.parametrize("bits, group_size, symmetric", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_equals_cpu(bits, group_size, symmetric, dtype):
    linear = torch.nn.Linear(256, 80).to(dtype)
    layer = LinearInt.from_linear(linear, bits, group_size, symmetric)
    gpu = copy.deepcopy(layer).cuda()
    assert torch.equal(gpu.dequantize().cpu(), layer.dequantize())
    x = torch.randn(9, 256, dtype=dtype)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), layer(x), rtol=2e-2, atol=2e-2)
