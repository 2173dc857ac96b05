# SPDX-License-Identifier: Apache-2.0
"""fourbit.nn.Linear4bit: forward, dtype/device handling, and state dicts interchangeable with bitsandbytes'."""

import copy
import io
import pickle

import bitsandbytes as bnb
import pytest
import torch

import fourbit
from fourbit.nn import Linear4bit
from conftest import dtype_id


def _bnb_layer(linear, quant_type="nf4", nested=True, storage=torch.uint8):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=nested, quant_type=quant_type,
                              quant_storage=storage)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested, blocksize=64, quant_storage=storage)  # fmt: skip
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.clone())
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_equals_matmul_on_the_dequantized_weight(nested, quant_type):
    linear = torch.nn.Linear(300, 200)
    layer = Linear4bit.from_linear(linear, quant_type=quant_type, compress_statistics=nested)
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.uint8
    x = torch.randn(4, 7, 300, requires_grad=True)
    y = layer(x)
    expected = torch.nn.functional.linear(x.double(), layer.dequantize(torch.float32).double(), linear.bias.double())
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and layer.bias.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_state_dict_is_bitsandbytes_format_both_ways(nested, storage):
    # in_features a multiple of the block size: bitsandbytes 0.50.2's CPU forward gets blocks that straddle rows
    # wrong (see test_quantize.py::test_bytes_equal_bitsandbytes).
    linear = torch.nn.Linear(128, 40)
    theirs = _bnb_layer(linear, nested=nested, storage=storage)
    ours = Linear4bit.from_linear(linear, compress_statistics=nested, quant_storage=storage)
    bnb_sd, our_sd = theirs.state_dict(), ours.state_dict()
    assert list(our_sd) == list(bnb_sd)
    for key in bnb_sd:
        if key.endswith("nested_absmax") or key.endswith("bitsandbytes__nf4"):
            continue  # carries the double-quantization offset: float64 mean here, float32 mean there
        if key.endswith(".absmax") and nested:
            continue  # 8-bit codes of absmax may differ by one step in rare near-ties (see test_quantize.py)
        assert torch.equal(our_sd[key].view(torch.uint8), bnb_sd[key].view(torch.uint8)), key  # bytes: NaN patterns
    x = torch.randn(5, 128)
    # bitsandbytes' state dict -> fourbit
    loaded = Linear4bit(128, 40)
    loaded.load_state_dict(bnb_sd)
    assert loaded.weight.dtype == storage
    torch.testing.assert_close(loaded(x), theirs(x), rtol=1e-4, atol=1e-5)
    # fourbit's state dict -> bitsandbytes (the way transformers loads pre-quantized checkpoints)
    stats = {k[len("weight."):]: v for k, v in our_sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=our_sd["weight"], quantized_stats=stats, device="cpu")
    rebuilt = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, quant_storage=storage)
    rebuilt.weight, rebuilt.bias = param, torch.nn.Parameter(our_sd["bias"])
    torch.testing.assert_close(rebuilt(x), ours(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_dtype_casts_never_touch_the_quantization(dtype):
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), compress_statistics=True, quant_storage=torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(dtype)
    layer.half().float()
    assert layer.bias.dtype == torch.float32
    for key, value in layer.state_dict().items():
        if key != "bias":
            assert value.dtype == before[key].dtype and torch.equal(value.view(torch.uint8), before[key].view(torch.uint8)), key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 64))
    assert y.dtype in (torch.float32, torch.bfloat16)


def test_compute_dtype_and_output_dtype():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    assert Linear4bit.from_linear(torch.nn.Linear(64, 32))(x.bfloat16()).dtype == torch.bfloat16  # no compute_dtype
    ref = torch.nn.functional.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()).float()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def test_deepcopy_and_pickle_keep_the_quantization():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 48), quant_type="fp4")
    x = torch.randn(2, 64)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.quant_state == layer.quant_state and torch.equal(clone.weight, layer.weight)
        assert torch.equal(clone(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = Linear4bit(64, 48)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored(x), layer(x)) and restored.quant_type == "fp4"


def test_parameters_and_buffers_are_addressable():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 48))
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert {n for n, _ in layer.named_buffers()} == {
        "weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map", "weight_offset"
    }  # fmt: skip


def test_bad_state_dicts_are_rejected():
    good = Linear4bit.from_linear(torch.nn.Linear(64, 48)).state_dict()
    layer = Linear4bit(64, 32)
    with pytest.raises(RuntimeError, match="does not match this layer's \\(32, 64\\)"):
        layer.load_state_dict(good)
    corrupt = dict(good)
    corrupt["weight.nested_absmax"] = torch.tensor([float("nan")])
    with pytest.raises(RuntimeError, match="nested_absmax holds a non-finite value"):
        Linear4bit(64, 48).load_state_dict(corrupt)
    truncated = dict(good, weight=good["weight"][:100])
    with pytest.raises(RuntimeError, match="weight holds 100 bytes, the quantization state needs 1536"):
        Linear4bit(64, 48).load_state_dict(truncated)
    plain = {"weight": torch.randn(48, 64), "bias": torch.randn(48)}
    with pytest.raises(RuntimeError, match="no quantization state"):
        Linear4bit(64, 48).load_state_dict(plain)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        Linear4bit.from_linear(torch.nn.Conv1d(3, 3, 1))
