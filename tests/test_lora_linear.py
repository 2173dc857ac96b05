# SPDX-License-Identifier: Apache-2.0
"""lora_linear: the QLoRA forward and its fused backward, against the reference in float64 and PEFT's arithmetic."""

import pytest
import torch

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
