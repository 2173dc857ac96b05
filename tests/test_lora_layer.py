# SPDX-License-Identifier: Apache-2.0
"""LoRALinear against PEFT (same weights, same outputs and gradients) and PEFT's own invariants."""

import copy
import math

import bitsandbytes as bnb
import peft

import fourbit
import pytest
import torch
from torch import nn

from fourbit.nn import Linear4bit, LoRALinear


class TwoLayers(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.fc = base
        self.head = nn.Linear(base.out_features, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def _copy_adapter(peft_layer, ours, name="default"):
    with torch.no_grad():
        ours.lora_A[name].weight.copy_(peft_layer.lora_A[name].weight)
        ours.lora_B[name].weight.copy_(peft_layer.lora_B[name].weight)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_outputs_and_gradients_as_peft_over_nn_linear(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    model = TwoLayers(copy.deepcopy(base))
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["fc"], init_lora_weights=False, use_rslora=use_rslora)
    theirs = peft.get_peft_model(model, config)
    ours = TwoLayers(LoRALinear(copy.deepcopy(base), r=4, lora_alpha=12, use_rslora=use_rslora))
    ours.head.load_state_dict(model.head.state_dict())
    peft_fc = theirs.base_model.model.fc
    _copy_adapter(peft_fc, ours.fc)
    assert ours.fc.scaling["default"] == pytest.approx(12 / (math.sqrt(4) if use_rslora else 4))
    assert ours.fc.scaling["default"] == pytest.approx(peft_fc.scaling["default"])
    x = torch.randn(6, 48)
    torch.testing.assert_close(ours(x), theirs(x))
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    torch.testing.assert_close(ours.fc.lora_A["default"].weight.grad, peft_fc.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.fc.lora_B["default"].weight.grad, peft_fc.lora_B["default"].weight.grad)
    # PEFT's key names for the adapter tensors
    assert {k for k in ours.state_dict() if "lora_" in k} == {"fc.lora_A.default.weight", "fc.lora_B.default.weight"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_outputs_and_gradients_as_peft_over_bitsandbytes_linear4bit(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)  # in_features a multiple of the block size (see test_linear4bit.py)
    bnb_layer = bnb.nn.Linear4bit(128, 64, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    bnb_layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)  # fmt: skip
    bnb_layer.bias = nn.Parameter(dense.bias.data.clone())
    bnb_model = TwoLayers(bnb_layer.to("cpu"))
    bnb_model.fc.in_features, bnb_model.fc.out_features = 128, 64
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["fc"], init_lora_weights=False)
    theirs = peft.get_peft_model(bnb_model, config)
    ours = TwoLayers(LoRALinear(Linear4bit.from_linear(dense, compute_dtype=dtype), r=8, lora_alpha=16))
    ours.head.load_state_dict(bnb_model.head.state_dict())
    ours.fc.base_layer.load_state_dict(bnb_model.fc.base_layer.state_dict())  # the same 4-bit bytes
    peft_fc = theirs.base_model.model.fc
    _copy_adapter(peft_fc, ours.fc)
    x = torch.randn(5, 128)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours(x), theirs(x), rtol=tol, atol=tol)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for name in ("lora_A", "lora_B"):
        ours_grad = getattr(ours.fc, name)["default"].weight.grad
        theirs_grad = getattr(peft_fc, name)["default"].weight.grad
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=tol, atol=tol * theirs_grad.abs().max().item())


def _qlora(init=True, **kwargs):
    torch.manual_seed(1)
    return LoRALinear(Linear4bit.from_linear(nn.Linear(128, 96)), r=8, lora_alpha=16, init_lora_weights=init, **kwargs)


def test_zero_init_adapter_is_the_base_layer():
    layer = _qlora(init=True)
    x = torch.randn(4, 128)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    gaussian = _qlora(init="gaussian")
    assert torch.count_nonzero(gaussian.lora_B["default"].weight) == 0
    assert gaussian.lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.1)


