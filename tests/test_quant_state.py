# SPDX-License-Identifier: Apache-2.0
"""QuantState: bitsandbytes' fields, dict and state-dict forms, and validation of what is loaded."""

import bitsandbytes.functional as bnbF
import pytest
import torch

import fourbit
from fourbit import QuantState


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitsandbytes_state_loads_in_fourbit(nested, quant_type, dtype):
    w = torch.randn(96, 130).to(dtype)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    state = QuantState.from_dict(bnb_state.as_dict(packed=True), device="cpu")
    assert state.shape == w.shape and state.dtype == dtype and state.nested == nested
    ours = fourbit.dequantize_4bit(bnb_packed, state)
    theirs = bnbF.dequantize_4bit(bnb_packed, bnb_state)
    if nested:  # fourbit decodes the nested scales in its kernel; bitsandbytes in a separate pass: rounding only
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fourbit_state_loads_in_bitsandbytes(nested, quant_type):
    w = torch.randn(64, 200, dtype=torch.float16)
    packed, state = fourbit.quantize_4bit(w, 128, quant_type, compress_statistics=nested)
    ours_dict = state.as_dict(packed=True)
    bnb_state = bnbF.QuantState.from_dict(ours_dict, device=torch.device("cpu"))
    theirs = bnbF.dequantize_4bit(packed, bnb_state)
    ours = fourbit.dequantize_4bit(packed, state)
    torch.testing.assert_close(ours, theirs, rtol=1e-3 if nested else 0, atol=1e-6 if nested else 0)


@pytest.mark.parametrize("nested", [False, True])
def test_packed_dict_is_byte_identical_to_bitsandbytes(nested):
    w = torch.randn(64, 256)
    packed, state = fourbit.quantize_4bit(w, 64, "nf4", compress_statistics=nested)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    # Use bitsandbytes' own offset so the JSON (which carries it) can be compared byte for byte.
    if nested:
        state.offset = bnb_state.offset
        state.absmax, state.state2.absmax = bnb_state.absmax, bnb_state.state2.absmax
    ours, theirs = state.as_dict(packed=True), bnb_state.as_dict(packed=True)
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_dict_round_trip_and_equality():
    packed, state = fourbit.quantize_4bit(torch.randn(10, 100), 32, "fp4", compress_statistics=True)
    for packed_form in (True, False):
        again = QuantState.from_dict(state.as_dict(packed=packed_form))
        assert again == state
    prefixed = {f"model.layers.0.mlp.weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    assert QuantState.from_dict(prefixed) == state
    assert QuantState.from_dict(state.as_dict(packed=True)) != fourbit.quantize_4bit(torch.randn(10, 100), 32, "fp4")[1]


def _nf4_dict(**overrides):
    packed, state = fourbit.quantize_4bit(torch.randn(8, 64), 64, "nf4")
    d = state.as_dict(packed=False)
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"quant_type": "int4"}, "quant_type must be 'nf4' or 'fp4', got 'int4'"),
        ({"blocksize": 48}, "blocksize must be a power of two in \\[32, 4096\\], got 48"),
        ({"dtype": "int8"}, "dtype must be one of float32, float16, bfloat16, got 'int8'"),
        ({"shape": [8, -64]}, "shape must be a list of non-negative integers"),
        ({"shape": [16, 64]}, "absmax must have 16 values"),
        ({"absmax": torch.tensor([1.0, float("nan")] * 4)}, "absmax holds a non-finite value \\(nan\\)"),
        ({"absmax": torch.full((8,), float("inf"))}, "absmax holds a non-finite value \\(inf\\)"),
        ({"quant_map": torch.linspace(-1, 1, 16)}, "code \\(quant_map\\) is not the nf4 codebook"),
        ({"quant_map": torch.zeros(15)}, "code \\(quant_map\\) must be 16 float32 values"),
        ({"bogus": 1}, "unknown quant_state key 'bogus'"),
        ({"nested_offset": 0.5}, "double-quantized quant_state is missing"),
    ],
)
def test_bad_dicts_are_rejected_with_a_named_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        QuantState.from_dict(_nf4_dict(**overrides))


def _packed_blob(payload: bytes, key="weight.quant_state.bitsandbytes__nf4"):
    packed, state = fourbit.quantize_4bit(torch.randn(8, 64), 64, "nf4")
    d = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items() if "quant_state" not in k}
    d[key] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return d


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xff\xfe", "does not hold valid UTF-8 JSON"),
        (b"{not json", "does not hold valid UTF-8 JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [8, 64]}', "says quant_type 'fp4'"),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 64], "evil": 1}', "unknown field"),
        (b'{"quant_type": "nf4", "blocksize": "64", "dtype": "float32", "shape": [8, 64]}', "blocksize must be an int"),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 640]}', "absmax must have 80"),
    ],
)
def test_corrupt_json_blob_is_a_value_error(payload, message):
    with pytest.raises(ValueError, match=message):
        QuantState.from_dict(_packed_blob(payload))


def test_unknown_quant_type_in_blob_key():
    d = _packed_blob(b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 64]}',
                     key="weight.quant_state.bitsandbytes__nf5")  # fmt: skip
    with pytest.raises(ValueError, match="must end in bitsandbytes__nf4 or bitsandbytes__fp4"):
        QuantState.from_dict(d)


def test_nested_state_with_wrong_lengths_or_nan_is_rejected():
    packed, state = fourbit.quantize_4bit(torch.randn(300, 64), 64, "nf4", compress_statistics=True)
    d = state.as_dict(packed=False)
    with pytest.raises(ValueError, match="nested_absmax must have 2 values"):
        QuantState.from_dict({**d, "nested_absmax": torch.ones(3)})
    with pytest.raises(ValueError, match="nested_absmax holds a non-finite value"):
        QuantState.from_dict({**d, "nested_absmax": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="offset holds a non-finite value"):
        QuantState.from_dict({**d, "nested_offset": float("inf")})
    with pytest.raises(TypeError, match="absmax must be uint8 under double quantization"):
        QuantState.from_dict({**d, "absmax": state.absmax.float()})


def test_state_on_mixed_devices_is_rejected():
    packed, state = fourbit.quantize_4bit(torch.randn(8, 64), 64)
    with pytest.raises(ValueError, match="code is on meta but absmax is on cpu"):
        QuantState(state.absmax, state.shape, state.code.to("meta"), 64, "nf4", torch.float32)


def test_to_moves_every_tensor_and_keeps_values():
    packed, state = fourbit.quantize_4bit(torch.randn(8, 64), 64, compress_statistics=True)
    before = fourbit.dequantize_4bit(packed, state)
    moved = state.to("cpu")
    assert moved is state and torch.equal(fourbit.dequantize_4bit(packed, state), before)
