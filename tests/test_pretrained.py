# SPDX-License-Identifier: Apache-2.0
"""fourbit.from_pretrained / save_pretrained: Hugging Face folders straight into 4 bits, byte-identical to
quantize_model, and checkpoints interchangeable with transformers + bitsandbytes both ways (offline, tiny models)."""

import json
import shutil
import warnings

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)  # fmt: skip

import fourbit
from fourbit.nn import Linear4bit

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _tiny(kind):
    # Dimensions that are multiples of the block size (64): bitsandbytes 0.50.2's native CPU dequantize gets blocks
    # that straddle rows of an even last dimension wrong (see test_quantize.py::test_bytes_equal_bitsandbytes).
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             bos_token_id=0, eos_token_id=0)  # fmt: skip
        return LlamaForCausalLM(config)
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def _kind(folder):
    return folder.parent.name.rsplit("-", 1)[0]  # the fixtures' folders: <kind>-<n>/dense, <kind>-<n>/bnb


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def dense_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param + "-") / "dense"
    _tiny(request.param).save_pretrained(folder, safe_serialization=True, max_shard_size="60KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1  # several shards
    return folder


# quant_type and double quantization of the transformers + bitsandbytes checkpoint, per model
BNB_SETTINGS = {"llama": ("nf4", True), "gpt2": ("fp4", False)}


@pytest.fixture(scope="module")
def bnb_dir(dense_dir):
    quant_type, nested = BNB_SETTINGS[_kind(dense_dir)]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config, device_map="cpu")
    folder = dense_dir.parent / "bnb"
    model.save_pretrained(folder, max_shard_size="60KB")
    return folder


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _bnb_logits(model):
    # train() mode (dropout is 0 in these configs): on CPUs with AVX512-BF16, bitsandbytes' eval-mode forward
    # repacks the weights for a bf16 GEMV; in train mode it runs its fp32 dequantize + F.linear, the path to compare.
    model.train()
    return _logits(model)


def _bytes(t):
    return t.detach().contiguous().view(torch.uint8)