def _assert_requantized_merge(layer, x, exact_weight):
    """After a merge into 4 bits the layer holds the quantization of the exact merged weight and runs the base only."""
    base = layer.base_layer
    state = base.quant_state
    expected_packed, _ = fourbit.quantize_4bit(exact_weight.to(state.dtype), state.blocksize, state.quant_type,
                                               state.nested)  # fmt: skip
    # the same codes, but for rare ties that the two float32 computations of the merged weight round apart
    assert (base.weight != expected_packed).float().mean() < 0.01
    stored = fourbit.dequantize_4bit(base.weight, state, torch.float32)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, stored, base.bias), rtol=1e-5, atol=1e-5)


def test_merge_unmerge_into_4bit():
    layer = _qlora(init=False)
    x = torch.randn(4, 128)
    before = layer(x)
    packed, state = layer.base_layer.weight.clone(), layer.base_layer.quant_state
    exact = nn.functional.linear(x, layer.merged_weight(torch.float32), layer.base_layer.bias)
    torch.testing.assert_close(exact, before, rtol=1e-4, atol=1e-4)  # the lossless export
    exact_weight = layer.merged_weight(torch.float32)
    with pytest.warns(UserWarning, match="requantizes"):
        layer.merge()
    _assert_requantized_merge(layer, x, exact_weight)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, packed) and layer.base_layer.quant_state == state
    assert torch.equal(layer(x), before)


def test_merge_into_nn_linear_and_conv1d_is_exact():
    transformers = pytest.importorskip("transformers")  # in the test extras
    torch.manual_seed(2)
    for base in (nn.Linear(32, 24), transformers.pytorch_utils.Conv1D(24, 32)):
        layer = LoRALinear(base, r=4, lora_alpha=4, init_lora_weights=False)
        assert layer.fan_in_fan_out == (not isinstance(base, nn.Linear))
        x = torch.randn(3, 32)
        before = layer(x)
        weight = base.weight.detach().clone()
        layer.merge(safe_merge=True)
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, weight, rtol=1e-6, atol=1e-6)


def test_safe_merge_refuses_nan():
    layer = _qlora(init=False)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert not layer.merged


