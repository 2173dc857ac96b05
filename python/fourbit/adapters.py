# SPDX-License-Identifier: Apache-2.0
"""Model-level bottleneck adapters: place :class:`fourbit.nn.BottleneckAdapter` modules in a transformer, switch,
save and load them.

Placement on pre-LN decoders (Llama, GPT-2): a forward hook on each chosen sublayer (``self_attn`` / ``attn``,
``mlp``) rewrites its output ``h`` into ``h + f(h)`` before the decoder layer adds its residual. Hooks keep every
module path of the base model unchanged, so LoRA targets, PEFT keys and bitsandbytes checkpoints still line up. The
adapters live under ``<sublayer>.bottleneck_adapters.<adapter name>`` (a ``ModuleDict``; beside an ``nn.Sequential``
sublayer, as ``<parent>.<name>_bottleneck_adapters``), so they move with ``.to()``, appear in ``parameters()`` /
``state_dict()``, and survive ``deepcopy`` and pickling (the hook is a bound method of that ``ModuleDict``).

- "pfeiffer" (AdapterHub's ``seq_bn``): one adapter per layer, after the FFN / MLP.
- "houlsby" (AdapterHub's ``double_seq_bn``): two per layer, after the attention and after the MLP.

Files: ``adapter_config.json`` (fourbit's own format, ``"adapter_type": "bottleneck"`` and every hyper-parameter,
including the sublayer paths) and ``adapter_model.safetensors`` with keys
``<sublayer path>.bottleneck_adapters.adapter_down.weight`` etc. (the in-memory key without the adapter name, as
PEFT does for LoRA).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from pathlib import Path

import torch
from torch import nn

from . import _io
from .nn.adapters import _INITS, _NON_LINEARITIES, BottleneckAdapter, bottleneck_size

__all__ = [
    "add_bottleneck_adapters", "set_bottleneck_adapter", "delete_bottleneck_adapter", "disable_bottleneck_adapters",
    "bottleneck_adapter_names", "bottleneck_state_dict", "save_bottleneck_adapters", "load_bottleneck_adapters",
]  # fmt: skip

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_TYPE = "bottleneck"
FORMAT_VERSION = 1
SLOT = "bottleneck_adapters"
PLACEMENTS = ("pfeiffer", "houlsby")
# Child names of a decoder layer's attention and feed-forward sublayers in transformers' decoders (Llama, Mistral,
# Qwen2, Gemma: self_attn / mlp; GPT-2, GPT-J: attn / mlp; GPT-NeoX: attention / mlp; Falcon: self_attention / mlp).
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_FFN_NAMES = ("mlp", "feed_forward", "ffn")


class _AdapterSlot(nn.ModuleDict):
    """The bottleneck adapters of one sublayer, by name; ``active`` ones are applied in order (stacked). Its bound
    ``hook`` is the sublayer's forward hook, so ``deepcopy`` and pickling carry the pairing along."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[str] = []
        self.disabled = False
        self.hook_id: int | None = None

    def hook(self, module: nn.Module, args, output):
        if self.disabled or not self.active:
            return output
        # transformers' attention sublayers return (hidden, attn_weights[, cache]); MLPs return the tensor itself.
        h = output[0] if isinstance(output, tuple) else output
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"a bottleneck adapter needs a tensor (or a tuple starting with one) as the sublayer's "
                            f"output, got {type(output).__name__}")  # fmt: skip
        for name in self.active:
            h = self[name](h)
        return (h, *output[1:]) if isinstance(output, tuple) else h


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _slot_owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """Where a sublayer's slot lives: inside the sublayer (``<path>.bottleneck_adapters``) or, when the sublayer is
    a container whose forward would run every child (``nn.Sequential``), beside it in its parent
    (``<parent>.<name>_bottleneck_adapters``)."""
    sublayer = model.get_submodule(path)
    if not isinstance(sublayer, _CONTAINERS):
        return sublayer, SLOT
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, _CONTAINERS):
        raise ValueError(f"cannot hold adapters for {path!r}: it is a {type(sublayer).__name__} inside a "
                         f"{type(parent).__name__} (adding a child to either would change its forward)")  # fmt: skip
    return parent, f"{child}_{SLOT}"


