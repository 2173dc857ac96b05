# SPDX-License-Identifier: Apache-2.0
"""Hugging Face model folders straight into 4 bits (``from_pretrained``) and back (``save_pretrained``), in the
format transformers + bitsandbytes read and write.

Loading builds the transformers model with its parameters on the meta device (no memory), replaces the linear layers
by :class:`fourbit.nn.Linear4bit` placeholders, then reads the safetensors shards one tensor at a time: each linear
weight is quantized as soon as it is read and its dense copy dropped, so the peak memory is the 4-bit model plus one
dense tensor. A folder saved by transformers + bitsandbytes (or by :func:`save_pretrained`) holds the packed 4-bit
tensors under bitsandbytes' keys; they are loaded as they are (no requantization), each quantization state validated
first.

Untrusted folders: safetensors only (pickle can run code), every quantization state validated against its packed
tensor, shard names from ``model.safetensors.index.json`` accepted only as plain file names inside the folder, and
tensor names only looked up among the model's own names (never used as paths or attributes).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from . import _io
from .functional import quantize_4bit
from .model import _candidate_linears, _name_matches, _set_module
from .nn.linear4bit import Linear4bit
from .nn.lora import LoRALinear, _is_conv1d
from .quant_state import BLOCKSIZES, QUANT_TYPES, QuantState

__all__ = ["from_pretrained", "save_pretrained", "save_quantized"]

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# A shard named in an index must be a plain file of the folder: no separators, no "..", nothing hidden.
_SHARD_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*\.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Weight files a new save supersedes: an earlier save's shards must not survive next to the new ones.
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
_QUANT_PIECE = ".weight."  # bitsandbytes' keys of a 4-bit layer: <layer>.weight.absmax, <layer>.weight.quant_map, ...
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------- reading
def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files to read (validated names) and the index's weight map, if the checkpoint is sharded."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _io.read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(f"{str(index)!r}: 'weight_map' must map tensor names to shard file names")
        shards = list(dict.fromkeys(weight_map.values()))
        for name in shards:
            if not _SHARD_NAME.fullmatch(name):
                raise ValueError(
                    f"{str(index)!r} names the shard {name!r}; a shard must be a plain '*.safetensors' file name "
                    "inside the folder (no paths)"
                )
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(folder)!r}: shard(s) {missing} listed in {WEIGHTS_INDEX} are missing")
        return [folder / name for name in shards], weight_map
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS], None
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith((*_PICKLE_SUFFIXES, ".bin.index.json")))
    if pickles:
        raise ValueError(
            f"{str(folder)!r} holds pickle weights only ({pickles}); fourbit loads safetensors only, because "
            "unpickling a file can run arbitrary code. Convert it on a machine you trust, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{str(folder)!r} has no {WEIGHTS} and no {WEIGHTS_INDEX}")


def _read_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """tensor name -> (its file, its shape), from the headers only (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                entries = [(key, tuple(f.get_slice(key).get_shape())) for key in f.keys()]
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{str(file)!r} is not a readable safetensors file: {e}") from None
        for key, shape in entries:
            if key in where:
                raise ValueError(f"tensor {key!r} is stored twice, in {where[key][0].name} and {file.name}")
            where[key] = (file, shape)
    if weight_map is not None:
        wrong = sorted(k for k, name in weight_map.items() if k not in where or where[k][0].name != name)
        if wrong:
            raise ValueError(
                f"{WEIGHTS_INDEX} lists tensors that are not in the shard it names (a truncated or mismatched "
                f"checkpoint): {wrong[:5]}{' ...' if len(wrong) > 5 else ''}"
            )
    return where


def _bnb_4bit_config(config_dict: dict) -> dict | None:
    """The checkpoint's bitsandbytes 4-bit quantization_config, None for a dense checkpoint; other methods refused."""
    qc = config_dict.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"config.json: quantization_config must be a JSON object, got {qc!r}")
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(
            f"config.json: quantization_config.quant_method={method!r}; fourbit reads dense checkpoints and "
            "bitsandbytes 4-bit ones"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError("config.json: a bitsandbytes 8-bit (LLM.int8) checkpoint; fourbit reads 4-bit ones only")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"config.json: quantization_config is bitsandbytes but not 4-bit: {qc!r}")
    return qc


