# SPDX-License-Identifier: Apache-2.0
"""Bottleneck adapters (Houlsby / Pfeiffer) on transformers Llama and GPT-2 models, dense and 4-bit: identity at
init, the h + f(h) formula on sublayer outputs, placement counts, training, save/load, bad input."""

import copy
import json
import pickle

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import fourbit
from fourbit.nn import BottleneckAdapter, Linear4bit
from conftest import requires_gpu

transformers.logging.set_verbosity_error()

IDS = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SUBLAYERS = {"llama": ("self_attn", "mlp"), "gpt2": ("attn", "mlp")}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def adapter_paths(model, name="default"):
    """The sublayers that hold adapter ``name`` (from the file keys ``<sublayer>.bottleneck_adapters.<tensor>``)."""
    return sorted({k.rpartition(".bottleneck_adapters.")[0] for k in fourbit.bottleneck_state_dict(model, name)})


def randomize(model):
    """Non-zero adapters (the default init is an exact no-op), so saving and loading have something to carry."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".bottleneck_adapters." in name:
                p.normal_(0, 0.1)
    return model


def lm_loss(model, ids=IDS):
    return model(ids, labels=ids).loss


# ---------------------------------------------------------------------------------------------- the module
def test_module_formula_sizes_and_inits():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(64, reduction_factor=16, non_linearity="tanh", init_weights="bert", scaling=0.5)
    assert adapter.bottleneck_size == 4
    assert adapter.adapter_down.weight.shape == (4, 64) and adapter.adapter_up.weight.shape == (64, 4)
    h = torch.randn(2, 5, 64)
    expected = h + 0.5 * adapter.adapter_up(torch.tanh(adapter.adapter_down(h)))
    torch.testing.assert_close(adapter(h), expected)
    # "bert": N(0, 0.02) weights, zero biases
    big = BottleneckAdapter(512, reduction_factor=2, init_weights="bert")
    assert abs(big.adapter_down.weight.std().item() - 0.02) < 1e-3
    assert not big.adapter_down.bias.any() and not big.adapter_up.bias.any()
    # "houlsby": truncated normal within [-0.02, 0.02]
    houlsby = BottleneckAdapter(512, reduction_factor=2, init_weights="houlsby")
    assert houlsby.adapter_up.weight.abs().max() <= 0.02 and houlsby.adapter_up.weight.std() > 0.005
    # default "mam_adapter": zero up-projection, exact identity
    default = BottleneckAdapter(64)
    assert default.init_weights == "mam_adapter" and not default.adapter_up.weight.any()
    assert torch.equal(default(h), h)
    assert BottleneckAdapter(64, reduction_factor=0.5).bottleneck_size == 128
    assert BottleneckAdapter(10, reduction_factor=16).bottleneck_size == 1  # at least one unit


@pytest.mark.parametrize("name, fn", [("relu", torch.relu), ("gelu", nn.functional.gelu), ("swish", nn.functional.silu),
                                      ("silu", nn.functional.silu), ("tanh", torch.tanh)])  # fmt: skip
def test_module_non_linearities(name, fn):
    adapter = BottleneckAdapter(32, reduction_factor=4, non_linearity=name, init_weights="bert")
    h = torch.randn(3, 32)
    torch.testing.assert_close(adapter(h), h + adapter.adapter_up(fn(adapter.adapter_down(h))))


def test_module_keeps_input_dtype_with_float32_weights():
    adapter = BottleneckAdapter(32, reduction_factor=4, init_weights="bert")
    h = torch.randn(3, 32, dtype=torch.bfloat16)
    out = adapter(h)
    assert out.dtype == torch.bfloat16 and adapter.adapter_down.weight.dtype == torch.float32
    torch.testing.assert_close(out, (h.float() + adapter.delta(h)).bfloat16(), atol=1e-2, rtol=1e-2)


def test_module_dropout_only_in_training():
    adapter = BottleneckAdapter(32, reduction_factor=4, init_weights="bert", dropout=0.5).eval()
    h = torch.randn(4, 32)
    torch.testing.assert_close(adapter(h), h + adapter.adapter_up(torch.relu(adapter.adapter_down(h))))
    adapter.train()
    delta = adapter(h) - h
    assert (delta == 0).float().mean() > 0.3  # about half the outputs dropped


# ---------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_identity_at_init_and_documented_placement(arch, placement):
    base = MODELS[arch]()
    model = fourbit.add_bottleneck_adapters(copy.deepcopy(base), placement=placement)
    assert torch.equal(logits(model), logits(base))  # the default init changes nothing
    attn, mlp = SUBLAYERS[arch]
    layers = "model.layers" if arch == "llama" else "transformer.h"
    expected = [f"{layers}.{i}.{mlp}" for i in range(2)]
    if placement == "houlsby":
        expected += [f"{layers}.{i}.{attn}" for i in range(2)]
    assert adapter_paths(model) == sorted(expected)  # pfeiffer: 1 per layer (MLP); houlsby: 2 (attention, MLP)
    assert model.config.hidden_size == 64
    assert all(a.bottleneck_size == 4 for a in model.modules() if isinstance(a, BottleneckAdapter))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sublayer_outputs_become_h_plus_f_h(arch):
    """Each adapted sublayer's output h (the tensor, or the first element of the attention's tuple) is replaced by
    h + f(h) before the residual add: checked by recording the sublayer outputs with and without adapters."""
    model = randomize(fourbit.add_bottleneck_adapters(MODELS[arch](), placement="houlsby", non_linearity="swish"))
    attn_name, mlp_name = SUBLAYERS[arch]
    layer = model.model.layers[1] if arch == "llama" else model.transformer.h[1]
    seen = {}

    def recorder(key):
        def hook(module, args, output):  # registered after the adapters' hook: sees the adapted output
            seen[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    inputs = {}

    def input_recorder(key):
        def hook(module, args, kwargs):
            inputs[key] = (args, kwargs)
        return hook

    handles = [getattr(layer, n).register_forward_hook(recorder(n)) for n in (attn_name, mlp_name)]
    handles += [getattr(layer, n).register_forward_pre_hook(input_recorder(n), with_kwargs=True)
                for n in (attn_name, mlp_name)]  # fmt: skip
    logits(model)
    for handle in handles:
        handle.remove()
    # Rerun each sublayer on its recorded input with its adapters off: h; the model saw h + f(h).
    for name in (attn_name, mlp_name):
        sub = getattr(layer, name)
        args, kwargs = inputs[name]
        slot = sub.bottleneck_adapters
        slot.disabled = True
        with torch.no_grad():
            out = sub(*args, **kwargs)
        slot.disabled = False
        h = out[0] if isinstance(out, tuple) else out
        adapter = slot["default"]
        with torch.no_grad():
            torch.testing.assert_close(seen[name], h + adapter.delta(h))
        assert not torch.allclose(seen[name], h)


class TupleMixer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x), "weights"


class Toy(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(3):
            block = nn.Module()
            block.mix = TupleMixer(d)
            block.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
            self.blocks.append(block)

    def forward(self, x):
        for b in self.blocks:
            out, tag = b.mix(x)
            assert tag == "weights"  # the rest of the tuple passes through untouched
            x = x + out
            x = x + b.ff(x)
        return x


def test_user_named_sublayers_with_tuple_outputs():
    torch.manual_seed(0)
    toy = Toy()
    with pytest.raises(ValueError, match="found no decoder layer.*ffn_modules"):
        fourbit.add_bottleneck_adapters(copy.deepcopy(toy))
    with pytest.raises(ValueError, match="hidden size.*hidden_size="):
        fourbit.add_bottleneck_adapters(copy.deepcopy(toy), ffn_modules=["ff"])
    model = fourbit.add_bottleneck_adapters(copy.deepcopy(toy), placement="houlsby", hidden_size=16,
                                            attn_modules=r"blocks\.\d+\.mix", ffn_modules=["ff"], reduction_factor=4,
                                            init_weights="bert")  # fmt: skip
    assert adapter_paths(model) == sorted([f"blocks.{i}.{n}" for i in range(3) for n in ("mix", "ff")])
    x = torch.randn(5, 16)
    expected = x
    for b_model, b_toy in zip(model.blocks, toy.blocks):
        mix = b_toy.mix(expected)[0]
        expected = expected + b_model.mix.bottleneck_adapters["default"](mix)
        ff = b_toy.ff(expected)
        expected = expected + b_model.ff_bottleneck_adapters["default"](ff)  # beside the nn.Sequential, not in it
    torch.testing.assert_close(model(x), expected)


def test_quantize_model_and_all_linear_lora_leave_adapters_alone():
    base = tiny_llama()
    model = fourbit.add_bottleneck_adapters(copy.deepcopy(base), placement="houlsby")
    fourbit.quantize_model(model, progress=False)
    quantized = fourbit.quantize_model(copy.deepcopy(base), progress=False)
    assert torch.equal(logits(model), logits(quantized))  # adapters still float32 and still the identity
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".bottleneck_adapters." in n)
    fourbit.add_lora(model, fourbit.LoraConfig(r=2, target_modules="all-linear"))
    wrapped = set(fourbit.lora_layers(model))
    assert wrapped and not any("bottleneck" in n for n in wrapped)


# ---------------------------------------------------------------------------------------------- training
def _train(model, steps=5, lr=3e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = lm_loss(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4bit"])
def test_only_adapters_train_and_the_loss_goes_down(arch, quantized):
    base = MODELS[arch]()
    if quantized:
        base = fourbit.quantize_model(base, progress=False)
        assert any(isinstance(m, Linear4bit) for m in base.modules())
    reference = logits(base)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    model = fourbit.add_bottleneck_adapters(base, placement="houlsby")
    assert torch.equal(logits(model), reference)  # identity at init on the 4-bit model too
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck_adapters.default." in n for n in trainable)
    assert len(trainable) == 4 * 4  # 4 adapters x (down, up) x (weight, bias)
    lm_loss(model).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("adapter_up.weight"))
    model.zero_grad()
    losses = _train(model)
    assert losses[-1] < losses[0] - 0.15, losses  # a near-uniform random model: ln(256) = 5.55 to about 5.35
    after = model.state_dict()
    for name, value in before.items():  # the base never changed
        assert torch.equal(after[name], value), name


def test_gradients_are_the_same_under_gradient_checkpointing():
    model = randomize(fourbit.add_bottleneck_adapters(fourbit.quantize_model(tiny_llama(), progress=False),
                                                      placement="houlsby")).train()  # fmt: skip
    checkpointed = copy.deepcopy(model)
    fourbit.prepare_for_kbit_training(checkpointed)  # freezes everything and turns checkpointing on
    fourbit.set_bottleneck_adapter(checkpointed, "default")  # trainable again
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    lm_loss(model).backward()
    lm_loss(checkpointed).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), checkpointed.named_parameters()):
        assert p.requires_grad == q.requires_grad, name
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_save_load_round_trip_is_exact(arch, placement, tmp_path):
    base = MODELS[arch]()
    model = fourbit.add_bottleneck_adapters(copy.deepcopy(base), placement=placement, non_linearity="gelu",
                                            reduction_factor=8, dropout=0.1, scaling=2.0)  # fmt: skip
    _train(model, steps=3)
    expected = logits(model)
    assert not torch.equal(expected, logits(base))
    fourbit.save_bottleneck_adapters(model, tmp_path / "bn")
    assert sorted(p.name for p in (tmp_path / "bn").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "bn" / "adapter_config.json").read_text())
    assert config["adapter_type"] == "bottleneck"
    assert {k: config[k] for k in ("placement", "reduction_factor", "non_linearity", "dropout", "scaling",
                                   "hidden_size", "bottleneck_size", "init_weights")} == {
        "placement": placement, "reduction_factor": 8, "non_linearity": "gelu", "dropout": 0.1, "scaling": 2.0,
        "hidden_size": 64, "bottleneck_size": 8, "init_weights": "mam_adapter"}  # fmt: skip
    tensors = load_file(str(tmp_path / "bn" / "adapter_model.safetensors"))
    mlp = SUBLAYERS[arch][1]
    layers = "model.layers" if arch == "llama" else "transformer.h"
    assert f"{layers}.0.{mlp}.bottleneck_adapters.adapter_down.weight" in tensors
    assert len(tensors) == 4 * len(adapter_paths(model))

    loaded = fourbit.load_bottleneck_adapters(copy.deepcopy(base), tmp_path / "bn")
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: all frozen
    trainable = fourbit.load_bottleneck_adapters(copy.deepcopy(base), tmp_path / "bn", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip


def test_save_load_on_a_4bit_model(tmp_path):
    base = fourbit.quantize_model(tiny_llama(), progress=False)
    model = randomize(fourbit.add_bottleneck_adapters(copy.deepcopy(base), placement="houlsby"))
    fourbit.save_bottleneck_adapters(model, tmp_path / "bn")
    loaded = fourbit.load_bottleneck_adapters(copy.deepcopy(base), tmp_path / "bn")
    assert torch.equal(logits(loaded), logits(model))


def test_several_adapters_switch_disable_delete_copy():
    base = tiny_llama()
    reference = logits(base)
    model = randomize(fourbit.add_bottleneck_adapters(copy.deepcopy(base)))
    first = logits(model)
    fourbit.add_bottleneck_adapters(model, adapter_name="other", placement="houlsby", init_weights="bert")
    assert fourbit.bottleneck_adapter_names(model) == ["default", "other"]
    assert torch.equal(logits(model), first)  # a later adapter starts inactive and frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    fourbit.set_bottleneck_adapter(model, "other")
    other = logits(model)
    assert not torch.equal(other, first) and not torch.equal(other, reference)
    assert {n.split(".bottleneck_adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"other"}
    fourbit.set_bottleneck_adapter(model, ["default", "other"])  # stacked: default, then other
    stacked = logits(model)
    assert not torch.equal(stacked, other)
    with fourbit.disable_bottleneck_adapters(model):
        assert torch.equal(logits(model), reference)
    assert torch.equal(logits(model), stacked)
    clone = copy.deepcopy(model)  # the hooks find the clone's own adapters
    assert torch.equal(logits(clone), stacked)
    with torch.no_grad():
        for n, p in clone.named_parameters():
            if ".bottleneck_adapters." in n:
                p.zero_()
    assert torch.equal(logits(clone), reference) and torch.equal(logits(model), stacked)
    assert torch.equal(logits(pickle.loads(pickle.dumps(model))), stacked)
    fourbit.delete_bottleneck_adapter(model, "default")
    fourbit.delete_bottleneck_adapter(model, "other")
    assert torch.equal(logits(model), reference)
    assert not any(".bottleneck_adapters" in n for n, _ in model.named_modules())
    assert not any(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(placement="parallel"), "placement must be one of"),
    (dict(reduction_factor=0), "reduction_factor must be a positive number, got 0"),
    (dict(reduction_factor=float("nan")), "reduction_factor must be a positive number"),
    (dict(non_linearity="sigmoid"), "non_linearity must be one of .* got 'sigmoid'"),
    (dict(init_weights="lora"), "init_weights must be one of .* got 'lora'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(adapter_name="a.b"), "adapter_name must be"),
    (dict(hidden_size=-1), "hidden_size must be a positive integer, got -1"),
    (dict(dtype=torch.int8), "dtype must be a floating-point"),
    (dict(ffn_modules=["nope"]), r"ffn_modules=\['nope'\] matched no module"),
    (dict(placement="houlsby", ffn_modules=["mlp"]), "needs attn_modules"),
])  # fmt: skip
def test_bad_arguments_are_refused_and_leave_the_model_unchanged(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        fourbit.add_bottleneck_adapters(model, **kwargs)
    assert not any(".bottleneck_adapters" in n for n, _ in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())
    assert fourbit.bottleneck_adapter_names(model) == []


def test_bad_files_are_refused_and_leave_the_model_unchanged(tmp_path):
    base = tiny_llama()
    model = randomize(fourbit.add_bottleneck_adapters(copy.deepcopy(base)))
    with pytest.raises(ValueError, match="already has a bottleneck adapter named 'default'"):
        fourbit.add_bottleneck_adapters(model)
    with pytest.raises(ValueError, match="unknown bottleneck adapter 'x'"):
        fourbit.set_bottleneck_adapter(model, "x")
    folder = tmp_path / "bn"
    fourbit.save_bottleneck_adapters(model, folder)
    weights = folder / "adapter_model.safetensors"
    good = load_file(str(weights))
    key = "model.layers.0.mlp.bottleneck_adapters.adapter_up.weight"

    def expect(message, tensors=None, config=None):
        target = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        target.mkdir()
        save_file(tensors if tensors is not None else good, str(target / "adapter_model.safetensors"))
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(config or {})
        (target / "adapter_config.json").write_text(json.dumps(cfg))
        fresh = copy.deepcopy(base)
        with pytest.raises(ValueError, match=message):
            fourbit.load_bottleneck_adapters(fresh, target)
        assert torch.equal(logits(fresh), logits(base))
        assert not any(".bottleneck_adapters" in n for n, _ in fresh.named_modules())
        assert not any(len(m._forward_hooks) for m in fresh.modules())

    expect(rf"{key} has shape \(64, 2\), the model expects \(64, 4\)", {**good, key: torch.zeros(64, 2)})
    expect(rf"missing tensors \['{key}'\]", {k: v for k, v in good.items() if k != key})
    expect("unexpected tensors", {**good, "extra": torch.zeros(1)})
    expect("contains NaN or inf", {**good, key: torch.full((64, 4), float("nan"))})
    expect("has dtype torch.int32", {**good, key: torch.zeros(64, 4, dtype=torch.int32)})
    expect("adapts modules this model does not have", config={"ffn_modules": ["model.layers.7.mlp"]})
    expect("adapter_type 'lora'", config={"adapter_type": "lora"})
    expect("non_linearity must be one of", config={"non_linearity": "cube"})
    expect("format_version", config={"format_version": 99})
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        fourbit.load_bottleneck_adapters(copy.deepcopy(base), tmp_path)


@requires_gpu
def test_cuda_4bit_model_with_adapters():
    base = fourbit.quantize_model(tiny_llama().cuda(), progress=False)
    ids = IDS.cuda()
    reference = logits(base, ids)
    model = fourbit.add_bottleneck_adapters(base, placement="houlsby")
    assert all(p.is_cuda for n, p in model.named_parameters() if ".bottleneck_adapters." in n)
    assert torch.equal(logits(model, ids), reference)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