# ---------------------------------------------------------------------------------------------------------- finding
def _configs(model: nn.Module) -> dict[str, dict]:
    configs = model.__dict__.get("_fourbit_bottleneck_configs")
    if configs is None:
        configs = {}
        model.__dict__["_fourbit_bottleneck_configs"] = configs
    return configs


def _matches(name: str, spec: str | list[str]) -> bool:
    """PEFT's rule for module names: a string is a regular expression matched against the whole name; a list
    matches a name equal to an entry or ending with ``.<entry>``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _module_names(model: nn.Module) -> list[str]:
    """Module paths of the base model (adapters excluded)."""
    slots = [n for n, m in model.named_modules() if isinstance(m, _AdapterSlot)]
    return [n for n, _ in model.named_modules() if n and not any(n == s or n.startswith(s + ".") for s in slots)]


def _find_sublayers(model: nn.Module, placement: str, attn_modules, ffn_modules) -> tuple[list[str], list[str]]:
    """(attention sublayer paths, feed-forward sublayer paths) to hook."""
    names = _module_names(model)
    if attn_modules is None and ffn_modules is None:
        attn, ffn = [], []
        base_names = {"", *names}
        for name, module in model.named_modules():
            if name not in base_names:
                continue
            children = dict(module.named_children())
            a = next((c for c in _ATTN_NAMES if c in children), None)
            f = next((c for c in _FFN_NAMES if c in children), None)
            if a is not None and f is not None:  # a decoder layer
                prefix = f"{name}." if name else ""
                attn.append(prefix + a)
                ffn.append(prefix + f)
        if not ffn:
            raise ValueError(
                f"found no decoder layer (a module with an attention child {list(_ATTN_NAMES)} and a feed-forward "
                f"child {list(_FFN_NAMES)}) in {type(model).__name__}; name the sublayers with ffn_modules= (and "
                "attn_modules= for placement='houlsby')"
            )
    else:
        for arg, spec in (("attn_modules", attn_modules), ("ffn_modules", ffn_modules)):
            if spec is not None and not (isinstance(spec, str) or
                                         (isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec))):  # fmt: skip
                raise TypeError(f"{arg} must be a regular expression or a list of module names, got {spec!r}")
        if ffn_modules is None:
            raise ValueError("ffn_modules must be given when attn_modules is (every placement adapts the feed-forward)")
        if placement == "houlsby" and attn_modules is None:
            raise ValueError("placement='houlsby' needs attn_modules= as well as ffn_modules=")
        ffn = [n for n in names if _matches(n, _as_spec(ffn_modules))]
        attn = [n for n in names if _matches(n, _as_spec(attn_modules))] if attn_modules is not None else []
        if not ffn:
            raise ValueError(f"ffn_modules={ffn_modules!r} matched no module of {type(model).__name__}")
        if placement == "houlsby" and not attn:
            raise ValueError(f"attn_modules={attn_modules!r} matched no module of {type(model).__name__}")
        both = sorted(set(attn) & set(ffn))
        if both:
            raise ValueError(f"modules {both[:3]} match both attn_modules and ffn_modules")
    return (attn if placement == "houlsby" else []), ffn


def _as_spec(spec):
    return spec if isinstance(spec, str) else list(spec)


def _hidden_size(model: nn.Module, hidden_size: int | None) -> int:
    if hidden_size is not None:
        return hidden_size
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} (no config.hidden_size); pass hidden_size=")


def _device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------- adding
def add_bottleneck_adapters(
    model: nn.Module,
    reduction_factor: float = 16,
    placement: str = "pfeiffer",
    non_linearity: str = "relu",
    adapter_name: str = "default",
    init_weights: str = "mam_adapter",
    dropout: float = 0.0,
    scaling: float = 1.0,
    hidden_size: int | None = None,
    attn_modules: str | list[str] | None = None,
    ffn_modules: str | list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Adds the bottleneck adapter ``adapter_name`` to every decoder layer of ``model`` (in place) and returns it.

    Args:
        placement: "pfeiffer" (after each feed-forward / MLP sublayer) or "houlsby" (after each attention and each
            MLP sublayer): on a pre-LN decoder the sublayer output ``h`` becomes ``h + f(h)`` before the residual
            add.
        reduction_factor, non_linearity, init_weights, dropout, scaling: see :class:`fourbit.nn.BottleneckAdapter`.
            The default init ("mam_adapter": zero up-projection) leaves the model's outputs unchanged.
        hidden_size: the sublayers' output width; default ``model.config.hidden_size``.
        attn_modules, ffn_modules: which sublayers to hook, as module names / name suffixes (``["mlp"]``) or a regular
            expression over full module names. Default: the ``self_attn`` / ``attn`` / ``attention`` and ``mlp`` /
            ``feed_forward`` children of every module that has both (the decoder layers of transformers' Llama-style
            and GPT-2-style models).
        dtype: the adapters' parameter dtype (float32 by default, whatever the model's dtype).

    The first bottleneck adapter added is active and trainable, and every other parameter of the model is frozen
    (quantize the model with :func:`fourbit.quantize_model` before adding adapters, or it would quantize them
    too). A later one is added inactive and frozen; :func:`set_bottleneck_adapter` switches.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if non_linearity not in _NON_LINEARITIES:
        raise ValueError(f"non_linearity must be one of {sorted(_NON_LINEARITIES)}, got {non_linearity!r}")
    if init_weights not in _INITS:
        raise ValueError(f"init_weights must be one of {list(_INITS)}, got {init_weights!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if hidden_size is not None and (isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0):
        raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
    configs = _configs(model)
    if adapter_name in configs:
        raise ValueError(f"the model already has a bottleneck adapter named {adapter_name!r}; delete it first")
    attn, ffn = _find_sublayers(model, placement, attn_modules, ffn_modules)
    width = _hidden_size(model, hidden_size)
    kwargs = dict(hidden_size=width, reduction_factor=reduction_factor, non_linearity=non_linearity,
                  init_weights=init_weights, dropout=dropout, scaling=scaling, dtype=dtype)  # fmt: skip
    BottleneckAdapter(**{**kwargs, "device": "meta"})  # validates the hyper-parameters before the model changes
    _insert(model, adapter_name, attn + ffn, kwargs)
    first = not configs
    configs[adapter_name] = dict(
        placement=placement, reduction_factor=reduction_factor, bottleneck_size=bottleneck_size(width, reduction_factor),
        non_linearity=non_linearity, init_weights=init_weights, dropout=dropout, scaling=scaling, hidden_size=width,
        dtype=str(dtype).removeprefix("torch."), attn_modules=attn, ffn_modules=ffn,
    )  # fmt: skip
    if first:
        adapter_params = {id(p) for slot in _slots(model).values() for p in slot.parameters()}
        for p in model.parameters():
            if id(p) not in adapter_params:
                p.requires_grad_(False)
        set_bottleneck_adapter(model, adapter_name)
    else:  # added inactive and frozen, as PEFT's add_adapter does
        for adapter in _adapters(model, adapter_name):
            adapter.requires_grad_(False)
    return model


def _insert(model: nn.Module, adapter_name: str, paths: list[str], kwargs: dict) -> None:
    slots = _slots(model)
    owners = {path: _slot_owner(model, path) for path in paths if path not in slots}  # may refuse: before any change
    for path in paths:
        slot = slots.get(path)
        if slot is None:
            owner, attr = owners[path]
            slot = _AdapterSlot()
            owner.add_module(attr, slot)
            slot.hook_id = model.get_submodule(path).register_forward_hook(slot.hook).id
        sublayer = model.get_submodule(path)
        adapter = BottleneckAdapter(**kwargs, device=_device_of(sublayer))
        slot[adapter_name] = adapter.train(sublayer.training)  # an adapter added to an eval() model: no dropout


def _slots(model: nn.Module) -> dict[str, _AdapterSlot]:
    """sublayer path -> its adapter slot (found through the sublayers' hooks)."""
    out = {}
    for name, module in model.named_modules():
        for hook in module._forward_hooks.values():
            if isinstance(getattr(hook, "__self__", None), _AdapterSlot):
                out[name] = hook.__self__
    return out


def _adapters(model: nn.Module, adapter_name: str) -> list[BottleneckAdapter]:
    return [slot[adapter_name] for slot in _slots(model).values() if adapter_name in slot]


def _require(model: nn.Module, names: list[str]) -> None:
    configs = _configs(model)
    for name in names:
        if name not in configs:
            raise ValueError(f"unknown bottleneck adapter {name!r}; the model has {list(configs)}")


def bottleneck_adapter_names(model: nn.Module) -> list[str]:
    return list(_configs(model))


def set_bottleneck_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Makes these adapters the active (and trainable) ones; several active ones are applied in this order (a stack:
    each sublayer output goes through the first, then the second, ...). The others are frozen."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    _require(model, names)
    for slot in _slots(model).values():
        slot.active = [n for n in names if n in slot]
        for name, adapter in slot.items():
            adapter.requires_grad_(name in names)


def delete_bottleneck_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes the adapter; sublayers left without adapters lose their slot and hook (the model is its base again)."""
    _require(model, [adapter_name])
    for path, slot in _slots(model).items():
        if adapter_name not in slot:
            continue
        del slot[adapter_name]
        slot.active = [a for a in slot.active if a != adapter_name]
        if not len(slot):
            model.get_submodule(path)._forward_hooks.pop(slot.hook_id, None)
            owners = [(m, attr) for m in model.modules() for attr, child in m._modules.items() if child is slot]
            for owner, attr in owners:
                del owner._modules[attr]
    del _configs(model)[adapter_name]


@contextlib.contextmanager
def disable_bottleneck_adapters(model: nn.Module):
    """Within this context the sublayers' outputs pass through unchanged."""
    slots = list(_slots(model).values())
    previous = [s.disabled for s in slots]
    for s in slots:
        s.disabled = True
    try:
        yield model
    finally:
        for s, p in zip(slots, previous):
            s.disabled = p


# ---------------------------------------------------------------------------------------------------------- files
def _file_tensors(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    out = {}
    for path, slot in _slots(model).items():
        if adapter_name in slot:
            for pname, p in slot[adapter_name].named_parameters():
                out[f"{path}.{SLOT}.{pname}"] = p
    return out


def bottleneck_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file keys (``<sublayer path>.bottleneck_adapters.adapter_down.weight``)."""
    _require(model, [adapter_name])
    return {k: v.detach() for k, v in _file_tensors(model, adapter_name).items()}


def save_bottleneck_adapters(model: nn.Module, path: str, adapter_name: str = "default") -> Path:
    """Writes ``adapter_config.json`` (``"adapter_type": "bottleneck"`` and the hyper-parameters) and
    ``adapter_model.safetensors`` into the folder ``path``, atomically (an interrupted save leaves the previous
    folder)."""
    from . import __version__

    _require(model, [adapter_name])
    tensors = bottleneck_state_dict(model, adapter_name)
    config = {"adapter_type": ADAPTER_TYPE, "format_version": FORMAT_VERSION, "fourbit_version": __version__,
              **_configs(model)[adapter_name],
              "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None}  # fmt: skip

    def write(folder: Path) -> None:
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        _io.write_safetensors(tensors, folder / ADAPTER_WEIGHTS)

    return _io.atomic_folder_save(path, write)


def _read_config(folder: Path) -> dict:
    config = _io.read_json(folder / ADAPTER_CONFIG)
    kind = config.get("adapter_type")
    if kind != ADAPTER_TYPE:
        what = f"peft_type {config['peft_type']!r} (a PEFT adapter)" if "peft_type" in config else f"adapter_type {kind!r}"
        raise ValueError(f"{str(folder)!r} holds {what}, not a fourbit bottleneck adapter")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(folder)!r} has format_version {config.get('format_version')!r}; this fourbit reads "
                         f"version {FORMAT_VERSION}")  # fmt: skip
    required = ("placement", "reduction_factor", "non_linearity", "init_weights", "dropout", "scaling", "hidden_size",
                "dtype", "attn_modules", "ffn_modules")  # fmt: skip
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{str(folder)!r}/{ADAPTER_CONFIG} lacks {missing}")
    for key in ("attn_modules", "ffn_modules"):
        if not isinstance(config[key], list) or not all(isinstance(s, str) for s in config[key]):
            raise ValueError(f"{ADAPTER_CONFIG} field {key} must be a list of module paths, got {config[key]!r}")
    dtype = getattr(torch, str(config["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{ADAPTER_CONFIG} field dtype must name a floating-point torch dtype, got {config['dtype']!r}")
    config["dtype"] = dtype
    return config


def load_bottleneck_adapters(model: nn.Module, path: str, adapter_name: str = "default",
                             is_trainable: bool = False) -> nn.Module:  # fmt: skip
    """Loads a folder written by :func:`save_bottleneck_adapters` into ``model`` as ``adapter_name``.

    The adapters are placed on the sublayers the file names (each must exist in ``model``), and every tensor is
    checked against them: a missing, unexpected, wrongly shaped or non-finite tensor is an error naming it, and the
    model is left unchanged. ``is_trainable=False`` freezes the loaded adapter."""
    folder = _io.resolve_folder(path, ADAPTER_CONFIG)
    config = _read_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {ADAPTER_WEIGHTS} (fourbit loads safetensors only)")
    tensors = _io.read_safetensors(weights)
    if adapter_name in _configs(model):
        raise ValueError(f"the model already has a bottleneck adapter named {adapter_name!r}; delete it first")
    names = set(_module_names(model))
    absent = [p for p in config["attn_modules"] + config["ffn_modules"] if p not in names]
    if absent:
        raise ValueError(f"adapter {str(folder)!r} adapts modules this model does not have: {absent[:5]}")
    placement = config["placement"]
    if placement == "pfeiffer" and config["attn_modules"]:
        raise ValueError(f"{ADAPTER_CONFIG}: placement 'pfeiffer' adapts no attention module, but attn_modules is "
                         f"{config['attn_modules'][:3]}")  # fmt: skip
    snapshot = {n: p.requires_grad for n, p in model.named_parameters()}
    add_bottleneck_adapters(
        model, reduction_factor=config["reduction_factor"], placement=placement,
        non_linearity=config["non_linearity"], adapter_name=adapter_name, init_weights=config["init_weights"],
        dropout=config["dropout"], scaling=config["scaling"], hidden_size=config["hidden_size"],
        attn_modules=config["attn_modules"] if placement == "houlsby" else None, ffn_modules=config["ffn_modules"],
        dtype=config["dtype"],
    )  # fmt: skip
    try:
        expected = _file_tensors(model, adapter_name)
        _io.copy_checked_tensors(expected, tensors, folder)
    except Exception:
        delete_bottleneck_adapter(model, adapter_name)
        for name, p in model.named_parameters():
            if name in snapshot:
                p.requires_grad_(snapshot[name])
        raise
    if not is_trainable:
        for adapter in _adapters(model, adapter_name):
            adapter.requires_grad_(False)
    return model
