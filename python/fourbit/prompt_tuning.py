# SPDX-License-Identifier: Apache-2.0
"""Model-level prompt tuning: add a soft prompt to a transformers causal LM, save and load it in PEFT's format.

The folder is PEFT's: ``adapter_config.json`` with ``"peft_type": "PROMPT_TUNING"`` and PEFT's fields, and
``adapter_model.safetensors`` holding the single tensor ``prompt_embeddings`` ``[num_virtual_tokens, token_dim]``.
``peft.PeftModel.from_pretrained(base, path)`` loads what :func:`save_prompt_tuning` writes, and
:func:`load_prompt_tuning` loads what PEFT's ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import _io
from .nn.prompt_tuning import PromptTunedModel, PromptTuning, _input_embeddings, _positive_int

__all__ = ["add_prompt_tuning", "save_prompt_tuning", "load_prompt_tuning"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TENSOR_KEY = "prompt_embeddings"
_PEFT_INIT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def add_prompt_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    init: str = "random",
    init_text: str | None = None,
    tokenizer=None,
) -> PromptTunedModel:
    """Wraps a transformers causal LM (4-bit or not) in a :class:`fourbit.nn.PromptTunedModel` with a new soft
    prompt of ``num_virtual_tokens`` tokens and freezes the model, so only the prompt trains.

    ``init``: "random", "sample_vocab" or "text" (with ``init_text`` and ``tokenizer``); see
    :class:`fourbit.nn.PromptTuning`. Returns the wrapper (the model is ``wrapper.base_model``); call it and its
    ``generate()`` as you would the model."""
    if isinstance(model, PromptTunedModel):
        raise ValueError("the model already has a soft prompt (it is a PromptTunedModel)")
    _positive_int("num_virtual_tokens", num_virtual_tokens)
    embed = _input_embeddings(model)
    weight = embed.weight
    prompt = PromptTuning(num_virtual_tokens, weight.shape[1], init=init, word_embeddings=embed, init_text=init_text,
                          tokenizer=tokenizer, device=weight.device)  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = PromptTunedModel(model, prompt)
    wrapped.__dict__["_fourbit_prompt_meta"] = {
        "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None) or None,
        "prompt_tuning_init_text": init_text if prompt.init == "text" else None,
    }
    return wrapped


def _model_config_value(model: nn.Module, *keys: str):
    config = getattr(model, "config", None)
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return None


def _peft_config(wrapped: PromptTunedModel) -> dict:
    """PEFT's ``PromptTuningConfig`` fields, as its ``save_pretrained`` writes them."""
    base = wrapped.base_model
    meta = wrapped.__dict__.get("_fourbit_prompt_meta", {})
    init = _PEFT_INIT[wrapped.prompt_encoder.init]
    if init == "TEXT" and meta.get("tokenizer_name_or_path") is None:
        # PEFT re-runs a TEXT init when it loads with is_trainable=True and needs a tokenizer name for it; the
        # trained values are in the file either way.
        init = "RANDOM"
    return {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": _model_config_value(base, "num_attention_heads", "n_head"),
        "num_layers": _model_config_value(base, "num_hidden_layers", "n_layer"),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": wrapped.num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": meta.get("prompt_tuning_init_text") if init == "TEXT" else None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": wrapped.prompt_encoder.token_dim,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": meta.get("tokenizer_name_or_path") if init == "TEXT" else None,
    }


def save_prompt_tuning(model: PromptTunedModel, path: str) -> Path:
    """Writes the soft prompt in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors`` with
    ``prompt_embeddings``) into the folder ``path``, atomically."""
    if not isinstance(model, PromptTunedModel):
        raise TypeError(f"model must be a PromptTunedModel (from add_prompt_tuning), got {type(model).__name__}")
    config = _peft_config(model)
    tensors = {TENSOR_KEY: model.prompt_encoder.embedding.weight.detach()}

    def write(folder: Path) -> None:
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        _io.write_safetensors(tensors, folder / ADAPTER_WEIGHTS)

    return _io.atomic_folder_save(path, write)


