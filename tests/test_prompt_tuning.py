# SPDX-License-Identifier: Apache-2.0
"""Prompt tuning against PEFT (files both ways, same logits and loss), training, generate(), 4-bit models, inits,
bad input."""

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fourbit
from fourbit.nn import PromptTunedModel, PromptTuning
from conftest import requires_gpu

transformers.logging.set_verbosity_error()

N = 5  # virtual tokens
IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # row 0 left-padded


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


def run(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, labels=IDS, **kwargs)


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's deprecation noise about transformers' checkpointing API
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


# ---------------------------------------------------------------------------------------------- PEFT interop
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_our_folder_loads_in_peft_with_the_same_logits_and_loss(arch, tmp_path):
    base = MODELS[arch]()
    ours = fourbit.add_prompt_tuning(copy.deepcopy(base), N)
    assert isinstance(ours, PromptTunedModel) and isinstance(ours.prompt_encoder, PromptTuning)
    out = run(ours)
    # Like PEFT, the outputs cover the virtual positions too: real token t is at position N + t.
    assert out.logits.shape == (2, N + 7, 256)
    fourbit.save_prompt_tuning(ours, tmp_path / "pt")
    assert sorted(p.name for p in (tmp_path / "pt").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "pt" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim",
                                   "num_transformer_submodules", "num_attention_heads", "num_layers",
                                   "prompt_tuning_init")} == {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": N, "token_dim": 64,
        "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2, "prompt_tuning_init": "RANDOM"}  # fmt: skip
    tensors = load_file(str(tmp_path / "pt" / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (N, 64)
    theirs = peft_load(copy.deepcopy(base), tmp_path / "pt")
    expected = run(theirs)
    assert expected.logits.shape == (2, N + 7, 256)  # what PEFT returns: virtual positions included
    real = MASK.bool()  # compare every real (non-padding) token position, where the numbers mean something
    torch.testing.assert_close(out.logits[:, N:][real], expected.logits[:, N:][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss)
    # and the prompt does something: different from the base model's logits on the real tokens
    assert not torch.allclose(out.logits[:, N:], run(base).logits, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_peft_saved_prompt_loads_with_the_same_logits(arch, tmp_path):
    base = MODELS[arch]()
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB")).eval()  # fmt: skip
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = fourbit.load_prompt_tuning(copy.deepcopy(base), tmp_path / "peft")
    assert torch.equal(ours.prompt_encoder.embedding.weight, theirs.prompt_encoder["default"].embedding.weight)
    assert not ours.prompt_encoder.embedding.weight.requires_grad  # is_trainable=False, as in PEFT
    expected, out = run(theirs), run(ours)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss)
    # Saved again by fourbit: the same tensor, and PEFT's config values.
    fourbit.save_prompt_tuning(ours, tmp_path / "again")
    assert torch.equal(load_file(str(tmp_path / "again" / "adapter_model.safetensors"))["prompt_embeddings"],
                       load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"])  # fmt: skip
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    peft_saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "peft_version"} == {
        k: v for k, v in peft_saved.items() if k != "peft_version"}  # fmt: skip


def test_inputs_embeds_and_position_ids_paths_agree():
    model = fourbit.add_prompt_tuning(tiny_llama(), N)
    ones = torch.ones_like(IDS)
    by_ids = run(model).logits
    embeds = model.get_input_embeddings()(IDS)
    with torch.no_grad():
        by_embeds = model(inputs_embeds=embeds, attention_mask=MASK).logits
        plain = model(input_ids=IDS, attention_mask=ones).logits
        positions = torch.arange(7).expand(2, 7)
        with_positions = model(input_ids=IDS, attention_mask=ones, position_ids=positions).logits
        no_mask = model(input_ids=IDS).logits
    torch.testing.assert_close(by_embeds, by_ids)
    # explicit positions 0..L-1 are shifted behind the prompt: the same as letting the model number them
    torch.testing.assert_close(with_positions, plain)
    torch.testing.assert_close(no_mask, plain)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_decoding_step_with_a_cache_does_not_prepend_the_prompt_again(arch):
    model = fourbit.add_prompt_tuning(MODELS[arch](), N, init="sample_vocab")
    with torch.no_grad():
        full = model(input_ids=IDS).logits
        first = model(input_ids=IDS[:, :5], use_cache=True)
        step = model(input_ids=IDS[:, 5:], cache=first.cache, attention_mask=torch.ones_like(IDS))
    torch.testing.assert_close(step.logits, full[:, -2:])


# ---------------------------------------------------------------------------------------------- training
def _train(model, steps=6, lr=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4bit"])
def test_only_the_prompt_trains_and_the_loss_goes_down(quantized, tmp_path):
    base = tiny_llama()
    if quantized:
        base = fourbit.quantize_model(base, progress=False)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    model = fourbit.add_prompt_tuning(base, N, init="sample_vocab")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.embedding.weight"]
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert model.prompt_encoder.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.base_model.named_parameters())
    model.zero_grad()
    losses = _train(model)
    assert losses[-1] < losses[0] - 0.1, losses
    for name, value in before.items():
        assert torch.equal(model.base_model.state_dict()[name], value), name
    # the trained prompt on the 4-bit (or dense) model: PEFT loads it over the same model and agrees
    fourbit.save_prompt_tuning(model, tmp_path / "pt")
    theirs = peft_load(copy.deepcopy(model.base_model), tmp_path / "pt")
    torch.testing.assert_close(run(model).logits, run(theirs).logits, atol=1e-5, rtol=1e-5)
    # fourbit round trip: exact
    reloaded = fourbit.load_prompt_tuning(copy.deepcopy(model.base_model), tmp_path / "pt")
    assert torch.equal(run(reloaded).logits, run(model).logits)


def test_reentrant_gradient_checkpointing_gives_the_same_prompt_gradient():
    model = fourbit.add_prompt_tuning(fourbit.quantize_model(tiny_llama(), progress=False), N, init="sample_vocab")
    model.train()
    checkpointed = copy.deepcopy(model)
    # a reentrant checkpoint needs an input that requires grad: the prompt is one
    checkpointed.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    model(input_ids=IDS, labels=IDS).loss.backward()
    checkpointed(input_ids=IDS, labels=IDS).loss.backward()
    torch.testing.assert_close(checkpointed.prompt_encoder.embedding.weight.grad,
                               model.prompt_encoder.embedding.weight.grad, atol=1e-6, rtol=1e-5)  # fmt: skip


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_returns_input_then_greedy_tokens_of_the_prompted_model(arch):
    model = fourbit.add_prompt_tuning(MODELS[arch](), N, init="sample_vocab")
    ones = torch.ones_like(IDS)
    out = model.generate(input_ids=IDS, attention_mask=ones, max_new_tokens=4, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    assert out.shape == (2, 7 + 4) and torch.equal(out[:, :7], IDS)  # like PeftModel.generate: input, then new
    # Greedy decoding without a cache through the prompted forward picks the same tokens.
    seq = IDS
    for _ in range(4):
        with torch.no_grad():
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    # The first new token also agrees with PEFT's generate over the same prompt.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(model.base_model), peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N)).eval()  # fmt: skip
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(model.prompt_encoder.embedding.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_out = theirs.generate(input_ids=IDS, attention_mask=ones, max_new_tokens=1, do_sample=False,
                                   pad_token_id=0)  # fmt: skip
    assert torch.equal(peft_out, out[:, :8])
    # a left-padded batch generates too, and the padded row's tokens equal those of that row alone
    padded = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False, pad_token_id=0)
    alone = model.generate(input_ids=IDS[:1, 2:], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(padded[0, 7:], alone[0, 5:])


# ---------------------------------------------------------------------------------------------- inits
def test_inits_follow_peft():
    base = tiny_llama()
    words = base.get_input_embeddings().weight
    torch.manual_seed(0)
    random = PromptTuning(N, 64)
    assert abs(random.embedding.weight.std().item() - 1.0) < 0.3  # nn.Embedding's N(0, 1), PEFT's RANDOM
    sampled = PromptTuning(8, 64, init="SAMPLE_VOCAB", word_embeddings=base.get_input_embeddings())
    assert all(any(torch.equal(row, w) for w in words) for row in sampled.embedding.weight)

    def tokenizer(text):  # any callable returning {"input_ids": [...]}
        return {"input_ids": [ord(c) for c in text]}

    text = fourbit.add_prompt_tuning(copy.deepcopy(base), 5, init="text", init_text="abc", tokenizer=tokenizer)
    ids = [ord(c) for c in "abcab"]  # repeated to num_virtual_tokens, as PEFT does
    assert torch.equal(text.prompt_encoder.embedding.weight, words[ids])
    cut = fourbit.add_prompt_tuning(copy.deepcopy(base), 2, init="TEXT", init_text="xyz", tokenizer=tokenizer)
    assert torch.equal(cut.prompt_encoder.embedding.weight, words[[ord("x"), ord("y")]])


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", [0, -3, 2.5, True, None])
def test_num_virtual_tokens_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=f"num_virtual_tokens must be a positive integer, got {value!r}"):
        fourbit.add_prompt_tuning(tiny_llama(), value)


def test_bad_arguments():
    base = tiny_llama()
    with pytest.raises(ValueError, match="init must be one of .* got 'zeros'"):
        fourbit.add_prompt_tuning(base, N, init="zeros")
    with pytest.raises(ValueError, match="init='text' needs a non-empty init_text"):
        fourbit.add_prompt_tuning(base, N, init="text", tokenizer=lambda t: [1])
    with pytest.raises(ValueError, match="init='text' needs a tokenizer"):
        fourbit.add_prompt_tuning(base, N, init="text", init_text="hi")
    with pytest.raises(ValueError, match=r"ids \[300\] outside the vocabulary of 256"):
        fourbit.add_prompt_tuning(base, N, init="text", init_text="hi", tokenizer=lambda t: [300])
    with pytest.raises(TypeError, match="get_input_embeddings"):
        fourbit.add_prompt_tuning(torch.nn.Linear(3, 3), N)
    model = fourbit.add_prompt_tuning(base, N)
    with pytest.raises(ValueError, match="already has a soft prompt"):
        fourbit.add_prompt_tuning(model, N)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=IDS, inputs_embeds=torch.zeros(2, 7, 64))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, length\] = \[2, 7\] tensor, got a tensor of shape \(2, 6\)"):
        model(input_ids=IDS, attention_mask=MASK[:, 1:])
    with pytest.raises(ValueError, match=r"labels must be a \[batch, length\]"):
        model(input_ids=IDS, labels=IDS[0])
    with pytest.raises(ValueError, match="input_ids must be a"):
        model(input_ids=IDS[0])
    with pytest.raises(ValueError, match="token_type_ids"):
        model(input_ids=IDS, token_type_ids=torch.zeros_like(IDS))
    with pytest.raises(TypeError, match="PromptTunedModel"):
        fourbit.save_prompt_tuning(base, "/nonexistent/never/written")


def test_bad_files_give_clear_errors(tmp_path):
    base = tiny_llama()
    model = fourbit.add_prompt_tuning(copy.deepcopy(base), N)
    fourbit.save_prompt_tuning(model, tmp_path / "good")
    good_config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    good = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))

    def expect(error, message, tensors=None, config=None, into=None):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        save_file(tensors if tensors is not None else good, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({**good_config, **(config or {})}))
        with pytest.raises(error, match=message):
            fourbit.load_prompt_tuning(into if into is not None else copy.deepcopy(base), folder)

    expect(ValueError, r"prompt_embeddings .* has shape \(4, 64\), expected \[num_virtual_tokens, token_dim\] = \[5, 64\]",
           {"prompt_embeddings": torch.zeros(4, 64)})  # fmt: skip
    expect(ValueError, r"has shape \(5, 32\)", {"prompt_embeddings": torch.zeros(5, 32)})
    expect(ValueError, r"has shape \(5\,\)", {"prompt_embeddings": torch.zeros(5)})
    expect(ValueError, r"single tensor 'prompt_embeddings', it holds \['prompt'\]", {"prompt": torch.zeros(5, 64)})
    expect(ValueError, "contains NaN or inf", {"prompt_embeddings": torch.full((5, 64), float("inf"))})
    expect(ValueError, "dtype torch.int64", {"prompt_embeddings": torch.zeros(5, 64, dtype=torch.long)})
    expect(ValueError, "num_virtual_tokens must be a positive integer, got 0", config={"num_virtual_tokens": 0})
    expect(ValueError, "token_dim=128, the model's embeddings have dimension 64", config={"token_dim": 128})
    expect(ValueError, "num_transformer_submodules=2", config={"num_transformer_submodules": 2})
    expect(ValueError, "peft_type 'LORA'.*fourbit.load_adapter", config={"peft_type": "LORA"})
    expect(ValueError, "task_type 'SEQ_2_SEQ_LM'", config={"task_type": "SEQ_2_SEQ_LM"})
    expect(ValueError, "holds 5 virtual tokens, the model's prompt has 3", into=fourbit.add_prompt_tuning(copy.deepcopy(base), 3))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        fourbit.load_prompt_tuning(copy.deepcopy(base), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        fourbit.load_prompt_tuning(copy.deepcopy(base), tmp_path)
    # loading into an existing wrapper overwrites its prompt in place
    other = fourbit.add_prompt_tuning(copy.deepcopy(base), N)
    same = fourbit.load_prompt_tuning(other, tmp_path / "good", is_trainable=True)
    assert same is other and torch.equal(other.prompt_encoder.embedding.weight, model.prompt_encoder.embedding.weight)
    assert other.prompt_encoder.embedding.weight.requires_grad


@requires_gpu
def test_cuda_4bit_model_with_a_prompt():
    model = fourbit.add_prompt_tuning(fourbit.quantize_model(tiny_llama().cuda(), progress=False), N, init="sample_vocab")
    assert model.prompt_encoder.embedding.weight.is_cuda
    ids = IDS.cuda()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.prompt_encoder.embedding.weight.grad.abs().sum() > 0
    out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7 + 2) and torch.equal(out[:, :7], ids)
