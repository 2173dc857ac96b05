# SPDX-License-Identifier: Apache-2.0
"""Model-level QLoRA: quantize a model's linear layers, add / switch / merge LoRA adapters, save and load them in
PEFT's format.

Works on any ``torch.nn.Module``; Hugging Face transformers models included (their ``nn.Linear`` layers and GPT-2's
``Conv1D``). Adapted layers become :class:`fourbit.nn.LoRALinear` under the same module path, with PEFT's sub-module
names (``<path>.base_layer``, ``<path>.lora_A.<adapter>``, ...), so the tensor names in an adapter file are PEFT's:
``base_model.model.<path>.lora_A.weight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from . import _io
from .config import LoraConfig
from .nn.linear4bit import Linear4bit
from .nn.lora import LoRALinear, _is_conv1d

__all__ = [
    "quantize_model", "add_lora", "lora_layers", "set_adapter", "delete_adapter", "disable_adapters",
    "per_row_adapters", "active_adapters", "merge_lora", "unmerge_lora", "save_adapter", "load_adapter", "load_adapter_weights", "adapter_state_dict",
    "prepare_for_kbit_training", "trainable_parameters",
]  # fmt: skip

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT's default targets when target_modules is None (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "bert": ["query", "value"],
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- helpers
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit)) or _is_conv1d(module)


def _name_matches(name: str, spec: str | list[str]) -> bool:
    """PEFT's rule: a string is a regular expression matched against the whole name; a list matches a name equal to
    an entry or ending with ``.<entry>``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _output_layer_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    names = {n for n, m in model.named_modules() if out is not None and m is out}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _candidate_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every linear layer or LoRALinear, not descending into a LoRALinear."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoRALinear):
            inside.append(name)
            yield name, module
        elif _is_linear(module):
            yield name, module


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its elements (two per packed byte)."""
    trainable = total = 0
    seen = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = module.in_features * module.out_features if isinstance(module, Linear4bit) and pname == "weight" else p.numel()
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------------------- quantize
def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] = ("lm_head",),
    quant_storage: torch.dtype = torch.uint8,
    progress: bool = True,
) -> nn.Module:
    """Replaces every ``nn.Linear`` and transformers ``Conv1D`` (except those named in ``skip_modules``, matched as
    names or name suffixes) by a :class:`fourbit.nn.Linear4bit`, in place, one layer at a time (so the dense weights
    are freed as it goes). Returns the model."""
    if isinstance(skip_modules, str):
        skip_modules = [skip_modules]
    skip = list(skip_modules)
    targets = [(n, m) for n, m in _candidate_linears(model)
               if not isinstance(m, (Linear4bit, LoRALinear)) and not _name_matches(n, skip)]  # fmt: skip
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("quantize_model must run before add_lora (the model already has LoRA layers)")
    bar = _progress(targets, "quantizing", progress)
    for name, module in bar:
        if _is_conv1d(module):  # Conv1D stores [in, out]; Linear4bit holds [out, in] like bitsandbytes does
            dense = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None,
                              device="meta")  # fmt: skip
            dense.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
            dense.bias = module.bias
            module = dense
        layer = Linear4bit.from_linear(module, quant_type, blocksize, compress_statistics, compute_dtype, quant_storage)
        _set_module(model, name, layer)
    config = getattr(model, "config", None)
    if config is not None:  # what transformers + bitsandbytes record, so a saved model says how it was quantized
        config.fourbit_quantization = dict(quant_type=quant_type, blocksize=blocksize,
                                           compress_statistics=compress_statistics, skip_modules=skip)  # fmt: skip
    return model


def _progress(items, desc: str, enabled: bool):
    if not enabled or len(items) < 2:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return items
    return tqdm(items, desc=desc, unit="layer", leave=False)


# ---------------------------------------------------------------------------------------------------------- LoRA
def _adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    configs = model.__dict__.get("_fourbit_lora_configs")
    if configs is None:
        configs = {}
        model.__dict__["_fourbit_lora_configs"] = configs
    return configs


def _resolve_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    targets = config.target_modules
    outputs = _output_layer_names(model)
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in _DEFAULT_TARGETS:
            raise ValueError(
                f"target_modules is None and fourbit knows no default targets for model type {model_type!r}; "
                "pass a list of module names, a regex, or 'all-linear'"
            )
        targets = _DEFAULT_TARGETS[model_type]
    found = []
    for name, module in _candidate_linears(model):
        if targets == "all-linear":
            hit = name not in outputs
        else:
            hit = _name_matches(name, targets)
        if hit and config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
            hit = False
        if hit:
            found.append((name, module))
    if not found:
        raise ValueError(f"target_modules={config.target_modules!r} matched no linear layer of the model")
    return found


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Adds the LoRA adapter ``adapter_name`` to the target linear layers of ``model`` (in place) and returns it.

    The first adapter added is active and trainable and everything else is frozen (``modules_to_save`` and, with
    ``bias="all"`` / ``"lora_only"``, the biases excepted). A later adapter is added inactive, as PEFT's
    ``add_adapter`` does; :func:`set_adapter` switches. Over a ``Linear4bit`` the layer is QLoRA (fused kernels).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a fourbit.LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == "__base__":
        raise ValueError(f"adapter_name must be a non-empty string without '.', not '__base__'; got {adapter_name!r}")
    configs = _adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; delete_adapter() it first")
    config = dataclasses.replace(config)  # the model keeps its own copy (fan_in_fan_out may be set below)
    first = not configs
    targets = _resolve_targets(model, config)
    for target in config.modules_to_save or []:  # checked before anything changes
        if not any(n and _name_matches(n, [target]) for n, _ in model.named_modules()):
            raise ValueError(f"modules_to_save entry {target!r} matches no module of the model")
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in targets:
        kwargs = dict(r=config.rank_for(name), lora_alpha=config.alpha_for(name), lora_dropout=config.lora_dropout,
                      use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                      use_dora=config.use_dora)  # fmt: skip
        if isinstance(module, LoRALinear):
            module.update_layer(adapter_name, **kwargs)
            if not first:  # stays inactive (set_adapter activates it)
                module.set_adapter(module.active_adapters)
        else:
            layer = LoRALinear(module, adapter_name, **kwargs)
            if not first:
                layer.set_adapter([])
            _set_module(model, name, layer)
    if any(_is_conv1d(model.get_submodule(name).base_layer) for name, _ in targets):
        config.fan_in_fan_out = True
    configs[adapter_name] = config
    if first:
        _set_extra_trainables(model, config, True)
    return model


def _extra_trainables(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """Parameters trained and saved with the adapter besides LoRA's: biases (``bias``) and ``modules_to_save``."""
    params: dict[str, nn.Parameter] = {}
    lora = lora_layers(model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        owner = name.rpartition(".")[0]
        if config.bias == "all" and name.endswith(".bias"):
            params[name] = p
        elif config.bias == "lora_only" and name.endswith(".base_layer.bias") and owner.rpartition(".")[0] in lora:
            params[name] = p
    for target in config.modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n and _name_matches(n, [target])]
        if not hits:
            raise ValueError(f"modules_to_save entry {target!r} matches no module of the model")
        for module_name in hits:
            for pname, p in model.get_submodule(module_name).named_parameters():
                params[f"{module_name}.{pname}"] = p
    return params


