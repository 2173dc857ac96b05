# SPDX-License-Identifier: Apache-2.0
"""lora_linear: the QLoRA forward and its fused backward, against the reference in float64 and PEFT's arithmetic."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fourbit
from conftest import dtype_id


def _setup(n=40, k=96, r=8, blocksize=32, nested=True, adapter_dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    packed, state = fourbit.quantize_4bit(w, blocksize, "nf4", compress_statistics=nested)
    A = (torch.randn(r, k, generator=g) / k**0.5).to(adapter_dtype)
    B = (torch.randn(n, r, generator=g) / r**0.5).to(adapter_dtype)
    return packed, state, A, B


def _reference(x, packed, state, A, B, scaling, bias=None, lora_x=None):
    w = fourbit.dequantize_4bit(packed, state, torch.float32).to(x.dtype)
    lx = x if lora_x is None else lora_x
    y = torch.nn.functional.linear(x, w, bias)
    return y + scaling * (lx.to(A.dtype) @ A.t() @ B.t()).to(y.dtype)


@pytest.mark.parametrize("rows", [(1,), (4,), (2, 9), (40,)], ids=str)
def test_forward_and_gradients_match_the_reference_in_float64(rows):
    packed, state, A, B = _setup()
    x = torch.randn(*rows, 96, dtype=torch.float64, requires_grad=True)
    A.requires_grad_()
    B.requires_grad_()
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    scaling = 0.75
    y = fourbit.lora_linear(x, packed, state, A, B, scaling, bias)
    expected = _reference(x, packed, state, A, B, scaling, bias)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, A, B, bias), grad)
    theirs = torch.autograd.grad(expected, (x, A, B, bias), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda x_, a_, b_, bias_: fourbit.lora_linear(x_, packed, state, a_, b_, scaling, bias_), (x, A, B, bias)
    )


def test_separate_lora_input_for_dropout():
    packed, state, A, B = _setup()
    x = torch.randn(5, 96, dtype=torch.float64, requires_grad=True)
    lora_x = torch.randn(5, 96, dtype=torch.float64, requires_grad=True)  # stands for dropout(x)
    A.requires_grad_()
    y = fourbit.lora_linear(x, packed, state, A, B, 2.0, lora_x=lora_x)
    expected = _reference(x, packed, state, A, B, 2.0, lora_x=lora_x)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, lora_x, A), grad), torch.autograd.grad(expected, (x, lora_x, A), grad)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda x_, lx_: fourbit.lora_linear(x_, packed, state, A.detach(), B, 2.0, lora_x=lx_), (x, lora_x)
    )


@pytest.mark.parametrize("separate_lora_x", [False, True], ids=["lora_x=x", "lora_x"])
def test_batches_above_the_lora_chunk_match_the_reference(separate_lora_x):
    # The LoRA term runs 64 rows at a time in both directions (csrc/matmul.cpp kLoraRowChunk, _ops.py
    # _LORA_ROW_CHUNK): 150 rows in a 3-D x give two full chunks and a partial one, whose sums into grad_A and grad_B
    # and whose rows of grad_x / grad_lora_x must all land in place.
    packed, state, A, B = _setup()
    x = torch.randn(3, 50, 96, dtype=torch.float64, requires_grad=True)
    lora_x = torch.randn(3, 50, 96, dtype=torch.float64, requires_grad=True) if separate_lora_x else None
    A.requires_grad_()
    B.requires_grad_()
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    y = fourbit.lora_linear(x, packed, state, A, B, 0.75, bias, lora_x=lora_x)
    expected = _reference(x, packed, state, A, B, 0.75, bias, lora_x=lora_x)
    torch.testing.assert_close(y, expected)
    inputs = (x, A, B, bias) + ((lora_x,) if separate_lora_x else ())
    grad = torch.randn_like(y)
    for ours, theirs in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_float32_adapters_with_half_precision_input(cpu_isa, x_dtype):
    # PEFT casts the LoRA input to the adapters' dtype and the LoRA output back to the base layer's.
    packed, state, A, B = _setup(n=64, k=128, adapter_dtype=torch.float32)
    A.requires_grad_()
    B.requires_grad_()
    x = torch.randn(3, 128, dtype=x_dtype, requires_grad=True)
    y = fourbit.lora_linear(x, packed, state, A, B, 0.5)
    assert y.dtype == x_dtype
    expected = _reference(x.detach().double(), packed, state, A.detach().double(), B.detach().double(), 0.5)
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    y.float().square().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32 and x.grad.dtype == x_dtype
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()


def test_zero_lora_B_gives_the_base_layer():
    packed, state, A, B = _setup(adapter_dtype=torch.float32)
    x = torch.randn(6, 96)
    y = fourbit.lora_linear(x, packed, state, A, torch.zeros_like(B), 1.0)
    torch.testing.assert_close(y, fourbit.matmul_4bit(x, packed, state), rtol=0, atol=0)


def test_bad_input_names_the_argument():
    packed, state, A, B = _setup(adapter_dtype=torch.float32)
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="lora_A must have shape \\[r, in_features = 96\\], got \\[8, 95\\]"):
        fourbit.lora_linear(x, packed, state, A[:, :95], B, 1.0)
    with pytest.raises(ValueError, match="lora_B must have shape \\[out_features = 40, r = 8\\], got \\[40, 7\\]"):
        fourbit.lora_linear(x, packed, state, A, B[:, :7], 1.0)
    with pytest.raises(TypeError, match="lora_B must have lora_A's dtype Float, got Double"):
        fourbit.lora_linear(x, packed, state, A, B.double(), 1.0)
    with pytest.raises(ValueError, match="lora_x must have x's shape"):
        fourbit.lora_linear(x, packed, state, A, B, 1.0, lora_x=torch.randn(3, 96))
    with pytest.raises(ValueError, match="x must end in in_features = 96"):
        fourbit.lora_linear(torch.randn(2, 97), packed, state, A, B, 1.0)


def test_opcheck_and_compile():
    packed, state, A, B = _setup(adapter_dtype=torch.float32)
    absmax, na, nc, off, nbs = state.op_args()
    x = torch.randn(3, 96, requires_grad=True)
    args = (x, packed, absmax, 32, "nf4", [40, 96], A.requires_grad_(), B.requires_grad_(), 0.5, torch.randn(40),
            None, na, nc, off, nbs)  # fmt: skip
    torch.library.opcheck(torch.ops.fourbit.lora_linear.default, args)
    torch._dynamo.reset()
    fn = lambda inp: fourbit.lora_linear(inp, packed, state, A, B, 0.5).sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(fn(x), (x, A, B)), torch.autograd.grad(compiled(x), (x, A, B))):
        torch.testing.assert_close(a, b)


def _lora_linear_op(fake, x, A, B, scaling, bias=None, lora_x=None):
    """torch.ops.fourbit.lora_linear on a [40, 96] weight, eagerly or with every tensor a FakeTensor (the fake
    implementation alone, as torch.compile and torch.export run it)."""
    packed, state, _, _ = _setup(adapter_dtype=torch.float32)
    absmax, na, nc, off, nbs = state.op_args()
    args = (x, packed, absmax, 32, "nf4", [40, 96], A, B, scaling, bias, lora_x, na, nc, off, nbs)
    if not fake:
        return torch.ops.fourbit.lora_linear(*args)
    with FakeTensorMode() as mode:
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        return torch.ops.fourbit.lora_linear(*args)


# (what is wrong, overrides of the valid call, exception, message). The messages name the argument and its value; the
# dtype is spelled Float in C++ and torch.float32 in the fake, so those patterns stop before it.
_BAD_LORA_CALLS = [
    ("nan scaling", dict(scaling=float("nan")), ValueError, r"scaling must be finite, got nan"),
    ("inf scaling", dict(scaling=float("inf")), ValueError, r"scaling must be finite, got inf"),
    ("-inf scaling", dict(scaling=float("-inf")), ValueError, r"scaling must be finite, got -inf"),
    ("lora_x rows", dict(lora_x=torch.randn(3, 96)), ValueError,
     r"lora_x must have x's shape \[2, 96\], got \[3, 96\]"),
    ("lora_x features", dict(lora_x=torch.randn(2, 95)), ValueError,
     r"lora_x must have x's shape \[2, 96\], got \[2, 95\]"),
    ("lora_x dtype", dict(lora_x=torch.ones(2, 96, dtype=torch.int32)), TypeError,
     r"lora_x must be float32, float16, bfloat16 or float64, got "),
    ("lora_A shape", dict(A=torch.randn(8, 95)), ValueError,
     r"lora_A must have shape \[r, in_features = 96\], got \[8, 95\]"),
    ("lora_A 1-D", dict(A=torch.randn(96)), ValueError, r"lora_A must have shape \[r, in_features = 96\], got \[96\]"),
    ("lora_A dtype", dict(A=torch.ones(8, 96, dtype=torch.int32), B=torch.ones(40, 8, dtype=torch.int32)), TypeError,
     r"lora_A must be a float tensor, got "),
    ("lora_B shape", dict(B=torch.randn(40, 7)), ValueError,
     r"lora_B must have shape \[out_features = 40, r = 8\], got \[40, 7\]"),
    ("lora_B dtype", dict(B=torch.randn(40, 8, dtype=torch.float64)), TypeError, r"lora_B must have lora_A's dtype "),
    ("x features", dict(x=torch.randn(2, 97)), ValueError, r"x must end in in_features = 96, got shape \[2, 97\]"),
    ("x 0-D", dict(x=torch.tensor(1.0)), ValueError, r"x must end in in_features = 96, got shape \[\]"),
    ("x dtype", dict(x=torch.ones(2, 96, dtype=torch.int32)), TypeError,
     r"x must be float32, float16, bfloat16 or float64, got "),
    ("bias shape", dict(bias=torch.randn(39)), ValueError, r"bias must have shape \[40\], got \[39\]"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize(
    "overrides, error, message", [c[1:] for c in _BAD_LORA_CALLS], ids=[c[0] for c in _BAD_LORA_CALLS]
)
def test_fake_refuses_bad_input_as_eager_does(fake, overrides, error, message):
    call = dict(x=torch.randn(2, 96), A=torch.randn(8, 96), B=torch.randn(40, 8), scaling=0.5)
    call.update(overrides)
    with pytest.raises(error, match=message):
        _lora_linear_op(fake, **call)


def test_fake_accepts_valid_input():
    y = _lora_linear_op(True, torch.randn(2, 5, 96), torch.randn(8, 96), torch.randn(40, 8), 0.5, torch.randn(40),
                        torch.randn(2, 5, 96))  # fmt: skip
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32


@pytest.mark.parametrize("bad", ["scaling", "lora_x"])
def test_compile_refuses_bad_input_while_tracing(bad):
    # Dynamo turns any exception of a fake implementation into its TorchRuntimeError (a RuntimeError, raised while
    # tracing, before anything runs) that quotes the original, type and message. Without the fake's check the graph
    # would compile and only the eager op inside it would refuse the call, with a bare ValueError.
    packed, state, A, B = _setup(adapter_dtype=torch.float32)
    scaling, lora_x = (float("nan"), None) if bad == "scaling" else (0.5, torch.randn(3, 96))
    torch._dynamo.reset()
    fn = torch.compile(
        lambda x_: fourbit.lora_linear(x_, packed, state, A, B, scaling, lora_x=lora_x), fullgraph=True,
        backend="aot_eager",
    )  # fmt: skip
    message = {"scaling": r"scaling must be finite, got nan",
               "lora_x": r"lora_x must have x's shape \[2, 96\], got \[3, 96\]"}[bad]  # fmt: skip
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=rf"got ValueError\(.{message}.\)"):
        fn(torch.randn(2, 96))


@pytest.mark.parametrize("rows", [(1,), (3,), (40,), (2, 5), (0,), ()], ids=str)
@pytest.mark.parametrize("separate_lora_x", [False, True], ids=["x", "lora_x"])
def test_no_input_features_backward_matches_autograd(rows, separate_lora_x):
    # K = 0: W is [N, 0], legal; y = bias, and every gradient is an empty or zero tensor of its input's shape.
    packed, state = fourbit.quantize_4bit(torch.randn(8, 0), 64)
    x = torch.randn(*rows, 0, dtype=torch.float64, requires_grad=True)
    lora_x = torch.randn(*rows, 0, dtype=torch.float64, requires_grad=True) if separate_lora_x else None
    A = torch.randn(2, 0, dtype=torch.float64, requires_grad=True)
    B = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    y = fourbit.lora_linear(x, packed, state, A, B, 0.5, bias, lora_x=lora_x)
    expected = _reference(x, packed, state, A, B, 0.5, bias, lora_x=lora_x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    inputs = (x, A, B, bias) + ((lora_x,) if separate_lora_x else ())
    grad = torch.randn_like(y)
    theirs = torch.autograd.grad(expected, inputs, grad)
    for ours, ref, t in zip(torch.autograd.grad(y, inputs, grad), theirs, inputs):
        assert ours.shape == t.shape and ours.dtype == t.dtype
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [(1,), (3,), (40,)], ids=str)
def test_no_output_features_backward_matches_autograd(rows):
    # N = 0: W is [0, K]; the bias gradient is [0] and the other gradients are zero.
    packed, state = fourbit.quantize_4bit(torch.randn(0, 64), 64)
    x = torch.randn(*rows, 64, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    B = torch.randn(0, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(0, dtype=torch.float64, requires_grad=True)
    for op, inputs in [
        (lambda: fourbit.matmul_4bit(x, packed, state, bias), (x, bias)),
        (lambda: fourbit.lora_linear(x, packed, state, A, B, 0.5, bias), (x, A, B, bias)),
    ]:
        y = op()
        assert y.shape == (*rows, 0)
        for g, t in zip(torch.autograd.grad(y, inputs, torch.randn_like(y)), inputs):
            assert g.shape == t.shape and g.dtype == t.dtype and not g.any()


def test_multi_adapter_rows_equal_each_adapter_on_its_rows():
    packed, state, _, _ = _setup(n=40, k=96, adapter_dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 8, 96, generator=g, dtype=torch.float64) / 10
    B = torch.randn(3, 40, 8, generator=g, dtype=torch.float64) / 10
    A[2, 4:] = 0  # a rank-4 adapter padded to rank 8
    B[2, :, 4:] = 0
    scaling = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    index = torch.tensor([1, -1, 0, 2, 1])
    x = torch.randn(5, 7, 96, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64)
    y = fourbit.lora_linear_multi(x, packed, state, A, B, scaling, index, bias)
    for row, j in enumerate(index.tolist()):
        if j < 0:
            expected = fourbit.matmul_4bit(x[row], packed, state, bias)
        else:
            expected = fourbit.lora_linear(x[row], packed, state, A[j], B[j], float(scaling[j]), bias)
        torch.testing.assert_close(y[row], expected)
    A.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, a_: fourbit.lora_linear_multi(x_, packed, state, a_, B, scaling, index), (x[:, :2], A)
    )


def test_multi_adapter_bad_input():
    packed, state, _, _ = _setup(n=40, k=96, adapter_dtype=torch.float32)
    A, B, s = torch.zeros(2, 4, 96), torch.zeros(2, 40, 4), torch.ones(2)
    x = torch.randn(3, 96)
    with pytest.raises(ValueError, match="adapter_index must be an integer tensor of shape \\[3\\]"):
        fourbit.lora_linear_multi(x, packed, state, A, B, s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lora_A must be \\[adapters, r, in_features\\]"):
        fourbit.lora_linear_multi(x, packed, state, A, B[:, :, :3], s, torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="scaling must have shape \\[2\\]"):
        fourbit.lora_linear_multi(x, packed, state, A, B, torch.ones(3), torch.tensor([0, 1, -1]))
