# SPDX-License-Identifier: Apache-2.0
"""Model-level QLoRA on transformers models: quantize_model, add_lora, adapters in PEFT's format (both directions),
several adapters, merging, training, torch.compile and generate()."""

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import peft
import pytest
import torch
import transformers
from torch import nn

import fourbit
from fourbit.nn import Linear4bit, LoRALinear

transformers.logging.set_verbosity_error()


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **overrides,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


IDS = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- quantize_model
def test_quantize_model_replaces_linears_and_matches_dequantized_model():
    base = tiny_llama()
    model = fourbit.quantize_model(copy.deepcopy(base), progress=False)
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    linears = {n for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    assert quantized == linears - {"lm_head"}
    assert isinstance(model.lm_head, nn.Linear)
    # The same model with each weight replaced by its NF4 round trip computes the same logits.
    reference = copy.deepcopy(base)
    for name in quantized:
        layer = reference.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(model.get_submodule(name).dequantize(torch.float32))
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS), rtol=1e-4, atol=1e-4)


def test_quantize_model_gpt2_conv1d_and_skip_modules():
    base = tiny_gpt2()
    model = fourbit.quantize_model(copy.deepcopy(base), skip_modules=["lm_head", "c_proj"], progress=False)
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Linear4bit) and (c_attn.out_features, c_attn.in_features) == (192, 64)
    assert type(model.transformer.h[0].attn.c_proj).__name__ == "Conv1D"  # skipped by suffix
    dense = base.transformer.h[0].attn.c_attn.weight.detach().t()  # Conv1D stores [in, out]
    packed, state = fourbit.quantize_4bit(dense, 64, "nf4", True)
    assert torch.equal(c_attn.weight.view(torch.uint8), packed)
    assert logits(model, IDS).shape == (3, 12, 256)


def test_quantize_model_refuses_a_model_with_lora():
    model = fourbit.add_lora(tiny_llama(), fourbit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before add_lora"):
        fourbit.quantize_model(model)


# ---------------------------------------------------------------------------------------------- add_lora
def test_add_lora_targets_freezing_and_zero_init():
    base = tiny_llama()
    model = fourbit.add_lora(fourbit.quantize_model(copy.deepcopy(base), progress=False),
                             fourbit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    layers = fourbit.lora_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    # B starts at zero: the adapted model is the quantized base model.
    with fourbit.disable_adapters(model):
        expected = logits(model, IDS)
    torch.testing.assert_close(logits(model, IDS), expected)


@pytest.mark.parametrize("spec, expected", [
    ("all-linear", 14),
    (r".*\.mlp\.(up|down)_proj", 4),
    (["o_proj"], 2),
    (None, 4),  # PEFT's default for llama: q_proj, v_proj
])  # fmt: skip
def test_target_modules_forms(spec, expected):
    model = fourbit.add_lora(tiny_llama(), fourbit.LoraConfig(target_modules=spec))
    assert len(fourbit.lora_layers(model)) == expected
    assert "lm_head" not in fourbit.lora_layers(model)


def test_exclude_modules_and_rank_alpha_patterns():
    config = fourbit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", exclude_modules=["down_proj"],
                                rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 4})  # fmt: skip
    layers = fourbit.lora_layers(fourbit.add_lora(tiny_llama(), config))
    assert not any(n.endswith("down_proj") for n in layers)
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 2
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == 2.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' is not supported"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(bias="some"), "bias must be one of"),
    (dict(target_modules="([unclosed"), "not a valid regular expression"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
    (dict(target_modules=[1, 2]), "target_modules must be"),
])  # fmt: skip
def test_lora_config_refuses_bad_or_unsupported_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fourbit.LoraConfig(**kwargs)


def test_add_lora_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matched no linear layer"):
        fourbit.add_lora(model, fourbit.LoraConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match="fourbit.LoraConfig"):
        fourbit.add_lora(model, peft.LoraConfig(target_modules=["q_proj"]))
    fourbit.add_lora(model, fourbit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        fourbit.add_lora(model, fourbit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="unknown adapter 'x'"):
        fourbit.set_adapter(model, "x")
    with pytest.raises(ValueError, match="no default targets"):
        fourbit.add_lora(nn.Sequential(nn.Linear(4, 4)), fourbit.LoraConfig())


# ---------------------------------------------------------------------------------------------- PEFT interop
PEFT_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True),
    "rank_pattern": dict(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"down_proj": 2},
                         alpha_pattern={"gate_proj": 4}),
}  # fmt: skip