@contextlib.contextmanager
def _parameters_on_meta():
    """New modules register their parameters on the meta device (no memory, no initialisation cost). Buffers stay
    real: non-persistent ones (rotary frequencies, causal masks) are computed in ``__init__`` and are not in files."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_model(folder: Path):
    """The transformers model of ``folder/config.json``, its parameters on the meta device."""
    try:
        import transformers
    except ImportError:
        raise ImportError("fourbit.from_pretrained needs transformers (pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(str(folder))  # a local folder: read, never downloaded
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layers are built dense here and replaced by fourbit's
    cls = None
    for name in getattr(config, "architectures", None) or []:
        candidate = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
            cls = candidate
            break
    with _parameters_on_meta():
        if cls is not None:
            model = cls._from_config(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    return model


def _piece_owner(key: str, layer_names) -> str | None:
    """The 4-bit layer of which ``key`` is the packed weight or a quantization-state tensor, or None."""
    owner = key.rpartition(_QUANT_PIECE)[0] if _QUANT_PIECE in key else key.removesuffix(".weight")
    return owner if owner in layer_names and (_QUANT_PIECE in key or key == owner + ".weight") else None


def _stored_quantized(where: dict) -> set[str]:
    """Module paths whose weight is stored in bitsandbytes' 4-bit form: ``<path>.weight.absmax`` or
    ``<path>.weight.quant_state.bitsandbytes__nf4|fp4`` present (other ``.weight.`` names, such as weight-norm
    parametrizations, are not 4-bit)."""
    return {key.rpartition(_QUANT_PIECE)[0] for key in where
            if re.search(r"\.weight\.(absmax|quant_state\.bitsandbytes__[a-z0-9]+)$", key)}  # fmt: skip


def _placeholder(module: nn.Module, quant_type: str, blocksize: int, compress_statistics: bool, compute_dtype,
                 quant_storage: torch.dtype) -> Linear4bit:  # fmt: skip
    if _is_conv1d(module):  # Conv1D holds [in, out]
        in_features, out_features = module.weight.shape
    else:
        in_features, out_features = module.in_features, module.out_features
    return Linear4bit(in_features, out_features, bias=module.bias is not None, compute_dtype=compute_dtype,
                      compress_statistics=compress_statistics, quant_type=quant_type, quant_storage=quant_storage,
                      blocksize=blocksize, device="meta")  # fmt: skip


def from_pretrained(
    path: str,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] = ("lm_head",),
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quant_storage: torch.dtype = torch.uint8,
    progress: bool = True,
) -> nn.Module:
    """Loads the local Hugging Face model folder ``path`` (``config.json`` + ``model.safetensors`` or sharded
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``) with its linear layers in 4 bits.

    A dense checkpoint: every ``nn.Linear`` and transformers ``Conv1D`` not named in ``skip_modules`` (names or name
    suffixes, as in :func:`fourbit.quantize_model`) becomes a :class:`~fourbit.nn.Linear4bit` quantized with
    ``quant_type`` / ``blocksize`` / ``compress_statistics`` as its weight is read; the result is the same, byte for
    byte, as ``quantize_model`` applied to the dense model, without ever holding the dense model. Conv1D weights
    (stored ``[in, out]``) are quantized transposed, as transformers + bitsandbytes do; weights tied to another
    tensor (``lm_head`` to the embeddings) stay tied.

    A 4-bit checkpoint written by transformers + bitsandbytes or by :func:`save_pretrained`: the layers stored in 4
    bits are loaded as they are (no requantization; each quantization state validated); the layers stored dense stay
    dense; ``quant_type``, ``blocksize``, ``compress_statistics``, ``quant_storage`` and ``skip_modules`` are then
    ignored (the file decides), and ``bnb_4bit_compute_dtype`` too: ``compute_dtype`` None computes in the input's
    dtype, as :class:`~fourbit.nn.Linear4bit` always does.

    ``torch_dtype``: the dtype of the non-quantized parameters and of the weights before quantization (None: as
    stored). ``device``: where the model is built and quantized. Returns the model in eval mode.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    for name, value in (("torch_dtype", torch_dtype), ("compute_dtype", compute_dtype)):
        if value is not None and value not in _DTYPES.values():
            raise TypeError(f"{name} must be None, torch.float32, torch.float16 or torch.bfloat16, got {value!r}")
    device = torch.device(device)
    skip = [skip_modules] if isinstance(skip_modules, str) else list(skip_modules)

    folder = _io.resolve_folder(path, CONFIG)
    bnb_config = _bnb_4bit_config(_io.read_json(folder / CONFIG))
    where = _read_headers(*_weight_files(folder))
    stored_4bit = _stored_quantized(where)
    if bnb_config is not None and not stored_4bit:
        raise ValueError(f"{str(folder)!r}: config.json says 4-bit (bitsandbytes) but no tensor is stored in 4 bits")
    prequantized = bool(stored_4bit)

    model = _build_model(folder)
    tied = {name: names for names in _tied_names(model) for name in names}  # a shared parameter's names
    layers: dict[str, Linear4bit] = {}
    transposed: set[str] = set()  # Conv1D layers, whose dense weight is stored [in, out]
    for name, module in list(_candidate_linears(model)):
        if name in stored_4bit if prequantized else not _name_matches(name, skip):
            layers[name] = _placeholder(module, quant_type, blocksize, compress_statistics, compute_dtype,
                                        quant_storage)  # fmt: skip
            if _is_conv1d(module) and not prequantized:
                transposed.add(name)
            _set_module(model, name, layers[name])
    if stored_4bit - set(layers):
        raise ValueError(f"{str(folder)!r} holds 4-bit tensors for modules that are not linear layers of "
                         f"{type(model).__name__}: {sorted(stored_4bit - set(layers))[:5]}")  # fmt: skip
    slots = _tensor_slots(model)
    # dense path: <layer>.weight -> layer; 4-bit checkpoints: each stored piece of a 4-bit layer -> the layer
    quant_weights = {} if prequantized else {f"{name}.weight": name for name in layers}
    piece_owner = {k: _piece_owner(k, layers) for k in where if prequantized and _piece_owner(k, layers)}
    piece_counts = Counter(piece_owner.values())
    _check_names_and_shapes(folder, model, where, slots, tied, layers, quant_weights, piece_owner, transposed)

    def place(key: str, tensor: torch.Tensor) -> None:
        if key in piece_owner:
            name = piece_owner[key]
            piece = key[len(name) + len(_QUANT_PIECE) :] if key != f"{name}.weight" else ""
            pending.setdefault(name, {})[piece] = tensor.clone()  # small (4-bit); its own memory, not the file's
            if len(pending[name]) == piece_counts[name]:
                _load_4bit(name, layers[name], pending.pop(name), device)
            return
        shared = None
        for target in tied.get(key, [key]):
            if target in quant_weights:
                name = quant_weights[target]
                _quantize_into(target, layers[name], tensor, name in transposed, torch_dtype, compress_statistics,
                               device)  # fmt: skip
            elif target in slots:
                module, attr = slots[target]
                if attr in module._buffers:
                    with torch.no_grad():
                        module._buffers[attr].copy_(tensor)
                    continue
                if shared is None:  # one Parameter for all the names of a tied one
                    dtype = torch_dtype if torch_dtype is not None and tensor.is_floating_point() else tensor.dtype
                    value = tensor.to(device=device, dtype=dtype, copy=True)  # a copy: never the file mapping
                    requires_grad = module._parameters[attr].requires_grad and value.is_floating_point()
                    shared = nn.Parameter(value, requires_grad=requires_grad)
                module._parameters[attr] = shared

    from safetensors import safe_open

    pending: dict[str, dict[str, torch.Tensor]] = {}
    wanted = [k for k in where if k in slots or k in quant_weights or k in piece_owner]
    bar = _bar(len(wanted), "loading", progress)
    for key in wanted:  # the headers' order: shard by shard
        # safetensors hands out tensors backed by a mapping of the whole file, and every page read stays resident
        # while the file is open: opening it for each tensor (a header parse) keeps one tensor's pages at a time.
        with safe_open(str(where[key][0]), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(key)
        place(key, tensor)
        del tensor
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left or pending:
        raise ValueError(f"{str(folder)!r}: tensors left unloaded: {(left or sorted(pending))[:8]}")
    if device.type != "cpu":
        model.to(device)  # the buffers computed at construction
    if torch_dtype is not None and hasattr(model.config, "dtype"):
        model.config.dtype = torch_dtype
    if layers:  # what quantize_model records
        first = next(iter(layers.values()))
        model.config.fourbit_quantization = dict(
            quant_type=first.quant_type, blocksize=first.blocksize,
            compress_statistics=first.weight_nested_absmax is not None,
            skip_modules=sorted(n for n, m in _candidate_linears(model) if not isinstance(m, Linear4bit)),
        )  # fmt: skip
    return model.eval()


def _tensor_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every tensor the model stores in a checkpoint, by name -> (module, attribute); 4-bit weights apart."""
    slots = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        for pname, p in module._parameters.items():
            if p is not None and not (isinstance(module, Linear4bit) and pname == "weight"):
                slots[prefix + pname] = (module, pname)
        if isinstance(module, Linear4bit):
            continue
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                slots[prefix + bname] = (module, bname)
    return slots


def _check_names_and_shapes(folder, model, where, slots, tied, layers, quant_weights, piece_owner, transposed) -> None:
    """Missing tensors and wrong shapes are errors, found from the headers before any data is read; tensors the
    model does not have are ignored with a warning (transformers' own ignore list silently)."""
    needed = [*slots, *quant_weights, *(f"{name}.weight" for name in set(piece_owner.values()))]
    missing = [n for n in needed if not any(t in where for t in tied.get(n, [n]))]
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise ValueError(f"{str(folder)!r} lacks tensors the model needs: {missing[:8]}{more}")
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = [k for k in where if k not in slots and k not in quant_weights and k not in piece_owner
                  and not any(p.search(k) for p in ignore)]  # fmt: skip
    if unexpected:
        warnings.warn(f"{str(folder)!r}: ignoring tensors the model does not have: {sorted(unexpected)[:8]}",
                      stacklevel=3)  # fmt: skip
    for key, (file, shape) in where.items():
        if key in slots:
            module, attr = slots[key]
            expected = tuple(getattr(module, attr).shape)
        elif key in quant_weights:
            layer = layers[quant_weights[key]]
            expected = (layer.out_features, layer.in_features)
            if quant_weights[key] in transposed:
                expected = expected[::-1]
        else:
            continue  # 4-bit pieces: checked against their quantization state when loaded
        if shape != expected:
            raise ValueError(f"{file.name}: tensor {key!r} has shape {shape}, the model expects {expected}")


def _quantize_into(key: str, layer: Linear4bit, weight: torch.Tensor, transposed: bool, torch_dtype,
                   compress_statistics: bool, device: torch.device) -> None:  # fmt: skip
    if not weight.is_floating_point():
        raise ValueError(f"tensor {key!r} is {weight.dtype}; a linear weight to quantize must be floating point")
    if torch_dtype is not None:
        weight = weight.to(torch_dtype)  # the dense model's dtype: the same bytes as quantize_model on it
    weight = weight.to(device)
    if transposed:
        weight = weight.t()
    layer._store(*quantize_4bit(weight, layer.blocksize, layer.quant_type, compress_statistics, layer.quant_storage))


def _load_4bit(name: str, layer: Linear4bit, pieces: dict[str, torch.Tensor], device: torch.device) -> None:
    """Packed tensor + bitsandbytes' quantization-state tensors -> the layer, validated before anything uses them."""
    packed = pieces.pop("")
    try:
        state = QuantState.from_dict(pieces, device=device)
        needed = (math.prod(state.shape) + 1) // 2
        have = packed.numel() * packed.element_size()
        if have < needed:
            raise ValueError(f"the packed weight holds {have} bytes, its quantization state needs {needed}")
        layer._store(packed.to(device), state)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name}.weight: {e}") from None
    layer.quant_storage = packed.dtype


def _bar(total: int, desc: str, enabled: bool):
    if not enabled or total < 2:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


# ---------------------------------------------------------------------------------------------------------- saving
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", size, re.IGNORECASE)
        if m and float(m.group(1)) > 0:
            return max(1, int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]))
    raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}")