def test_disabled_several_and_per_row_adapters():
    layer = _qlora(init=False)
    layer.update_layer("other", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(6, 128)
    base = layer.base_layer(x)
    with layer.disable_adapters():
        assert torch.equal(layer(x), base)
    one = layer(x) - base
    layer.set_adapter("other")
    two = layer(x) - base
    layer.set_adapter(["default", "other"])
    torch.testing.assert_close(layer(x) - base, one + two, rtol=1e-4, atol=1e-5)
    names = ["default", "other", "__base__", "other", "default", "__base__"]
    mixed = layer(x, adapter_names=names)
    expected = torch.stack([{"default": base + one, "other": base + two, "__base__": base}[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown adapters \\['nope'\\]"):
        layer(x, adapter_names=["nope"] * 6)


def test_only_adapter_parameters_get_gradients():
    layer = _qlora(init=False)
    layer.update_layer("other", r=4, lora_alpha=8, init_lora_weights=False)
    layer.set_adapter("default")
    layer(torch.randn(3, 128)).sum().backward()
    grads = {n for n, p in layer.named_parameters() if p.grad is not None}
    # The 4-bit weight and the inactive adapter get none; the base bias trains unless frozen (PEFT freezes it at
    # the model level, not in the layer).
    assert grads == {"lora_A.default.weight", "lora_B.default.weight", "base_layer.bias"}


def test_dropout_uses_a_separate_lora_input():
    layer = _qlora(init=False, lora_dropout=0.5)
    x = torch.randn(64, 128)
    layer.eval()
    eval_out = layer(x)
    layer.train()
    torch.manual_seed(3)
    train_out = layer(x)
    assert not torch.allclose(train_out, eval_out)
    base = layer.base_layer(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout["default"](x)
    expected = base + layer.lora_B["default"](layer.lora_A["default"](dropped)) * layer.scaling["default"]
    torch.testing.assert_close(train_out, expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="base_layer must be nn.Linear"):
        LoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="unknown adapter 'x'"):
        _qlora().set_adapter("x")


def _peft_dora_pair(base, **kwargs):
    model = TwoLayers(copy.deepcopy(base))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], init_lora_weights=False, use_dora=True)
    theirs = peft.get_peft_model(model, config)
    return model, theirs, theirs.base_model.model.fc


def test_dora_matches_peft_over_nn_linear():
    torch.manual_seed(4)
    base = nn.Linear(48, 40)
    model, theirs, peft_fc = _peft_dora_pair(base)
    ours = TwoLayers(LoRALinear(copy.deepcopy(base), r=4, lora_alpha=8, init_lora_weights=False, use_dora=True))
    ours.head.load_state_dict(model.head.state_dict())
    _copy_adapter(peft_fc, ours.fc)
    # the magnitude starts as the row norms of W + scaling * B @ A (PEFT computed them with its own random A, B)
    w = base.weight + ours.fc.scaling["default"] * ours.fc.lora_B["default"].weight @ ours.fc.lora_A["default"].weight
    torch.testing.assert_close(ours.fc._weight_norm("default"), w.norm(dim=1))
    with torch.no_grad():
        ours.fc.lora_magnitude_vector["default"].weight.copy_(peft_fc.lora_magnitude_vector["default"].weight)
    x = torch.randn(6, 48)
    torch.testing.assert_close(ours(x), theirs(x))
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        torch.testing.assert_close(getattr(ours.fc, name)["default"].weight.grad, getattr(peft_fc, name)["default"].weight.grad)
    assert "fc.lora_magnitude_vector.default.weight" in ours.state_dict()


def test_dora_over_4bit_weight_norm_tiles_and_merge():
    torch.manual_seed(5)
    layer = LoRALinear(Linear4bit.from_linear(nn.Linear(128, 96)), r=8, lora_alpha=16, init_lora_weights=False,
                       use_dora=True)  # fmt: skip
    from fourbit.nn.lora import _dequantized_row_tiles

    tiles = list(_dequantized_row_tiles(layer.base_layer, max_elements=4096))
    assert len(tiles) > 1
    torch.testing.assert_close(torch.cat([t for _, t in tiles]), layer.base_layer.dequantize(torch.float32), rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    x = torch.randn(5, 128)
    before = layer(x)
    dense = nn.functional.linear(x, layer.merged_weight(torch.float32), layer.base_layer.bias)
    torch.testing.assert_close(dense, before, rtol=1e-4, atol=1e-4)
    packed = layer.base_layer.weight.clone()
    exact_weight = layer.merged_weight(torch.float32)
    with pytest.warns(UserWarning, match="requantizes"):
        layer.merge()
    _assert_requantized_merge(layer, x, exact_weight)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, packed) and torch.equal(layer(x), before)


def test_dora_merge_unmerge_nn_linear_round_trip():
    torch.manual_seed(6)
    base = nn.Linear(32, 24)
    layer = LoRALinear(base, r=4, lora_alpha=4, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(0.9)
    x = torch.randn(3, 32)
    before = layer(x)
    weight = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_qlora_layer_under_cpu_bf16_autocast(compute_dtype):
    """Inside autocast the fused op gets its operands cast by the layer, fp32 adapters included; the packed data and
    scales are never cast, and gradients reach the fp32 adapters."""
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=compute_dtype)
    layer = LoRALinear(base, r=4, init_lora_weights=False)
    x = torch.randn(3, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert base.weight.dtype == torch.uint8 and base.weight_nested_absmax.dtype == torch.float32
    with torch.no_grad():
        expected = layer(x.to(torch.bfloat16) if compute_dtype is None else x)
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), expected.float(), **tol)
    y.float().square().sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_A["default"].weight.grad.dtype == torch.float32