def _randomize_adapter(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in name else 0.0))


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_adapter_saved_by_fourbit_loads_in_peft(tmp_path, case, quantized):
    base = tiny_llama()
    ours = copy.deepcopy(base)
    if quantized:
        fourbit.quantize_model(ours, compress_statistics=False, progress=False)
    fourbit.add_lora(ours, fourbit.LoraConfig(**PEFT_CASES[case]), adapter_name="mine")
    _randomize_adapter(ours, 3)
    fourbit.save_adapter(ours, tmp_path / "adapter", adapter_name="mine")
    # PEFT on the same base: the dense model with the dequantized weights where fourbit's were quantized.
    theirs_base = copy.deepcopy(base)
    if quantized:
        for name, m in ours.named_modules():
            if isinstance(m, Linear4bit):
                with torch.no_grad():
                    theirs_base.get_submodule(name.replace(".base_layer", "")).weight.copy_(m.dequantize(torch.float32))
    theirs = peft.PeftModel.from_pretrained(theirs_base, tmp_path / "adapter", adapter_name="other").eval()
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_adapter_saved_by_peft_loads_in_fourbit(tmp_path, case):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**PEFT_CASES[case], init_lora_weights=False))
    _randomize_adapter(theirs, 4)
    theirs.save_pretrained(tmp_path)  # "default" goes straight into tmp_path
    ours = fourbit.load_adapter(copy.deepcopy(base), tmp_path, adapter_name="x")
    assert fourbit.active_adapters(ours) == ["x"]
    assert not any(p.requires_grad for p in ours.parameters())  # PEFT's default: loaded for inference
    torch.testing.assert_close(logits(ours, IDS), logits(theirs.eval(), IDS), rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_adapter_round_trip_with_peft(tmp_path):
    base = tiny_gpt2()
    ours = fourbit.add_lora(copy.deepcopy(base), fourbit.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    _randomize_adapter(ours, 5)
    fourbit.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), rtol=1e-5, atol=1e-5)
    again = fourbit.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(again, IDS), logits(ours, IDS))


def test_modules_to_save_and_bias_all_round_trip_with_peft(tmp_path):
    base = tiny_gpt2()  # GPT-2 has biases
    config = fourbit.LoraConfig(r=4, target_modules=["c_attn"], bias="all", modules_to_save=["ln_f"])
    ours = fourbit.add_lora(copy.deepcopy(base), config)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert "transformer.ln_f.weight" in trainable and "transformer.h.0.mlp.c_fc.bias" in trainable
    with torch.no_grad():
        ours.transformer.ln_f.weight.mul_(1.5)
        ours.transformer.h[0].mlp.c_fc.bias.add_(0.3)
    _randomize_adapter(ours, 6)
    fourbit.save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), rtol=1e-5, atol=1e-5)
    again = fourbit.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(again, IDS), logits(ours, IDS))


