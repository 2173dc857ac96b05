# SPDX-License-Identifier: Apache-2.0
"""Prompt tuning (Lester et al. 2021) with PEFT's semantics: a trained soft prompt prepended to a causal LM's input
embeddings.

:class:`PromptTuning` is the soft prompt (``embedding``: ``nn.Embedding(num_virtual_tokens, token_dim)``, PEFT's
``PromptEmbedding`` and its RANDOM / SAMPLE_VOCAB / TEXT inits). :class:`PromptTunedModel` wraps a transformers
causal LM the way ``PeftModelForCausalLM`` does for prompt tuning: the attention mask is extended with ones and the
labels with -100, so the base model's loss covers the real tokens only; its outputs (logits, hidden states) cover
the virtual positions too, as PEFT's do: the logits of the real tokens are ``logits[:, num_virtual_tokens:]``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

__all__ = ["PromptTuning", "PromptTunedModel"]

INITS = ("random", "sample_vocab", "text")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _token_ids(tokenizer, text: str) -> list[int]:
    encoded = tokenizer(text)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one
        ids = list(ids[0])
    return [int(i) for i in ids]


class PromptTuning(nn.Module):
    """A soft prompt of ``num_virtual_tokens`` trainable vectors of size ``token_dim``.

    Args:
        init: "random" (``nn.Embedding``'s N(0, 1), PEFT's RANDOM), "sample_vocab" (rows of ``word_embeddings`` at
            uniformly random token ids) or "text" (the embeddings of ``tokenizer(init_text)``'s ids, cut or repeated
            to ``num_virtual_tokens``). PEFT's upper-case names are accepted.
        word_embeddings: the model's input embedding (for "sample_vocab" and "text").
        init_text, tokenizer: for "text": ``tokenizer(init_text)["input_ids"]`` (a transformers tokenizer, or any
            callable returning a list of ids or a mapping with ``"input_ids"``).
        dtype: of the prompt (float32 by default, as PEFT keeps it); it is cast to the embeddings' dtype in use.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        init: str = "random",
        word_embeddings: nn.Embedding | None = None,
        init_text: str | None = None,
        tokenizer=None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = _positive_int("num_virtual_tokens", num_virtual_tokens)
        self.token_dim = _positive_int("token_dim", token_dim)
        init_name = init.lower() if isinstance(init, str) else init
        if init_name not in INITS:
            raise ValueError(f"init must be one of {list(INITS)} (or PEFT's upper-case names), got {init!r}")
        self.init = init_name
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, dtype=dtype, device=device)
        if init_name == "random":
            return
        if word_embeddings is None or not isinstance(getattr(word_embeddings, "weight", None), torch.Tensor):
            raise ValueError(f"init={init!r} needs word_embeddings (the model's input embedding layer)")
        vocab, dim = word_embeddings.weight.shape
        if dim != token_dim:
            raise ValueError(f"word_embeddings have dimension {dim}, the prompt token_dim is {token_dim}")
        if init_name == "sample_vocab":
            ids = torch.randint(0, vocab, (num_virtual_tokens,), dtype=torch.long)
        else:
            if not isinstance(init_text, str) or not init_text:
                raise ValueError(f"init='text' needs a non-empty init_text, got {init_text!r}")
            if tokenizer is None or not callable(tokenizer):
                raise ValueError("init='text' needs a tokenizer (callable on init_text)")
            text_ids = _token_ids(tokenizer, init_text)
            if not text_ids:
                raise ValueError(f"the tokenizer turned init_text={init_text!r} into no tokens")
            bad = [i for i in text_ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"the tokenizer gave ids {bad[:5]} outside the vocabulary of {vocab} embeddings")
            repeated = text_ids * math.ceil(num_virtual_tokens / len(text_ids))  # PEFT's cut-or-repeat
            ids = torch.tensor(repeated[:num_virtual_tokens], dtype=torch.long)
        with torch.no_grad():
            rows = word_embeddings.weight.detach()[ids.to(word_embeddings.weight.device)]
            self.embedding.weight.copy_(rows.to(self.embedding.weight))

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt for a batch: ``[batch_size, num_virtual_tokens, token_dim]`` (a broadcast view)."""
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}, init={self.init!r}"


def _cache_length(kwargs: dict) -> int:
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        get = getattr(cache, "get_seq_length", None)
        if callable(get):
            return int(get())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])
    return 0


class PromptTunedModel(nn.Module):
    """A transformers causal LM with a soft prompt in front of every input (PEFT's prompt-tuning semantics).

    ``forward(input_ids=... | inputs_embeds=..., attention_mask=None, labels=None, **kwargs)`` calls the base model
    with ``[prompt; embeddings]``, the attention mask extended with ones, ``labels`` with -100 and ``position_ids``
    (if given) with ``0 .. n-1`` before the real positions shifted by ``n`` (PEFT drops given position ids; without
    them both give positions ``0 .. n+L-1``). When a non-empty KV cache is passed, the prompt is already in it: only the
    attention mask is extended. Attributes the wrapper lacks (``config``, ``device``, ...) are the base model's.

    ``generate(input_ids=..., attention_mask=None, **kwargs)`` runs the base model's ``generate`` on the prompted
    embeddings and returns ``input_ids`` followed by the new tokens, as ``PeftModel.generate`` does (given
    ``inputs_embeds`` instead, the new tokens only, as transformers does). Repetition penalties see only the new
    tokens (transformers' limit for inputs given as embeddings)."""

    def __init__(self, model: nn.Module, prompt: PromptTuning) -> None:
        super().__init__()
        embed = _input_embeddings(model)
        if not isinstance(prompt, PromptTuning):
            raise TypeError(f"prompt must be a fourbit.nn.PromptTuning, got {type(prompt).__name__}")
        dim = embed.weight.shape[-1]
        if prompt.token_dim != dim:
            raise ValueError(f"the prompt's token_dim is {prompt.token_dim}, the model's embeddings have dimension {dim}")
        self.base_model = model
        self.prompt_encoder = prompt

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder"):
                raise
            return getattr(self._modules["base_model"], name)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_encoder.num_virtual_tokens

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def _prompted(self, input_ids, inputs_embeds, attention_mask, labels, position_ids):
        """(inputs_embeds, attention_mask, labels, position_ids) with the prompt in front."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError(f"input_ids must be a [batch, length] tensor, got {_describe(input_ids)}")
            inputs_embeds = _input_embeddings(self.base_model)(input_ids)
        elif not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be a [batch, length, hidden] tensor, got {_describe(inputs_embeds)}")
        batch, length = inputs_embeds.shape[:2]
        n = self.num_virtual_tokens
        for name, t in (("attention_mask", attention_mask), ("labels", labels), ("position_ids", position_ids)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 2 or tuple(t.shape) != (batch, length)):
                raise ValueError(f"{name} must be a [batch, length] = [{batch}, {length}] tensor, got {_describe(t)}")
        prompt = self.prompt_encoder(batch).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        inputs_embeds = torch.cat([prompt, inputs_embeds], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        if position_ids is not None:
            prompt_positions = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype).expand(batch, n)
            position_ids = torch.cat([prompt_positions, position_ids + n], dim=1)
        return inputs_embeds, attention_mask, labels, position_ids

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                **kwargs):  # fmt: skip
        if kwargs.get("token_type_ids") is not None:
            raise ValueError("token_type_ids are not supported with prompt tuning (the prompt has no token type)")
        kwargs.pop("token_type_ids", None)
        if _cache_length(kwargs) > 0:  # decoding step: the prompt is already in the cache
            if attention_mask is not None:
                n = self.num_virtual_tokens
                attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], dim=1)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   labels=labels, position_ids=position_ids, **kwargs)  # fmt: skip
        inputs_embeds, attention_mask, labels, position_ids = self._prompted(
            input_ids, inputs_embeds, attention_mask, labels, position_ids)  # fmt: skip
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        generate = getattr(self.base_model, "generate", None)
        if not callable(generate):
            raise TypeError(f"{type(self.base_model).__name__} has no generate()")
        if "position_ids" in kwargs or "token_type_ids" in kwargs:
            raise ValueError("generate() with prompt tuning takes no position_ids / token_type_ids")
        embeds, mask, _, _ = self._prompted(input_ids, inputs_embeds, attention_mask, None, None)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        with warnings.catch_warnings():
            # transformers warns that repetition penalties cannot see tokens given as embeddings only
            warnings.filterwarnings("ignore", message=".*inputs_embeds.*without `input_ids`.*")
            out = generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        if input_ids is None:
            return out
        # Given embeddings only, a decoder-only generate() returns the new tokens; PEFT returns input + new tokens.
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids.to(out.device), out], dim=1)
        if hasattr(out, "sequences"):
            out.sequences = torch.cat([input_ids.to(out.sequences.device), out.sequences], dim=1)
        return out


def _input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    if embed is None or not isinstance(getattr(embed, "weight", None), torch.Tensor) or embed.weight.dim() != 2:
        raise TypeError(f"prompt tuning needs a model with get_input_embeddings() returning an embedding layer "
                        f"(a transformers model); {type(model).__name__} has none")  # fmt: skip
    return embed


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value) if value is None else type(value).__name__