def _set_extra_trainables(model: nn.Module, config: LoraConfig, trainable: bool) -> None:
    for name, p in _extra_trainables(model, config).items():
        if not p.is_floating_point():
            raise ValueError(f"{name} cannot be trained: it is {p.dtype} (modules_to_save must not be 4-bit)")
        p.requires_grad_(trainable)


def _require_adapter(model: nn.Module, names: list[str]) -> None:
    configs = _adapter_configs(model)
    for name in names:
        if name not in configs:
            raise ValueError(f"unknown adapter {name!r}; the model has {list(configs)}")


def set_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Makes these adapters the active (and trainable) ones; several active adapters are summed."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    _require_adapter(model, names)
    for layer in lora_layers(model).values():
        layer.set_adapter([n for n in names if n in layer.lora_A])


def active_adapters(model: nn.Module) -> list[str]:
    active: dict[str, None] = {}
    for layer in lora_layers(model).values():
        active.update(dict.fromkeys(layer.active_adapters))
    return list(active)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    _require_adapter(model, [adapter_name])
    for layer in lora_layers(model).values():
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
    del _adapter_configs(model)[adapter_name]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within this context the model computes with its base layers only."""
    with contextlib.ExitStack() as stack:
        for layer in lora_layers(model).values():
            stack.enter_context(layer.disable_adapters())
        yield model


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, adapter_names: list[str]):
    """Within this context row ``i`` of every batch uses adapter ``adapter_names[i]`` (``"__base__"``: none), the
    4-bit layers in one pass over their weight (``lora_linear_multi``)."""
    names = list(adapter_names)
    _require_adapter(model, [n for n in dict.fromkeys(names) if n != "__base__"])

    def hook(module, args, kwargs):
        # A layer the adapter does not reach computes its base output for that row.
        kwargs = dict(kwargs)
        kwargs["adapter_names"] = [n if n in module.lora_A else "__base__" for n in names]
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in lora_layers(model).values()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def merge_lora(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Merges the (active, or the named) adapters into the base weights of every LoRA layer. Into 4-bit weights this
    requantizes (lossy; ``unmerge_lora`` restores the original bytes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in lora_layers(model).values():
            names = [n for n in (adapter_names or layer.active_adapters) if n in layer.lora_A]
            if names:
                layer.merge(safe_merge=safe_merge, adapter_names=names)
    for message in dict.fromkeys(str(w.message) for w in caught):  # once per model, not once per layer
        warnings.warn(message, stacklevel=2)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()
    return model


def prepare_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    keep_norms_fp32: bool = False,
) -> nn.Module:
    """Gets a quantized model ready for adapter training, like PEFT's ``prepare_model_for_kbit_training`` but
    without casting the embeddings and the output layer to float32 (that cast is where PEFT's helper spends memory):
    freezes the base, enables gradient checkpointing (``use_reentrant=False`` by default, so no input-grad hook is
    needed; with a reentrant checkpoint the input embeddings are made to require grad) and, with
    ``keep_norms_fp32``, keeps the normalisation layers' weights in float32."""
    for p in model.parameters():
        p.requires_grad_(False)
    if keep_norms_fp32:
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() or name.split(".")[-1].endswith("norm"):
                for p in module.parameters(recurse=False):
                    if p.is_floating_point():
                        p.data = p.data.float()
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            enable = getattr(model, "enable_input_require_grads", None)
            if not callable(enable):
                raise ValueError("a reentrant gradient checkpoint needs model.enable_input_require_grads()")
            enable()
        # transformers 5 renamed it activation_checkpointing_enable (the old name warns); older ones have only that.
        if callable(getattr(model, "activation_checkpointing_enable", None)):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif callable(getattr(model, "gradient_checkpointing_enable", None)):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass use_gradient_checkpointing=False"
            )
    return model