def _shards(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# ---------------------------------------------------------------------------------------------------------- dense
def test_from_pretrained_equals_quantize_model_byte_for_byte(dense_dir):
    ours = fourbit.from_pretrained(dense_dir, progress=False)
    expected = fourbit.quantize_model(AutoModelForCausalLM.from_pretrained(dense_dir), progress=False).eval()
    assert not ours.training
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    layers = [m for m in ours.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == (14 if _kind(dense_dir) == "llama" else 8)  # every linear / Conv1D but lm_head
    ours_sd, expected_sd = ours.state_dict(), expected.state_dict()
    assert list(ours_sd) == list(expected_sd)
    for key in expected_sd:
        assert ours_sd[key].dtype == expected_sd[key].dtype, key
        assert torch.equal(_bytes(ours_sd[key]), _bytes(expected_sd[key])), key
    assert torch.equal(_logits(ours), _logits(expected))
    out_emb, in_emb = ours.get_output_embeddings(), ours.get_input_embeddings()
    assert out_emb.weight is in_emb.weight  # lm_head stays tied to the embeddings


def test_tied_lm_head_quantized_and_bf16(dense_dir):
    # skip_modules=(): lm_head, tied to the embeddings (absent from the files), is quantized from the embedding tensor
    ours = fourbit.from_pretrained(dense_dir, skip_modules=(), torch_dtype=torch.bfloat16, progress=False)
    # transformers' dtype= (not .to(), which would also cast the rotary frequencies that stay float32)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
    expected = fourbit.quantize_model(dense, skip_modules=(), progress=False).eval()
    assert isinstance(ours.get_output_embeddings(), Linear4bit)
    assert ours.get_input_embeddings().weight.dtype == torch.bfloat16
    for (key, a), b in zip(ours.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(_bytes(a), _bytes(b)), key
    assert torch.equal(_logits(ours), _logits(expected))


_PEAK_CHILD = """
import sys, torch, fourbit
torch.set_num_threads(2)
fourbit.from_pretrained(sys.argv[1], progress=False)  # warm-up: code pages, thread pools, allocator arenas
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status("VmRSS:")
model = fourbit.from_pretrained(sys.argv[2], progress=False)
print(status("VmHWM:") - before)
"""


def test_peak_memory_near_the_4bit_size(tmp_path):
    # Peak RSS growth of a fresh process loading a ~20M-parameter fp32 checkpoint (80 MB in one file). Quantized as it
    # is read, the model is ~13 MB; holding the dense model, or the file's pages while it stays open, costs 80 MB.
    import subprocess
    import sys

    for name, layers, hidden in (("warm", 1, 64), ("model", 6, 512)):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=3 * hidden,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=hidden // 64)  # fmt: skip
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp_path / name, safe_serialization=True)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / "warm"), str(tmp_path / "model")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 0.35 * dense_bytes, (peak, dense_bytes)


# ---------------------------------------------------------------------------------------------------------- bnb -> us
def test_reads_transformers_bitsandbytes_checkpoint(dense_dir, bnb_dir):
    ours = fourbit.from_pretrained(bnb_dir, progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(bnb_dir, device_map="cpu")
    files = _shards(bnb_dir)
    quant_type, nested = BNB_SETTINGS[_kind(bnb_dir)]
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert layers and all(m.quant_type == quant_type and (m.weight_nested_absmax is not None) == nested
                          for m in layers.values())  # fmt: skip
    for name, layer in layers.items():
        # the stored bytes, not requantized ...
        assert torch.equal(layer.weight, files[f"{name}.weight"])
        assert torch.equal(layer.weight_absmax, files[f"{name}.weight.absmax"])
        # ... decoding to bitsandbytes' values (its nested scales in fp32: equal to rounding)
        bnb_layer = theirs.get_submodule(name)
        expected = bnbF.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state)
        torch.testing.assert_close(layer.dequantize(torch.float32), expected, rtol=1e-6, atol=1e-7)
    # Same weights to rounding; the matmuls differ (bitsandbytes: dequantize + F.linear, fourbit: matmul_4bit), so
    # float32 sums are added in another order: logits of size ~1 agree to a few ulps per layer, far below 1e-5.
    torch.testing.assert_close(_logits(ours), _bnb_logits(theirs), rtol=1e-5, atol=1e-5)


def test_load_state_dict_of_bitsandbytes_model(dense_dir, bnb_dir):
    theirs = AutoModelForCausalLM.from_pretrained(bnb_dir, device_map="cpu")
    ours = fourbit.quantize_model(AutoModelForCausalLM.from_pretrained(dense_dir), progress=False).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: every key known
    assert torch.equal(_logits(ours), _logits(fourbit.from_pretrained(bnb_dir, progress=False)))


# ---------------------------------------------------------------------------------------------------------- us -> bnb
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_saved_checkpoint_loads_in_transformers_bitsandbytes(dense_dir, tmp_path, storage):
    ours = fourbit.from_pretrained(dense_dir, quant_storage=storage, progress=False)
    out = fourbit.save_pretrained(ours, tmp_path / "q", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    reference = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"],
                                   bnb_4bit_quant_storage=storage)  # fmt: skip
    reference = reference.to_dict()
    assert qc == json.loads(json.dumps(reference))
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    files = _shards(out)
    for name, layer in ours.named_modules():
        if isinstance(layer, Linear4bit):
            assert type(theirs.get_submodule(name)).__name__ == "Linear4bit"
            assert files[f"{name}.weight"].dtype == storage
            assert torch.equal(_bytes(files[f"{name}.weight"]), _bytes(layer.weight))  # loaded as stored by both
    assert "lm_head.weight" not in files  # tied: stored once, as transformers does
    torch.testing.assert_close(_bnb_logits(theirs), _logits(ours), rtol=1e-5, atol=1e-5)
    again = fourbit.from_pretrained(out, progress=False)
    assert torch.equal(_logits(again), _logits(ours))


def test_resave_replaces_old_shards(dense_dir, tmp_path):
    model = fourbit.from_pretrained(dense_dir, progress=False)
    fourbit.save_pretrained(model, tmp_path / "q", max_shard_size="40KB")
    (tmp_path / "q" / "README.md").write_text("kept")
    fourbit.save_pretrained(model, tmp_path / "q")
    names = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert torch.equal(_logits(fourbit.from_pretrained(tmp_path / "q", progress=False)), _logits(model))


# ---------------------------------------------------------------------------------------------------------- LoRA
def test_save_with_lora_layers(dense_dir, tmp_path):
    model = fourbit.from_pretrained(dense_dir, progress=False)
    base_logits = _logits(model)
    target = "q_proj" if _kind(dense_dir) == "llama" else "c_attn"
    fourbit.add_lora(model, fourbit.LoraConfig(r=4, target_modules=[target], init_lora_weights="gaussian"))
    for layer in fourbit.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    with pytest.raises(ValueError, match="unmerged adapters.*save_adapter"):
        fourbit.save_pretrained(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    fourbit.save_pretrained(model, tmp_path / "base", base_only=True)  # adapters dropped: the base model
    assert torch.equal(_logits(fourbit.from_pretrained(tmp_path / "base", progress=False)), base_logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merging into 4 bits is lossy and says so
        fourbit.merge_lora(model)
    with pytest.raises(ValueError, match="merged adapters"):
        fourbit.save_pretrained(model, tmp_path / "x", base_only=True)
    fourbit.save_pretrained(model, tmp_path / "merged")
    merged = fourbit.from_pretrained(tmp_path / "merged", progress=False)
    assert not fourbit.lora_layers(merged)
    assert torch.equal(_logits(merged), _logits(model))


def test_save_bad_arguments(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="no fourbit Linear4bit"):
        fourbit.save_pretrained(AutoModelForCausalLM.from_pretrained(dense_dir), tmp_path / "dense")
    model = fourbit.from_pretrained(dense_dir, progress=False)
    with pytest.raises(ValueError, match="max_shard_size.*'5 parsecs'"):
        fourbit.save_pretrained(model, tmp_path / "q", max_shard_size="5 parsecs")
    with pytest.raises(TypeError, match="transformers model"):
        fourbit.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "q")


# ---------------------------------------------------------------------------------------------------------- bad folders
def _copy(src, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, key, change):
    """Applies ``change(tensors)`` to the shard holding ``key``."""
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        if key in tensors:
            change(tensors)
            save_file(tensors, file, metadata={"format": "pt"})
            return
    raise AssertionError(key)


def _first_4bit_layer(folder):
    return next(k for k in _shards(folder) if k.endswith(".weight.absmax")).removesuffix(".weight.absmax")


def test_missing_or_truncated_shard(bnb_dir, tmp_path):
    bad = _copy(bnb_dir, tmp_path)
    victim = sorted(bad.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=rf"{victim.name}' is not a readable safetensors file"):
        fourbit.from_pretrained(bad, progress=False)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        fourbit.from_pretrained(bad, progress=False)


def test_pickle_only_refused(dense_dir, tmp_path):
    bad = tmp_path / "pickle"
    bad.mkdir()
    shutil.copy(dense_dir / "config.json", bad / "config.json")
    torch.save({"x": torch.zeros(1)}, bad / "pytorch_model.bin")  # never unpickled by fourbit
    with pytest.raises(ValueError, match=r"pickle weights only \(\['pytorch_model.bin'\]\); fourbit loads safetensors"):
        fourbit.from_pretrained(bad, progress=False)
    (bad / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        fourbit.from_pretrained(bad, progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        fourbit.from_pretrained(tmp_path / "nowhere", progress=False)


def test_corrupted_quant_state_json(bnb_dir, tmp_path):
    bad = _copy(bnb_dir, tmp_path)
    layer = _first_4bit_layer(bad)
    blob = next(k for k in _shards(bad) if k.startswith(f"{layer}.weight.quant_state."))

    def corrupt(tensors):
        tensors[blob] = torch.tensor(list(b'{"quant_type": "nf4", "blocksize": 6'), dtype=torch.uint8)

    _rewrite(bad, blob, corrupt)
    with pytest.raises(ValueError, match=rf"{layer}\.weight: .*does not hold valid UTF-8 JSON"):
        fourbit.from_pretrained(bad, progress=False)


def test_absmax_of_wrong_length(bnb_dir, tmp_path):
    bad = _copy(bnb_dir, tmp_path)
    layer = _first_4bit_layer(bad)
    key = f"{layer}.weight.absmax"
    _rewrite(bad, key, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    with pytest.raises(ValueError, match=rf"{layer}\.weight: absmax must have \d+ values"):
        fourbit.from_pretrained(bad, progress=False)


def test_nan_absmax(bnb_dir, tmp_path):
    bad = _copy(bnb_dir, tmp_path)
    layer = _first_4bit_layer(bad)
    nested = f"{layer}.weight.nested_absmax" in _shards(bad)
    key = f"{layer}.weight.nested_absmax" if nested else f"{layer}.weight.absmax"

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0] = float("nan")

    _rewrite(bad, key, poison)
    with pytest.raises(ValueError, match=rf"{layer}\.weight: .*non-finite"):
        fourbit.from_pretrained(bad, progress=False)


def test_short_packed_weight(bnb_dir, tmp_path):
    bad = _copy(bnb_dir, tmp_path)
    key = f"{_first_4bit_layer(bad)}.weight"
    _rewrite(bad, key, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    with pytest.raises(ValueError, match="packed weight holds"):
        fourbit.from_pretrained(bad, progress=False)


def test_index_naming_a_path_refused(bnb_dir, tmp_path):
    bad = _copy(bnb_dir, tmp_path)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../bnb/" + index["weight_map"][key]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="plain '\\*.safetensors' file name"):
        fourbit.from_pretrained(bad, progress=False)


def test_missing_and_misshapen_tensors(dense_dir, tmp_path):
    bad = _copy(dense_dir, tmp_path)
    key = next(k for k in _shards(bad) if k.endswith("norm.weight") or k.endswith("ln_f.weight"))
    _rewrite(bad, key, lambda t: t.__setitem__(key, torch.ones(3)))
    with pytest.raises(ValueError, match=rf"tensor '{key}' has shape \(3,\), the model expects \(64,\)"):
        fourbit.from_pretrained(bad, progress=False)
    # the index still lists the tensor: a shard that lost it is a mismatched checkpoint
    _rewrite(bad, key, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="not in the shard it names"):
        fourbit.from_pretrained(bad, progress=False)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"lacks tensors the model needs: \['{key}'\]"):
        fourbit.from_pretrained(bad, progress=False)


def test_other_quantization_methods_refused(dense_dir, tmp_path):
    bad = _copy(dense_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        fourbit.from_pretrained(bad, progress=False)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="8-bit"):
        fourbit.from_pretrained(bad, progress=False)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        fourbit.from_pretrained(dense_dir, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        fourbit.from_pretrained(dense_dir, blocksize=48)
