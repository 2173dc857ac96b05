# SPDX-License-Identifier: Apache-2.0
"""fourbit.qat: prepare -> train -> convert gives the fake-quant model's outputs for every config kind (integer,
NF4/FP4, double quantization, activations, learned ranges, LoRA), under torch.compile too; and on a generated task a
QAT-trained model quantizes better than post-training quantization of the same model trained without QAT."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fourbit
from fourbit import qat
from fourbit.nn import Linear4bit, LinearInt, LoRALinear

@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread avoids OpenMP hand-off costs that dominate them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIGS = {
    "int4-sym-g32": qat.QATConfig(qat.IntWeightConfig(4, 32)),
    "int4-asym-g16": qat.QATConfig(qat.IntWeightConfig(4, 16, symmetric=False)),
    "int8-sym-g64": qat.QATConfig(qat.IntWeightConfig(8, 64)),
    "int8-asym-act8": qat.QATConfig(qat.IntWeightConfig(8, 32, symmetric=False), qat.Int8ActivationConfig()),
    "int4-learned-range": qat.QATConfig(qat.IntWeightConfig(4, 32, symmetric=False, range_learning=True)),
    "int4-sym-learned-act8sym": qat.QATConfig(qat.IntWeightConfig(4, 32, range_learning=True),
                                              qat.Int8ActivationConfig(symmetric=True)),  # fmt: skip
    "nf4": qat.QATConfig(qat.FourBitWeightConfig("nf4", 64)),
    "fp4-b32": qat.QATConfig(qat.FourBitWeightConfig("fp4", 32)),
    "nf4-double-quant": qat.QATConfig(qat.FourBitWeightConfig("nf4", 64, compress_statistics=True)),
    "nf4-act8": qat.QATConfig(qat.FourBitWeightConfig("nf4", 64), qat.Int8ActivationConfig()),
}


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=128, d_out=16):
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.mid = nn.Linear(hidden, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.lm_head(F.gelu(self.mid(F.gelu(self.up(x)))))


def _train(model, x, y, steps, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def _expected_type(config):
    return LinearInt if isinstance(config.weight, qat.IntWeightConfig) else Linear4bit


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prepare_train_convert_outputs_equal(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(48, 64), torch.randint(0, 16, (48,))
    qat.prepare_qat(model, config)
    assert isinstance(model.up, qat.FakeQuantLinear) and isinstance(model.mid, qat.FakeQuantLinear)
    assert type(model.lm_head) is nn.Linear  # skipped by default
    before = model.up.weight.detach().clone()
    _train(model, x, y, steps=5)
    assert not torch.equal(model.up.weight, before)  # the float weights train through the fake quantizer
    if config.weight.__class__ is qat.IntWeightConfig and config.weight.range_learning:
        assert model.up.weight_fake_quant.scale.grad.abs().sum() > 0  # LSQ gradients reach the scales
    model.eval()
    with torch.no_grad():
        expected = model(x)
        weights = {n: getattr(model, n).fake_quantized_weight() for n in ("up", "mid")}
    qat.convert_qat(model)
    for n in ("up", "mid"):
        layer = getattr(model, n)
        assert isinstance(layer, _expected_type(config))
        assert torch.equal(layer.dequantize(torch.float32), weights[n])  # same grid, rounding, double quant
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # up to the matmul's summation order
    # A converted model saves and loads.
    fresh = qat.convert_qat(qat.prepare_qat(MLP(), config))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), got, rtol=0, atol=0)


def test_bf16_model_converts_bit_exactly():
    torch.manual_seed(1)
    model = MLP().to(torch.bfloat16)
    qat.prepare_qat(model, CONFIGS["int4-sym-g32"])
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        w = model.up.fake_quantized_weight()
    qat.convert_qat(model)
    assert torch.equal(model.up.dequantize(), w) and model.up.dequantize().dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["int4-asym-g16", "nf4-double-quant"])
def test_lora_qat_trains_adapters_and_converts_the_merged_weight(name):
    config = CONFIGS[name]
    torch.manual_seed(2)
    model = MLP()
    model.up = LoRALinear(model.up, r=4, lora_alpha=8)
    model.mid = LoRALinear(model.mid, r=4, lora_alpha=8)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    qat.prepare_qat(model, config)
    assert isinstance(model.up, qat.FakeQuantLoRALinear)
    base = model.up.base_layer.weight.detach().clone()
    x, y = torch.randn(32, 64), torch.randint(0, 16, (32,))
    _train(model, x, y, steps=5)
    assert torch.equal(model.up.base_layer.weight, base)  # only the adapters trained
    assert model.up.lora_B["default"].weight.abs().sum() > 0
    with torch.no_grad():
        expected = model(x)
        merged = model.up.weight_fake_quant(model.up.merged_weight())
    qat.convert_qat(model)
    assert isinstance(model.up, _expected_type(config))
    assert torch.equal(model.up.dequantize(torch.float32), merged)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_training_step():
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = qat.prepare_qat(MLP(), qat.QATConfig(qat.IntWeightConfig(4, 32, range_learning=True),
                                                 qat.Int8ActivationConfig()))  # fmt: skip
    x = torch.randn(16, 64)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().mean().backward()
    eager(x).square().mean().backward()
    torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(model.up.weight.grad, eager.up.weight.grad)
    torch.testing.assert_close(model.up.weight_fake_quant.scale.grad, eager.up.weight_fake_quant.scale.grad)
    torch._dynamo.reset()
    m4 = qat.prepare_qat(MLP(), CONFIGS["nf4-double-quant"])
    out = torch.compile(m4, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, m4(x), rtol=0, atol=0)


def _task(seed=0, n=1024, d=32):
    """A generated regression task: targets from a random teacher network; half for training, half held out."""
    g = torch.Generator().manual_seed(seed)
    t0, t1 = torch.randn(d, 64, generator=g) / d**0.5, torch.randn(64, 4, generator=g) / 8
    x = torch.randn(n, d, generator=g)
    y = torch.tanh(x @ t0) @ t1
    return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


def _fit(model, x, y, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name, config", [
    ("int4 symmetric g32", qat.QATConfig(qat.IntWeightConfig(4, 32), skip_modules=())),
    ("nf4 blocksize 64", qat.QATConfig(qat.FourBitWeightConfig("nf4", 64), skip_modules=())),
])  # fmt: skip
def test_qat_beats_post_training_quantization(name, config):
    torch.manual_seed(4)
    x, y, x_test, y_test = _task()
    float_model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    _fit(float_model, x, y, steps=120, lr=1e-2)
    # PTQ baseline: the same model trained on without QAT for as many steps as QAT gets, then quantized.
    ptq = copy.deepcopy(float_model)
    _fit(ptq, x, y, steps=30, lr=2e-3)
    with torch.no_grad():
        float_loss = F.mse_loss(ptq(x_test), y_test).item()
    qat.convert_qat(qat.prepare_qat(ptq, config))
    # QAT: the same starting point, trained with fake quantization, then converted.
    model = qat.prepare_qat(copy.deepcopy(float_model), config)
    _fit(model, x, y, steps=30, lr=2e-3)
    qat.convert_qat(model)
    with torch.no_grad():
        ptq_loss = F.mse_loss(ptq(x_test), y_test).item()
        qat_loss = F.mse_loss(model(x_test), y_test).item()
    recovered = (ptq_loss - qat_loss) / (ptq_loss - float_loss) if ptq_loss > float_loss else float("nan")
    print(f"\n{name}: held-out MSE float {float_loss:.5f}, PTQ {ptq_loss:.5f}, QAT {qat_loss:.5f}; "
          f"QAT recovers {100 * recovered:.0f}% of the PTQ gap")  # fmt: skip
    assert qat_loss < ptq_loss


def test_bad_configs():
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        qat.IntWeightConfig(bits=3)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        qat.IntWeightConfig(group_size=0)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        qat.FourBitWeightConfig("int4")
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        qat.FourBitWeightConfig(blocksize=100)
    with pytest.raises(TypeError, match="weight must be an IntWeightConfig or a FourBitWeightConfig"):
        qat.QATConfig(weight="int4")
    with pytest.raises(TypeError, match="config must be a fourbit.qat.QATConfig"):
        qat.prepare_qat(MLP(), qat.IntWeightConfig())
    with pytest.raises(ValueError, match="up: group_size 48 does not divide in_features 64"):
        qat.prepare_qat(MLP(), qat.QATConfig(qat.IntWeightConfig(8, 48)))
    model = MLP()
    model.up = LoRALinear(model.up, r=4, lora_dropout=0.1)
    with pytest.raises(ValueError, match="up: LoRA dropout cannot be expressed"):
        qat.prepare_qat(model, CONFIGS["nf4"])
