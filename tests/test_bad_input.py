# SPDX-License-Identifier: Apache-2.0
"""Bad input to the ops gets a Python exception naming the argument and the value, never a crash."""

import subprocess
import sys

import pytest
import torch

import fourbit


def test_quantize_rejects_integer_input():
    with pytest.raises(TypeError, match="A \\(the tensor to quantize\\) must be float32, float16 or bfloat16, got Int"):
        fourbit.quantize_4bit(torch.ones(64, dtype=torch.int32))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_quantize_rejects_blocksizes(blocksize):
    with pytest.raises(ValueError, match=f"blocksize must be a power of two in \\[32, 4096\\], got {blocksize}"):
        fourbit.quantize_4bit(torch.randn(128), blocksize)


def test_quantize_rejects_unknown_quant_type():
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        fourbit.quantize_4bit(torch.randn(128), 64, "int4")


def test_quantize_rejects_non_tensors():
    with pytest.raises(TypeError, match="A must be a torch.Tensor, got list"):
        fourbit.quantize_4bit([1.0, 2.0])
    with pytest.raises(TypeError, match="quant_storage must be a torch.dtype"):
        fourbit.quantize_4bit(torch.randn(64), quant_storage="uint8")


def _quantized(n=1000, blocksize=64, nested=False):
    return fourbit.quantize_4bit(torch.randn(n), blocksize, compress_statistics=nested)


def test_dequantize_rejects_a_packed_buffer_too_short_for_the_shape():
    packed, state = _quantized()
    with pytest.raises(ValueError, match="packed holds 499 bytes but shape \\[1000\\] needs 500"):
        fourbit.dequantize_4bit(packed[:-1], state)


def test_dequantize_rejects_a_shape_larger_than_the_data():
    packed, state = _quantized()
    state.shape = torch.Size([10_000])  # the absmax no longer matches either
    with pytest.raises(ValueError, match="packed holds 500 bytes but shape \\[10000\\] needs 5000"):
        fourbit.dequantize_4bit(packed, state)


def test_dequantize_rejects_absmax_of_the_wrong_length():
    packed, state = _quantized()
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="absmax must have 16 values .* got shape \\[15\\]"):
        fourbit.dequantize_4bit(packed, state)


def test_dequantize_rejects_wrong_dtypes():
    packed, state = _quantized()
    with pytest.raises(TypeError, match="dtype \\(the output dtype\\) must be float32, float16 or bfloat16, got Double"):
        fourbit.dequantize_4bit(packed, state, torch.float64)
    state.absmax = state.absmax.half()
    with pytest.raises(TypeError, match="absmax must be float32, got Half"):
        fourbit.dequantize_4bit(packed, state)


def test_dequantize_rejects_inconsistent_nested_arguments():
    packed, state = _quantized(nested=True)
    absmax, nested_absmax, nested_code, offset, nbs = state.op_args()
    op = torch.ops.fourbit.dequantize_4bit
    with pytest.raises(ValueError, match="must be given together"):
        op(packed, absmax, 64, "nf4", [1000], torch.float32, nested_absmax, None, offset, nbs)
    with pytest.raises(ValueError, match="nested_code must be 256 contiguous values"):
        op(packed, absmax, 64, "nf4", [1000], torch.float32, nested_absmax, nested_code[:100], offset, nbs)
    with pytest.raises(ValueError, match="nested_absmax must have 1 contiguous values"):
        op(packed, absmax, 64, "nf4", [1000], torch.float32, torch.ones(5), nested_code, offset, nbs)
    with pytest.raises(ValueError, match="nested_blocksize must be a positive power of two, got 100"):
        op(packed, absmax, 64, "nf4", [1000], torch.float32, nested_absmax, nested_code, offset, 100)
    with pytest.raises(ValueError, match="shape must not have negative sizes"):
        op(packed, absmax, 64, "nf4", [-1000], torch.float32, nested_absmax, nested_code, offset, nbs)


def test_dequantize_rejects_non_quant_state():
    packed, state = _quantized()
    with pytest.raises(TypeError, match="quant_state must be a fourbit.QuantState, got dict"):
        fourbit.dequantize_4bit(packed, state.as_dict())


def test_dequantize_rejects_non_contiguous_packed():
    packed, state = _quantized(n=2000)
    strided = torch.stack([packed, packed], dim=1).reshape(-1, 2)[:, 0]
    with pytest.raises(ValueError, match="packed must be contiguous"):
        fourbit.dequantize_4bit(strided, state)


def test_hostile_arguments_never_crash_the_process():
    # Direct op calls with lying metadata, in a subprocess: each must raise, and the interpreter must survive.
    code = r"""
import torch, fourbit
op = torch.ops.fourbit.dequantize_4bit
cases = [
    (torch.zeros(1, dtype=torch.uint8), torch.ones(1), 64, "nf4", [1 << 40], torch.float32),
    (torch.zeros(10, dtype=torch.uint8), torch.ones(1), 64, "nf4", [1 << 62, 4], torch.float32),
    (torch.zeros(0, dtype=torch.uint8), torch.ones(0), 64, "nf4", [2], torch.float32),
    (torch.zeros(32, dtype=torch.uint8), torch.ones(1, 1), 64, "nf4", [64], torch.float32),
]
raised = 0
for args in cases:
    try:
        op(*args)
    except (ValueError, TypeError, RuntimeError):
        raised += 1
print("raised", raised)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "raised 4" in proc.stdout