# ---------------------------------------------------------------------------------------------------------- files
def _strip_adapter(key: str, adapter_name: str) -> str:
    # `<path>.lora_A.<adapter>.weight` -> `<path>.lora_A.weight`; DoRA's magnitude drops `.weight` as PEFT does.
    key = key.replace(f".lora_magnitude_vector.{adapter_name}.weight", ".lora_magnitude_vector")
    return re.sub(rf"\.(lora_A|lora_B)\.{re.escape(adapter_name)}\.", r".\1.", key)


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """PEFT file key -> the model's parameter, for one adapter (LoRA matrices, DoRA magnitudes, extra trainables)."""
    config = _adapter_configs(model)[adapter_name]
    out = {}
    for path, layer in lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        out[f"{_PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        out[f"{_PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            out[f"{_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    for name, p in _extra_trainables(model, config).items():
        out[_PREFIX + name] = p
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (``base_model.model.<path>.lora_A.weight``, ...)."""
    _require_adapter(model, [adapter_name])
    return {k: v.detach() for k, v in _adapter_tensors(model, adapter_name).items()}


def _config_for_file(model: nn.Module, adapter_name: str) -> dict:
    config = _adapter_configs(model)[adapter_name]
    d = config.to_peft_dict()
    layers = {p: l for p, l in lora_layers(model).items() if adapter_name in l.lora_A}
    if config.target_modules is None or config.target_modules == "all-linear":
        d["target_modules"] = sorted({p.split(".")[-1] for p in layers})  # what PEFT writes after resolving them
    d["fan_in_fan_out"] = any(l.fan_in_fan_out for l in layers.values())
    if d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None) or None  # fmt: skip
    return d


def save_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` into the folder ``path``, in PEFT's format
    (``PeftModel.from_pretrained`` loads it). The save is atomic: an interrupted save leaves the previous adapter."""
    import json

    _require_adapter(model, [adapter_name])
    tensors = adapter_state_dict(model, adapter_name)
    config = _config_for_file(model, adapter_name)

    def write(folder: Path) -> None:
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default))
        _io.write_safetensors(tensors, folder / ADAPTER_WEIGHTS)

    return _io.atomic_folder_save(path, write)


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return sorted(value)
    raise TypeError(f"cannot write {value!r} to an adapter config")


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False) -> nn.Module:
    """Loads a LoRA adapter folder written by fourbit or PEFT (safetensors only) into ``model`` as ``adapter_name``
    (a bottleneck-adapter folder written by ``fourbit.save_bottleneck_adapters`` is loaded as such).

    The adapter's layers are created from its config (targets, ranks, rsLoRA, DoRA) and every tensor is checked
    against them: a missing, unexpected or wrongly shaped tensor is an error naming it, and nothing is changed.
    The adapter becomes active if it is the model's only one. ``is_trainable=False`` (PEFT's default) freezes it."""
    folder = _io.resolve_folder(path, ADAPTER_CONFIG)
    raw = _io.read_json(folder / ADAPTER_CONFIG)
    if raw.get("adapter_type") == "bottleneck":
        from .adapters import load_bottleneck_adapters

        load_bottleneck_adapters(model, folder, adapter_name, is_trainable=is_trainable)
        return model
    if raw.get("peft_type") == "PROMPT_TUNING":
        raise ValueError(f"{str(folder)!r} holds a prompt-tuning adapter: load it with fourbit.load_prompt_tuning(model, "
                         "path), which returns the prompt-tuned wrapper")  # fmt: skip
    config = LoraConfig.from_peft_dict(raw)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {ADAPTER_WEIGHTS} (fourbit loads safetensors only)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tensors = _io.read_safetensors(weights, device)
    tensors = {k if k.startswith(_PREFIX) else _PREFIX + k: v for k, v in tensors.items()}
    if adapter_name in _adapter_configs(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; delete_adapter() it first")
    snapshot = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        add_lora(model, config, adapter_name)
        expected = _copy_adapter_tensors(model, adapter_name, tensors, folder)
    except Exception:
        _undo_add(model, adapter_name, snapshot)
        raise
    if not is_trainable:
        for param in expected.values():
            param.requires_grad_(False)
    return model


def load_adapter_weights(model: nn.Module, path: str, adapter_name: str = "default") -> nn.Module:
    """Loads the tensors of an adapter folder into the model's existing adapter ``adapter_name`` (e.g. to resume
    training from a checkpoint); the folder must match the adapter's layers and shapes exactly."""
    _require_adapter(model, [adapter_name])
    folder = _io.resolve_folder(path, ADAPTER_WEIGHTS)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tensors = _io.read_safetensors(folder / ADAPTER_WEIGHTS, device)
    _copy_adapter_tensors(model, adapter_name, {k if k.startswith(_PREFIX) else _PREFIX + k: v for k, v in tensors.items()}, folder)
    return model


def _copy_adapter_tensors(model, adapter_name, tensors, folder) -> dict[str, nn.Parameter]:
    """Checks every tensor against the adapter's parameters (names, shapes, dtype, finite), then copies them."""
    expected = _adapter_tensors(model, adapter_name)
    _io.copy_checked_tensors(expected, tensors, folder)
    return expected


def _undo_add(model: nn.Module, adapter_name: str, snapshot: dict[str, bool]) -> None:
    for path, layer in lora_layers(model).items():
        if adapter_name in layer.lora_A:
            if len(layer.lora_A) == 1:
                _set_module(model, path, layer.base_layer)
            else:
                layer.delete_adapter(adapter_name)
    _adapter_configs(model).pop(adapter_name, None)
    for name, p in model.named_parameters():
        if name in snapshot:
            p.requires_grad_(snapshot[name])
