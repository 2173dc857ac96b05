# SPDX-License-Identifier: Apache-2.0
"""The registered operators: opcheck (schema, fake impl, dynamic shapes) and torch.compile without graph breaks."""

import pytest
import torch

import fourbit
from conftest import DTYPES, dtype_id

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _inputs(shape=(33, 65), dtype=torch.float32, blocksize=64, nested=False):
    x = torch.randn(shape).to(dtype)
    packed, state = fourbit.quantize_4bit(x, blocksize, "nf4", compress_statistics=nested)
    return x, packed, state


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(33, 65), (4, 64), (1,)], ids=str)
def test_opcheck_quantize_4bit(dtype, shape):
    x = torch.randn(shape).to(dtype)
    torch.library.opcheck(torch.ops.fourbit.quantize_4bit.default, (x, 64, "nf4"), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.fourbit.quantize_4bit.default, (x, 32, "fp4"), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=dtype_id)
def test_opcheck_dequantize_4bit(nested, out_dtype):
    x, packed, state = _inputs(nested=nested)
    absmax, nested_absmax, nested_code, offset, nested_blocksize = state.op_args()
    args = (packed, absmax, 64, "nf4", list(x.shape), out_dtype, nested_absmax, nested_code, offset, nested_blocksize)
    torch.library.opcheck(torch.ops.fourbit.dequantize_4bit.default, args, test_utils=OPCHECK_TESTS)
    out = torch.empty(x.shape, dtype=out_dtype)
    into_args = args[:5] + (out,) + args[6:]
    torch.library.opcheck(torch.ops.fourbit.dequantize_4bit_into.default, into_args, test_utils=OPCHECK_TESTS)


def test_opcheck_double_quantize_and_dequantize_absmax():
    absmax = torch.rand(1000) + 0.1
    torch.library.opcheck(torch.ops.fourbit.double_quantize.default, (absmax, 256), test_utils=OPCHECK_TESTS)
    q, nested_absmax, offset = torch.ops.fourbit.double_quantize(absmax, 256)
    code = torch.ops.fourbit.quant_map("dynamic")
    torch.library.opcheck(
        torch.ops.fourbit.dequantize_absmax.default, (q, nested_absmax, code, offset, 256), test_utils=OPCHECK_TESTS
    )


@pytest.mark.parametrize("nested", [False, True])
def test_compile_fullgraph_quantize_dequantize(nested):
    torch._dynamo.reset()

    def round_trip(x):
        packed, state = fourbit.quantize_4bit(x, 64, "nf4", compress_statistics=nested)
        return fourbit.dequantize_4bit(packed, state, torch.float32) * 2

    x = torch.randn(48, 128)
    compiled = torch.compile(round_trip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), round_trip(x))
    y = torch.randn(64, 96)  # a second shape: recompiles (or runs dynamic) without breaking the graph
    assert torch.equal(compiled(y), round_trip(y))


def test_compile_fullgraph_returns_a_quant_state():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fourbit.quantize_4bit(x, 64, "fp4"), fullgraph=True, backend="aot_eager")
    x = torch.randn(64, 64)
    packed, state = compiled(x)
    eager_packed, eager_state = fourbit.quantize_4bit(x, 64, "fp4")
    assert torch.equal(packed, eager_packed) and state == eager_state


def test_compile_inductor_dequantize_in_a_graph():
    torch._dynamo.reset()
    x = torch.randn(64, 256)
    packed, state = fourbit.quantize_4bit(x, 64)
    fn = lambda inp: inp @ fourbit.dequantize_4bit(packed, state).t()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    inp = torch.randn(3, 256)
    torch.testing.assert_close(compiled(inp), fn(inp))