# ---------------------------------------------------------------------------------------------- several adapters
def test_switch_combine_and_per_row_adapters_on_4bit_model():
    model = fourbit.quantize_model(tiny_llama(), progress=False)
    fourbit.add_lora(model, fourbit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), "a")
    fourbit.add_lora(model, fourbit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]), "b")
    _randomize_adapter(model, 7)
    assert fourbit.active_adapters(model) == ["a"]  # a later adapter is added inactive, as in PEFT
    out_a = logits(model, IDS)
    fourbit.set_adapter(model, "b")
    out_b = logits(model, IDS)
    with fourbit.disable_adapters(model):
        out_base = logits(model, IDS)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, out_base)
    # Only the active adapter trains.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    # Per-row choice inside one batch equals running each adapter on its rows.
    with fourbit.per_row_adapters(model, ["b", "__base__", "a"]):
        mixed = logits(model, IDS)
    torch.testing.assert_close(mixed[0], out_b[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], out_base[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[2], out_a[2], rtol=1e-4, atol=1e-4)
    # Both active: summed. Deleting one leaves the other.
    fourbit.set_adapter(model, ["a", "b"])
    both = logits(model, IDS)
    assert not torch.allclose(both, out_a)
    fourbit.delete_adapter(model, "b")
    fourbit.set_adapter(model, "a")
    torch.testing.assert_close(logits(model, IDS), out_a)
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        with fourbit.per_row_adapters(model, ["b", "a", "a"]):
            pass


def test_merge_and_unmerge_4bit_model_restores_bytes():
    model = fourbit.quantize_model(tiny_llama(), progress=False)
    fourbit.add_lora(model, fourbit.LoraConfig(r=4, target_modules="all-linear"))
    _randomize_adapter(model, 8)
    before = {n: b.clone() for n, b in model.state_dict().items() if "base_layer.weight" in n}
    unmerged = logits(model, IDS)
    with pytest.warns(UserWarning, match="requantizes"):
        fourbit.merge_lora(model)
    merged = logits(model, IDS)
    # Requantizing W + dW moves the logits by about the NF4 rounding; compare in probability space as PEFT does.
    torch.testing.assert_close(merged.softmax(-1), unmerged.softmax(-1), atol=0.01, rtol=0)
    fourbit.unmerge_lora(model)
    after = {n: b for n, b in model.state_dict().items() if "base_layer.weight" in n}
    assert all(torch.equal(before[n], after[n]) for n in before)
    torch.testing.assert_close(logits(model, IDS), unmerged)


# ---------------------------------------------------------------------------------------------- files
def test_save_is_atomic_when_interrupted(tmp_path):
    """A save killed in the middle of writing leaves the previous adapter loadable."""
    model = fourbit.add_lora(tiny_llama(), fourbit.LoraConfig(r=4, target_modules=["q_proj"]))
    _randomize_adapter(model, 9)
    path = tmp_path / "adapter"
    fourbit.save_adapter(model, path)
    expected = logits(model, IDS)
    script = textwrap.dedent(f"""
        import os, fourbit.model, fourbit._io as io
        real = io.write_safetensors
        def write_then_die(tensors, file):
            real(tensors, file)
            os._exit(17)  # killed after writing the new files, before the swap
        io.write_safetensors = write_then_die
        import torch, transformers
        torch.manual_seed(1)
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        model = fourbit.add_lora(transformers.LlamaForCausalLM(config), fourbit.LoraConfig(r=2, target_modules=["v_proj"]))
        fourbit.save_adapter(model, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    assert (tmp_path / "adapter.tmp").exists()  # the interrupted save's leftovers
    again = fourbit.load_adapter(tiny_llama(), path)
    torch.testing.assert_close(logits(again, IDS), expected)
    # An interruption between the two renames: only `adapter.old` exists; loading recovers it.
    os.rename(path, tmp_path / "adapter.old")
    again = fourbit.load_adapter(tiny_llama(), path)
    torch.testing.assert_close(logits(again, IDS), expected)
    # The next save cleans up and writes a complete folder.
    fourbit.save_adapter(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_load_refuses_pickle_mismatch_and_corruption(tmp_path):
    model = fourbit.add_lora(tiny_llama(), fourbit.LoraConfig(r=4, target_modules=["q_proj"]))
    fourbit.save_adapter(model, tmp_path / "ok")
    # Only a pickle file: refused, saying why.
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    torch.save({}, tmp_path / "pickle" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        fourbit.load_adapter(tiny_llama(), tmp_path / "pickle")
    # Config says r=8, tensors have r=4.
    bad = tmp_path / "mismatch"
    fourbit.save_adapter(model, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_llama()
    reference = logits(fresh, IDS)
    with pytest.raises(ValueError, match=r"has shape \(4, 64\), the model expects \(8, 64\)"):
        fourbit.load_adapter(fresh, bad)
    assert not fourbit.lora_layers(fresh)  # nothing changed
    torch.testing.assert_close(logits(fresh, IDS), reference)
    # Config targets more modules than the file holds.
    config.update(r=4, target_modules=["q_proj", "k_proj"])
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing tensors"):
        fourbit.load_adapter(tiny_llama(), bad)
    # Garbage weights file, invalid JSON, a non-LoRA adapter type, an unsupported PEFT feature.
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    config.update(target_modules=["q_proj"])
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fourbit.load_adapter(tiny_llama(), bad)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fourbit.load_adapter(tiny_llama(), bad)
    for change, match in (({"peft_type": "IA3"}, "peft_type='IA3'"), ({"layers_to_transform": [0]}, "layers_to_transform")):
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=match):
            fourbit.load_adapter(tiny_llama(), bad)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        fourbit.load_adapter(tiny_llama(), tmp_path / "missing")


def test_unknown_config_keys_warn(tmp_path):
    model = fourbit.add_lora(tiny_llama(), fourbit.LoraConfig(r=4, target_modules=["q_proj"]))
    fourbit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="some_future_option"):
        fourbit.load_adapter(tiny_llama(), tmp_path)


# ---------------------------------------------------------------------------------------------- training
def _train(model, steps, lr=3e-3, batch=8, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Memorising a few fixed sequences: the adapters alone can fit it quickly.
    ids = torch.randint(0, 256, (2, seq), generator=g).repeat(batch // 2, 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_qlora_training_lowers_the_loss(checkpointing):
    model = fourbit.quantize_model(tiny_llama(), progress=False)
    fourbit.prepare_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # nothing cast
    fourbit.add_lora(model, fourbit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    enabled = getattr(model, "is_activation_checkpointing", None)
    assert (enabled if enabled is not None else model.is_gradient_checkpointing) == checkpointing
    losses = _train(model, 20, lr=1e-2)
    assert losses[-1] < 0.85 * losses[0], losses
    # The same run on the unquantized model: 4-bit training follows it closely (the frozen random embeddings and
    # head of a tiny model keep both from going much lower).
    dense = fourbit.add_lora(tiny_llama(), fourbit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                              lora_dropout=0.05))  # fmt: skip
    dense_losses = _train(dense, 20, lr=1e-2)
    assert abs(losses[-1] - dense_losses[-1]) < 0.05 * dense_losses[-1], (losses, dense_losses)


def test_prepare_for_kbit_training_keeps_norms_fp32_and_leaves_embeddings():
    model = tiny_llama().to(torch.bfloat16)
    fourbit.quantize_model(model, progress=False)
    fourbit.prepare_for_kbit_training(model, use_gradient_checkpointing=False, keep_norms_fp32=True)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_torch_compile_has_no_graph_breaks_in_fourbit_layers():
    model = fourbit.quantize_model(tiny_llama(), progress=False)
    fourbit.add_lora(model, fourbit.LoraConfig(r=4, target_modules="all-linear"))
    _randomize_adapter(model, 10)
    layer = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)


def test_generate_on_quantized_lora_model():
    model = fourbit.quantize_model(tiny_llama(), progress=False)
    fourbit.add_lora(model, fourbit.LoraConfig(r=4, target_modules="all-linear"))
    _randomize_adapter(model, 11)
    out = model.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    # Greedy decoding with the cache gives the tokens a full forward would pick.
    full = logits(model, out[:, :-1]).argmax(-1)
    assert torch.equal(full[0, 3:], out[0, 4:])


def test_load_adapter_dispatches_bottleneck_and_points_prompt_tuning_elsewhere(tmp_path):
    model = fourbit.add_bottleneck_adapters(tiny_llama(), reduction_factor=8, init_weights="bert")
    fourbit.save_bottleneck_adapters(model, tmp_path / "bn")
    again = fourbit.load_adapter(tiny_llama(), tmp_path / "bn")
    torch.testing.assert_close(logits(again, IDS), logits(model, IDS))
    wrapped = fourbit.add_prompt_tuning(tiny_llama(), num_virtual_tokens=3)
    fourbit.save_prompt_tuning(wrapped, tmp_path / "pt")
    with pytest.raises(ValueError, match="load_prompt_tuning"):
        fourbit.load_adapter(tiny_llama(), tmp_path / "pt")
