# SPDX-License-Identifier: Apache-2.0
"""CUDA kernels write the same bytes as the CPU kernels. Skipped without a GPU; bench/gpu_check.sh runs them."""

import pytest
import torch

import fourbit
from conftest import BLOCKSIZES, DTYPES, dtype_id, requires_gpu

pytestmark = requires_gpu


def _assert_same(cpu_tensor, cuda_tensor):
    got = cuda_tensor.cpu()
    assert got.dtype == cpu_tensor.dtype and got.shape == cpu_tensor.shape
    if got.is_floating_point():
        assert torch.equal(torch.isnan(got), torch.isnan(cpu_tensor))
        got, cpu_tensor = got.nan_to_num(0.0), cpu_tensor.nan_to_num(0.0)
    assert torch.equal(got, cpu_tensor)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(1,), (7, 63), (257, 4096 + 33), (2, 3, 1000)], ids=str)
def test_cuda_bytes_equal_cpu(dtype, quant_type, blocksize, nested, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    x.reshape(-1)[::11] = 0
    cpu_packed, cpu_state = fourbit.quantize_4bit(x, blocksize, quant_type, compress_statistics=nested)
    gpu_packed, gpu_state = fourbit.quantize_4bit(x.cuda(), blocksize, quant_type, compress_statistics=nested)
    _assert_same(cpu_packed, gpu_packed)
    _assert_same(cpu_state.absmax, gpu_state.absmax)
    if nested:
        _assert_same(cpu_state.offset, gpu_state.offset)
        _assert_same(cpu_state.state2.absmax, gpu_state.state2.absmax)
        _assert_same(torch.ops.fourbit.dequantize_absmax(*cpu_state.op_args()[:4], 256),
                     torch.ops.fourbit.dequantize_absmax(*gpu_state.op_args()[:4], 256))  # fmt: skip
    for out_dtype in DTYPES:
        _assert_same(fourbit.dequantize_4bit(cpu_packed, cpu_state, out_dtype),
                     fourbit.dequantize_4bit(gpu_packed, gpu_state, out_dtype))  # fmt: skip


def test_cuda_special_values_and_unaligned_views():
    x = torch.randn(4 * 4096 + 7)
    x[:64] = 0
    x[100] = float("nan")
    x[200] = float("inf")
    for offset in (0, 1, 3):  # storage offsets that break 16-byte alignment take the scalar path
        view = x.cuda()[offset:]
        cpu_packed, cpu_state = fourbit.quantize_4bit(x[offset:], 64)
        gpu_packed, gpu_state = fourbit.quantize_4bit(view, 64)
        _assert_same(cpu_packed, gpu_packed)
        _assert_same(cpu_state.absmax, gpu_state.absmax)
        packed_view = torch.cat([torch.zeros(1, 1, dtype=torch.uint8, device="cuda"), gpu_packed])[1:]
        out = fourbit.dequantize_4bit(packed_view, gpu_state)
        _assert_same(fourbit.dequantize_4bit(cpu_packed, cpu_state), out)


def test_cuda_non_contiguous_and_empty():
    base = torch.randn(96, 130, device="cuda", dtype=torch.bfloat16)
    packed, state = fourbit.quantize_4bit(base.t(), 64)
    packed_c, state_c = fourbit.quantize_4bit(base.t().contiguous(), 64)
    assert torch.equal(packed, packed_c) and torch.equal(state.absmax, state_c.absmax)
    packed, state = fourbit.quantize_4bit(torch.empty(0, 64, device="cuda"), compress_statistics=True)
    assert fourbit.dequantize_4bit(packed, state).shape == (0, 64)


def test_cuda_device_mismatch_is_a_value_error():
    packed, state = fourbit.quantize_4bit(torch.randn(1000, device="cuda"))
    with pytest.raises(ValueError, match="absmax is on cpu but packed is on cuda:0"):
        torch.ops.fourbit.dequantize_4bit(packed, state.absmax.cpu(), 64, "nf4", [1000], torch.float32)
    with pytest.raises(ValueError, match="out is on cpu but packed is on cuda:0"):
        fourbit.dequantize_4bit(packed, state, out=torch.empty(1000))


def test_cuda_opcheck():
    x = torch.randn(33, 65, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.fourbit.quantize_4bit.default, (x, 64, "nf4"))
    packed, state = fourbit.quantize_4bit(x, 64, compress_statistics=True)
    absmax, na, nc, off, nbs = state.op_args()
    torch.library.opcheck(
        torch.ops.fourbit.dequantize_4bit.default, (packed, absmax, 64, "nf4", [33, 65], torch.bfloat16, na, nc, off, nbs)
    )
    torch.library.opcheck(torch.ops.fourbit.double_quantize.default, (torch.rand(3000, device="cuda"), 256))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_cuda_matmul_matches_cpu(dtype, rows):
    w = torch.randn(512, 1024) / 32
    packed, state = fourbit.quantize_4bit(w, 64, compress_statistics=True)
    x = torch.randn(rows, 1024).to(dtype)
    bias = torch.randn(512).to(dtype)
    expected = fourbit.matmul_4bit(x.double(), packed, state, bias.double())
    gpu_state = fourbit.QuantState.from_dict(state.as_dict(packed=True), device="cuda")
    xg = x.cuda().requires_grad_()
    y = fourbit.matmul_4bit(xg, packed.cuda(), gpu_state, bias.cuda())
    tol = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    y.sum().backward()
    w_hat = fourbit.dequantize_4bit(packed, state).double()
    expected_grad = torch.ones(rows, 512, dtype=torch.float64) @ w_hat
    torch.testing.assert_close(xg.grad.double().cpu(), expected_grad, rtol=tol, atol=tol * expected_grad.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("nkb", [(40, 96, 64), (300, 4096, 128), (17, 100, 32), (5, 64, 4096)], ids=str)
def test_cuda_gemv_matches_reference(dtype, quant_type, nested, nkb):
    # Batches 1..8 take the CUDA GEMV kernel when K % 32 == 0 (K = 96 with blocksize 64: blocks straddle rows);
    # K = 100 falls back to the tiled path. Also a 3-D x and an unaligned view of x (the tiled fallback).
    n, k, blocksize = nkb
    w = torch.randn(n, k) / k**0.5
    packed, state = fourbit.quantize_4bit(w, blocksize, quant_type, compress_statistics=nested)
    gpu_state = fourbit.QuantState.from_dict(state.as_dict(packed=True), device="cuda")
    w_hat = fourbit.dequantize_4bit(packed, state, torch.float32).double()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for rows in (*range(1, 9), (2, 3)):
        shape = (rows, k) if isinstance(rows, int) else (*rows, k)
        x = torch.randn(shape).to(dtype)
        y = fourbit.matmul_4bit(x.cuda(), packed.cuda(), gpu_state)
        expected = x.double() @ w_hat.t()
        assert y.shape == (*shape[:-1], n) and y.dtype == dtype
        torch.testing.assert_close(y.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    # Views: non-contiguous (copied, then the GEMV) and contiguous but not 16-byte aligned (the tiled fallback).
    for x in (torch.randn(3, k + 1).to(dtype).cuda()[:, 1:], torch.randn(3 * k + 1).to(dtype).cuda()[1:].view(3, k)):
        y = fourbit.matmul_4bit(x, packed.cuda(), gpu_state)
        expected = x.double().cpu() @ w_hat.t()
        torch.testing.assert_close(y.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    # No rows: an empty result of the right shape.
    assert fourbit.matmul_4bit(torch.randn(0, k).to(dtype).cuda(), packed.cuda(), gpu_state).shape == (0, n)