def _checkpoint_tensors(model: nn.Module, base_only: bool) -> dict[str, torch.Tensor]:
    """The model's state dict as transformers + bitsandbytes name it: a LoRA layer is saved as its base layer under
    the layer's own path; tied parameters once (under their first name)."""
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, layer in lora.items():
        if base_only and layer.merged:
            raise ValueError(
                f"base_only=True, but {name} has merged adapters {layer.merged_adapters}: its base weight is no "
                "longer the base model's; call fourbit.unmerge_lora(model) first"
            )
        unmerged = [a for a in layer.active_adapters if a not in layer.merged_adapters]
        if not base_only and unmerged:
            raise ValueError(
                f"the model has LoRA layers with unmerged adapters ({name}: {unmerged}); save_pretrained writes "
                "the model transformers + bitsandbytes load, which has no LoRA. Either merge them first "
                "(fourbit.merge_lora(model): requantizes the merged weight, lossy), or save the adapters with "
                "fourbit.save_adapter(model, adapter_path) and the 4-bit base with save_pretrained(model, path, "
                "base_only=True)"
            )
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in model.state_dict().items():
        owner = next((n for n in lora if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
        elif owner not in done:  # the LoRA layer's first key: its base layer's tensors take its place
            done.add(owner)
            for k, v in lora[owner].base_layer.state_dict().items():
                out[f"{owner}.{k}"] = v
    dropped = {_rename(n, lora) for names in _tied_names(model) for n in names[1:]}
    return {k: v for k, v in out.items() if k not in dropped}


def _rename(name: str, lora: dict) -> str:
    for path in lora:
        if name.startswith(path + ".base_layer."):
            return path + "." + name[len(path) + len(".base_layer.") :]
    return name


def _tied_names(model: nn.Module) -> list[list[str]]:
    """The names of each parameter shared by several modules (a tied lm_head and embedding), in model order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _describe(model: nn.Module) -> tuple[list[tuple[str, Linear4bit]], list[str], torch.dtype]:
    """((path, 4-bit layer) pairs, the paths of the linear layers left dense, the dtype of the dense parameters)."""
    layers, dense = [], []
    for name, module in _candidate_linears(model):
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if isinstance(base, Linear4bit):
            layers.append((name, base))
        else:
            dense.append(name)
    four_bit = {id(layer.weight) for _, layer in layers}
    floats = [p.dtype for p in model.parameters() if id(p) not in four_bit and p.is_floating_point()]
    dtype = Counter(floats).most_common(1)[0][0] if floats else (layers[0][1].weight_dtype if layers else torch.float32)
    return layers, dense, dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry of config.json for this 4-bit model, with the keys and value forms
    transformers' ``BitsAndBytesConfig.to_dict()`` writes. Which layers are 4-bit and how each is quantized is in the
    checkpoint itself (each layer's quantization state); this records the common settings and, in
    ``llm_int8_skip_modules``, every linear layer left dense, so transformers does not convert those."""
    named, dense, dtype = _describe(model)
    layers = [layer for _, layer in named]
    if not layers:
        raise ValueError("the model has no fourbit Linear4bit layer; quantize it first (fourbit.quantize_model)")

    def common(values, what):
        counts = Counter(values)
        if len(counts) > 1:
            warnings.warn(f"the model's 4-bit layers mix {what} {dict(counts)}; config.json records the most common "
                          "(each layer's own quantization state is what loaders use)", stacklevel=3)  # fmt: skip
        return counts.most_common(1)[0][0]

    compute = common([layer.compute_dtype for layer in layers], "compute dtypes") or dtype
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": dense,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": common([layer.quant_type for layer in layers], "quant types"),
        "bnb_4bit_use_double_quant": common([layer.weight_nested_absmax is not None for layer in layers],
                                            "double quantization settings"),
        "bnb_4bit_compute_dtype": _dtype_name(compute),
        "bnb_4bit_quant_storage": _dtype_name(common([layer.weight.dtype for layer in layers], "storage dtypes")),
        "load_in_4bit": True,
        "load_in_8bit": False,
    }  # fmt: skip


def _shards(tensors: dict[str, torch.Tensor], layer_names: set[str], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards of at most ``limit`` bytes (a tensor larger than that gets one to itself); a 4-bit layer's
    packed weight and quantization-state tensors always share a shard."""
    units: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        units.setdefault(_piece_owner(key, layer_names) or key, {})[key] = value
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for unit in units.values():
        nbytes = sum(t.numel() * t.element_size() for t in unit.values())
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1].update(unit)
        size += nbytes
    return shards


def save_pretrained(model: nn.Module, path: str, max_shard_size: int | str = "5GB", base_only: bool = False) -> Path:
    """Saves a 4-bit transformers model (from :func:`from_pretrained` or :func:`fourbit.quantize_model`) to the folder
    ``path`` the way transformers + bitsandbytes save theirs: ``config.json`` with a bitsandbytes
    ``quantization_config``, safetensors weights with bitsandbytes' keys (``<layer>.weight``,
    ``<layer>.weight.absmax``, ... ``<layer>.weight.quant_state.bitsandbytes__nf4``), sharded above
    ``max_shard_size`` (bytes, or "5GB" / "500MiB") with a ``model.safetensors.index.json``. transformers'
    ``AutoModelForCausalLM.from_pretrained(path)`` loads it into bitsandbytes, and :func:`from_pretrained` into
    fourbit, both without requantizing.

    LoRA layers: a model saved this way has none. A LoRA layer whose active adapters are all merged is saved as its
    (merged) base layer; unmerged active adapters are refused with an error, unless ``base_only=True``, which saves
    the base layers and drops the adapters (save them with :func:`fourbit.save_adapter`). Inactive adapters are not
    saved. The save is atomic (``path.tmp``, then renames): an interrupted save leaves the previous folder.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not callable(getattr(config, "to_json_string", None)):
        raise TypeError(f"model must be a transformers model (with a .config), got {type(model).__name__}")
    limit = _parse_size(max_shard_size)
    qconfig = quantization_config(model)
    tensors = _checkpoint_tensors(model, base_only)
    named, _, dtype = _describe(model)

    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict.pop("fourbit_quantization", None)
    config_dict["quantization_config"] = qconfig
    config_dict["architectures"] = [type(model).__name__]
    if "dtype" in config_dict or "torch_dtype" not in config_dict:
        config_dict["dtype"] = _dtype_name(dtype)
    else:
        config_dict["torch_dtype"] = _dtype_name(dtype)
    generation = getattr(model, "generation_config", None)
    generation_json = None
    if callable(getattr(generation, "to_json_string", None)):
        generation_json = generation.to_json_string(use_diff=True)

    # safetensors refuses two entries sharing memory: copy the (small) tensors that do, e.g. a shared codebook.
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().cpu()
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if storage in seen else value
        seen.add(storage)
    shards = _shards(tensors, {name for name, _ in named}, limit)

    def write(folder: Path) -> None:
        (folder / CONFIG).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if generation_json is not None:
            (folder / GENERATION_CONFIG).write_text(generation_json)
        if len(shards) == 1:
            _io.write_safetensors(shards[0], folder / WEIGHTS)
            return
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _io.write_safetensors(shard, folder / name)
            for key, value in shard.items():
                weight_map[key] = name
                total += value.numel() * value.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    return _io.atomic_folder_save(path, write, superseded=lambda name: _WEIGHT_FILE.fullmatch(name) is not None)


save_quantized = save_pretrained
