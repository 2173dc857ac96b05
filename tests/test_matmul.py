# SPDX-License-Identifier: Apache-2.0
"""matmul_4bit: x @ W.T + bias with a 4-bit W, against the reference, bitsandbytes and autograd in float64."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

import fourbit
from fourbit import reference as ref
from conftest import dtype_id

# Tolerances relative to the output scale: the kernels sum in another order than the reference (and the GEMV path
# computes 16-bit activations in float32).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _weight(n, k, blocksize=64, quant_type="nf4", nested=False):
    w = torch.randn(n, k) / k**0.5
    packed, state = fourbit.quantize_4bit(w, blocksize, quant_type, compress_statistics=nested)
    return packed, state


def _reference(x, packed, state, bias=None):
    """float64 x @ dequantized W.T + bias."""
    w = fourbit.dequantize_4bit(packed, state, torch.float32).double()
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("batch", [(1,), (2,), (5,), (16,), (2, 3), (27,), (70,)], ids=str)
@pytest.mark.parametrize(
    "nk, blocksize", [((96, 256), 64), ((33, 100), 32), ((128, 4096), 128), ((37, 96), 64)], ids=str
)
@pytest.mark.parametrize("nested", [False, True])
def test_forward_matches_reference(cpu_isa, dtype, batch, nk, blocksize, nested):
    n, k = nk
    packed, state = _weight(n, k, blocksize, nested=nested)
    x = torch.randn(*batch, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = fourbit.matmul_4bit(x, packed, state, bias)
    assert y.shape == (*batch, n) and y.dtype == dtype
    expected = _reference(x, packed, state, bias)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol * expected.abs().max().item())


def test_gemv_and_tiled_paths_agree():
    # Batch 1 takes the GEMV kernel, batch 64 the tiled GEMM; row 0 of both must agree.
    packed, state = _weight(300, 512, 64, "fp4", nested=True)
    x = torch.randn(64, 512)
    y_tiled = fourbit.matmul_4bit(x, packed, state)
    y_gemv = fourbit.matmul_4bit(x[:1], packed, state)
    torch.testing.assert_close(y_gemv, y_tiled[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "nk, blocksize", [((40, 96), 64), ((24, 160), 128), ((17, 32), 4096), ((30, 1056), 64)], ids=str
)
def test_gemv_with_blocks_straddling_rows(cpu_isa, dtype, nk, blocksize):
    # K % 32 == 0 but K % blocksize != 0: the GEMV looks up each 32-element chunk's own block, including blocks that
    # start in one row and end in the next. Every batch up to the GEMV's largest (16: groups of 8, 4, 2, 1 rows of x),
    # rows of W past the last full step of several rows, and (K = 1056) K walked in slices that end mid-block.
    n, k = nk
    packed, state = _weight(n, k, blocksize, nested=True)
    for rows in range(1, 17):
        x = torch.randn(rows, k).to(dtype)
        expected = _reference(x, packed, state)
        rtol, atol = TOLERANCES[dtype]
        y = fourbit.matmul_4bit(x, packed, state)
        torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize(
    "nk, blocksize", [((200, 100), 64), ((151, 96), 64), ((64, 4096), 256), ((1200, 64), 32)], ids=str
)
@pytest.mark.parametrize("rows", [1, 3, 9, 32, 40, 70])
def test_input_gradient_matches_reference(cpu_isa, dtype, nk, blocksize, rows):
    # float32 batches up to 32 with K % 32 == 0 take the input-gradient GEMV on AVX-512 (blocks of 64 rows of W: N =
    # 151 and 1200 end in a partial block; K = 4096: several 512-column strips). Other small and medium batches take
    # the panel path on the CPU (per-thread panels of W starting on block boundaries: with K = 100 and blocksize 64
    # only every 16th row does) or, for bfloat16 with K % 32 == 0 on CPUs with AMX, the AMX path (odd N: a zero row
    # pads the last pair; N = 1200: more than one reduction panel); larger ones the tiled GEMM.
    n, k = nk
    packed, state = _weight(n, k, blocksize, nested=True)
    x = torch.randn(rows, k).to(dtype).requires_grad_()
    grad = torch.randn(rows, n).to(dtype)
    (gx,) = torch.autograd.grad(fourbit.matmul_4bit(x, packed, state), x, grad)
    assert gx.shape == (rows, k) and gx.dtype == dtype
    w = fourbit.dequantize_4bit(packed, state, torch.float32).double()
    expected = grad.double() @ w
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(gx.double(), expected, rtol=rtol, atol=atol * expected.abs().max().item())


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("nkb", [(96, 256, 64), (37, 96, 64), (40, 160, 128)], ids=str)
def test_one_hot_rows_give_the_exact_dequantized_weight(cpu_isa, nested, nkb):
    # x with one 1.0 per row picks single columns of W: every path (GEMV, AMX, panels, tiles) multiplies each weight
    # by 1 and adds zeros, so the result must equal dequantize_4bit's values bit for bit, in bf16 and fp32. This pins
    # the kernels' own decoding (scaled codebooks, nibble order, block scales, VNNI pairs) to the reference exactly.
    n, k, blocksize = nkb
    w = torch.randn(n, k) * torch.rand(n, 1) * 3
    packed, state = fourbit.quantize_4bit(w, blocksize, "nf4", compress_statistics=nested)
    for dtype in (torch.float32, torch.bfloat16):
        w_hat = fourbit.dequantize_4bit(packed, state, dtype)
        for rows in (1, 3, 16, 32, 40, 70):
            cols = torch.randint(0, k, (rows,))
            x = torch.nn.functional.one_hot(cols, k).to(dtype).requires_grad_()
            y = fourbit.matmul_4bit(x, packed, state)
            assert torch.equal(y, w_hat[:, cols].t()), (dtype, rows)
            # backward: one-hot rows of grad_y pick single rows of W
            picks = torch.randint(0, n, (rows,))
            (gx,) = torch.autograd.grad(y, x, torch.nn.functional.one_hot(picks, n).to(dtype))
            assert torch.equal(gx, w_hat[picks]), (dtype, rows)


def test_identity_weight_is_exact():
    # bitsandbytes' test_gemv_eye_4bit: the identity quantizes exactly (1 -> code 15 with absmax 1, 0 -> code 7).
    k = 256
    packed, state = fourbit.quantize_4bit(torch.eye(k), 64)
    for rows in (1, 3, 40):
        x = torch.randn(rows, k) * 0.1
        torch.testing.assert_close(fourbit.matmul_4bit(x, packed, state), x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("rows", [1, 16])
def test_close_to_bitsandbytes(dtype, rows):
    w = torch.randn(256, 512) / 512**0.5
    packed, state = fourbit.quantize_4bit(w.to(dtype), 64, "nf4", compress_statistics=True)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(rows, 512, dtype=dtype)
    ours = fourbit.matmul_4bit(x, packed, state).float()
    theirs = bnb.matmul_4bit(x, bnb_packed.t(), quant_state=bnb_state).float()
    err = (ours - theirs).abs().mean() / theirs.abs().mean()
    assert err < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_gradients_match_autograd_in_float64(rows, nested):
    packed, state = _weight(24, 96, 32, nested=nested)
    x = torch.randn(rows, 96, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fourbit.matmul_4bit(a, packed, state, b), (x, bias))
    # and against autograd through the reference
    w = fourbit.dequantize_4bit(packed, state, torch.float32).double()
    grad = torch.randn(rows, 24, dtype=torch.float64)
    (ours_x, ours_b) = torch.autograd.grad(fourbit.matmul_4bit(x, packed, state, bias), (x, bias), grad)
    (ref_x, ref_b) = torch.autograd.grad(torch.nn.functional.linear(x, w, bias), (x, bias), grad)
    torch.testing.assert_close(ours_x, ref_x)
    torch.testing.assert_close(ours_b, ref_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_backward_in_low_precision(dtype):
    packed, state = _weight(200, 320, 64, nested=True)
    x = torch.randn(3, 7, 320, dtype=dtype, requires_grad=True)
    y = fourbit.matmul_4bit(x, packed, state)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    w = fourbit.dequantize_4bit(packed, state, torch.float32).double()
    expected = grad.double() @ w
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(gx.double(), expected, rtol=rtol, atol=atol * expected.abs().max().item())


def test_bad_input_names_the_argument():
    packed, state = _weight(32, 64)
    with pytest.raises(ValueError, match="x must end in in_features = 64, got shape \\[3, 65\\]"):
        fourbit.matmul_4bit(torch.randn(3, 65), packed, state)
    with pytest.raises(ValueError, match="bias must have shape \\[32\\], got \\[33\\]"):
        fourbit.matmul_4bit(torch.randn(3, 64), packed, state, torch.randn(33))
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64, got Int"):
        fourbit.matmul_4bit(torch.ones(3, 64, dtype=torch.int32), packed, state)
    _, state3d = fourbit.quantize_4bit(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="needs a 2-D weight"):
        fourbit.matmul_4bit(torch.randn(1, 8), packed, state3d)
    with pytest.raises(ValueError, match="packed holds"):
        fourbit.matmul_4bit(torch.randn(3, 64), packed[:10], state)


def test_empty_batch():
    packed, state = _weight(32, 64)
    x = torch.randn(0, 64, requires_grad=True)
    y = fourbit.matmul_4bit(x, packed, state)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert x.grad.shape == (0, 64)


def test_opcheck_and_compile():
    packed, state = _weight(48, 128, 64, nested=True)
    absmax, na, nc, off, nbs = state.op_args()
    for rows in (1, 9):
        x = torch.randn(rows, 128, requires_grad=True)
        args = (x, packed, absmax, 64, "nf4", [48, 128], torch.randn(48), na, nc, off, nbs)
        torch.library.opcheck(torch.ops.fourbit.matmul_4bit.default, args)
    torch._dynamo.reset()
    fn = lambda inp: fourbit.matmul_4bit(inp, packed, state).relu().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 128, requires_grad=True)
    (g_eager,) = torch.autograd.grad(fn(x), x)
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    torch.testing.assert_close(g_compiled, g_eager)


def test_bf16_backward_accumulates_tiles_in_float32():
    # 4096 rows of W = many tiles: the gradient must be as accurate as one bf16 GEMM, not one rounding per tile.
    packed, state = _weight(4096, 256, 64)
    g = torch.randn(8, 4096, dtype=torch.bfloat16)
    w = fourbit.dequantize_4bit(packed, state, torch.float32).double()
    absmax, na, nc, off, nbs = state.op_args()
    ours = torch.ops.fourbit.matmul_4bit_grad_x(g, packed, absmax, 64, "nf4", [4096, 256], na, nc, off, nbs)
    exact = g.double() @ w
    dense = (g @ w.bfloat16()).double()  # torch's own bf16 GEMM, for scale
    err, dense_err = (ours.double() - exact).abs().mean(), (dense - exact).abs().mean()
    assert err <= 1.5 * dense_err + 1e-6, (err, dense_err)