def _read(folder: Path, token_dim: int) -> tuple[dict, torch.Tensor]:
    config = _io.read_json(folder / ADAPTER_CONFIG)
    peft_type = config.get("peft_type")
    if peft_type != "PROMPT_TUNING":
        hint = " (load LoRA adapters with fourbit.load_adapter)" if peft_type == "LORA" else ""
        raise ValueError(f"{str(folder)!r} holds peft_type {peft_type!r}, not a prompt-tuning adapter{hint}")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise ValueError(f"{str(folder)!r} has task_type {task!r}; fourbit's prompt tuning is for CAUSAL_LM models")
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise ValueError(f"{str(folder)!r} has num_transformer_submodules={submodules!r} (an encoder-decoder prompt); "
                         "fourbit supports 1 (decoder-only models)")  # fmt: skip
    n = config.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{str(folder)!r}: num_virtual_tokens must be a positive integer, got {n!r}")
    dim = config.get("token_dim")
    if dim is not None and dim != token_dim:
        raise ValueError(f"{str(folder)!r} has token_dim={dim!r}, the model's embeddings have dimension {token_dim}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {ADAPTER_WEIGHTS} (fourbit loads safetensors only)")
    tensors = _io.read_safetensors(weights)
    if set(tensors) != {TENSOR_KEY}:
        raise ValueError(f"{str(weights)!r} must hold the single tensor {TENSOR_KEY!r}, it holds {sorted(tensors)}")
    value = tensors[TENSOR_KEY]
    if tuple(value.shape) != (n, token_dim):
        raise ValueError(f"{TENSOR_KEY} in {str(weights)!r} has shape {tuple(value.shape)}, expected "
                         f"[num_virtual_tokens, token_dim] = [{n}, {token_dim}]")  # fmt: skip
    if not value.is_floating_point():
        raise ValueError(f"{TENSOR_KEY} in {str(weights)!r} has dtype {value.dtype}; expected a floating-point tensor")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{TENSOR_KEY} in {str(weights)!r} contains NaN or inf")
    return config, value


def load_prompt_tuning(model: nn.Module, path: str, is_trainable: bool = False) -> PromptTunedModel:
    """Loads a prompt-tuning folder written by fourbit or PEFT (safetensors only).

    ``model`` is a transformers causal LM (then it is frozen and wrapped in a new :class:`PromptTunedModel`, which
    is returned) or a ``PromptTunedModel`` with a prompt of the same size (its prompt is overwritten in place).
    ``is_trainable=False`` (PEFT's default) freezes the prompt."""
    folder = _io.resolve_folder(path, ADAPTER_CONFIG)
    base = model.base_model if isinstance(model, PromptTunedModel) else model
    embed = _input_embeddings(base)
    config, value = _read(folder, embed.weight.shape[1])
    n = config["num_virtual_tokens"]
    if isinstance(model, PromptTunedModel):
        if model.num_virtual_tokens != n:
            raise ValueError(f"{str(folder)!r} holds {n} virtual tokens, the model's prompt has {model.num_virtual_tokens}")
        wrapped = model
    else:
        wrapped = add_prompt_tuning(model, n)
        wrapped.__dict__["_fourbit_prompt_meta"] = {k: config.get(k) for k in ("tokenizer_name_or_path",
                                                                               "prompt_tuning_init_text")}  # fmt: skip
        wrapped.prompt_encoder.init = str(config.get("prompt_tuning_init") or "RANDOM").lower()
        if wrapped.prompt_encoder.init not in _PEFT_INIT:
            wrapped.prompt_encoder.init = "random"
    weight = wrapped.prompt_encoder.embedding.weight
    with torch.no_grad():
        weight.copy_(value.to(weight))
    weight.requires_grad_(bool(is_trainable))
    return wrapped
