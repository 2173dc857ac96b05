# SPDX-License-Identifier: Apache-2.0
"""QLoRA under ``torch.distributed``: FSDP2 sharding of 4-bit models, and saving from a distributed run.

DDP needs nothing from fourbit: ``DistributedDataParallel(model)`` on a ``quantize_model`` + ``add_lora`` model
synchronizes only the parameters that require grad, i.e. the adapters (the packed weights and scales are frozen).

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters only, along dim 0, and its
``MixedPrecisionPolicy`` casts every floating-point parameter of a group to ``param_dtype``. :func:`shard_model`
arranges the groups so that:

- with a casting policy, each quantized unit (a :class:`~fourbit.nn.LoRALinear` over a
  :class:`~fourbit.nn.Linear4bit`, or a bare ``Linear4bit``) is its own FSDP group (without one, it shares its
  decoder block's group), holding the packed weight and the per-block scales, which are turned into
  frozen Parameters (:meth:`Linear4bit.scales_as_parameters`) so that they are sharded too. Each rank stores about
  1/world of them, and the all-gather before compute moves the packed bytes (4 bits per weight) and the scales in
  their own dtypes, never a dequantized copy.
- those groups get a policy with ``param_dtype=None``: mixed precision never casts the packed data or the scales
  (a cast would turn the fp32 absmax into bf16, changing every weight, and convert a ``quant_storage`` view of
  another float dtype, destroying its bit patterns). The
  adapters of the unit run in their own dtype, as PEFT keeps them (fp32 adapters with bf16 activations); gradient
  reduction follows ``mp_policy.reduce_dtype``.
- the rest of each decoder block, and the root (embeddings, norms, ``lm_head``), get ``mp_policy`` as given.

The unit is the ``LoRALinear``, not the inner ``Linear4bit``, because the fused QLoRA forward reads the base layer's
tensors directly (one op for base + adapter) instead of calling the base module, whose FSDP hooks would then never
run.

Saving: :func:`save_adapter_distributed` gathers the (sharded) adapter and writes it once, in PEFT's format;
:func:`save_quantized_checkpoint` gathers the full model state dict (bitsandbytes' keys for the 4-bit layers) and
writes one safetensors file; :func:`save_checkpoint_dcp` / :func:`load_checkpoint_dcp` write and read a sharded
``torch.distributed.checkpoint`` (each rank writes its own shards; loading is in place). ``Linear4bit`` also lets
DCP's own ``get_model_state_dict`` / ``set_model_state_dict`` resolve bitsandbytes' keys.

Everything here is device-agnostic: the same code runs on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import _io
from .nn.linear4bit import Linear4bit
from .nn.lora import LoRALinear

__all__ = [
    "shard_model", "quantized_units", "set_quant_storage", "sharded_bytes", "gather_full_state_dict",
    "save_adapter_distributed", "save_quantized_checkpoint", "load_quantized_checkpoint",
    "save_checkpoint_dcp", "load_checkpoint_dcp",
]  # fmt: skip

CHECKPOINT_WEIGHTS = "model.safetensors"


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DistributedDataParallel wrapper (FSDP2 does not wrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank: all-gathers a sharded DTensor (a collective), returns other tensors as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------------- sharding
def quantized_units(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that hold 4-bit weights, by path: each ``LoRALinear`` over a ``Linear4bit`` and each
    ``Linear4bit`` not inside one. These are the FSDP groups that :func:`shard_model` exempts from mixed precision."""
    units = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and isinstance(module.base_layer, Linear4bit):
            units[name] = module
        elif isinstance(module, Linear4bit):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if not (name.split(".")[-1] == "base_layer" and parent in units):
                units[name] = module
    return units


def _decoder_blocks(model: nn.Module, block_classes: Iterable[type] | None) -> list[nn.Module]:
    """The repeated blocks of the model: instances of ``block_classes``, else of the classes transformers lists in
    ``_no_split_modules``, else the children of every ``nn.ModuleList``."""
    if block_classes is not None:
        classes = tuple(block_classes)
        return [m for m in model.modules() if isinstance(m, classes)]
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]


def _quant_policy(mp_policy):
    _, MixedPrecisionPolicy, _ = _fsdp()
    if mp_policy is None:
        return MixedPrecisionPolicy()
    # param_dtype None: no parameter of the group is cast (packed data, scales, adapters keep their dtypes);
    # output_dtype left None so the block's own policy decides what its outputs are.
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=mp_policy.reduce_dtype)


def set_quant_storage(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Re-views every ``Linear4bit``'s packed weight as ``dtype`` (the same bytes, padded with zero bytes to a whole
    number of elements, like ``quantize_4bit(quant_storage=dtype)``), in place, and returns the model.

    For wrappers that only handle floating-point parameters or want one dtype per group (FSDP1 flat parameters,
    DeepSpeed): the packed data is then a bf16/fp16/fp32 tensor whose bits are the 4-bit codes. fourbit's ops and
    ``state_dict`` read it as bytes, so nothing else changes; :func:`shard_model` never casts it."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    for module in model.modules():
        if not isinstance(module, Linear4bit) or module.weight.dtype == dtype:
            continue
        raw = module.weight.detach().reshape(-1).view(torch.uint8)
        nbytes = (module.in_features * module.out_features + 1) // 2
        raw = raw[:nbytes]
        pad = (-nbytes) % dtype.itemsize
        if pad:
            raw = torch.cat([raw, raw.new_zeros(pad)])
        module.weight = nn.Parameter(raw.view(dtype).reshape(-1, 1), requires_grad=False)
        module.quant_storage = dtype
    return model


def shard_model(
    model: nn.Module,
    mesh=None,
    mp_policy=None,
    reshard_after_forward: bool = True,
    offload_policy=None,
    block_classes: Iterable[type] | None = None,
) -> nn.Module:
    """Applies FSDP2 ``fully_shard`` to a 4-bit (QLoRA) model, in place, and returns it.

    Groups, innermost first: when ``mp_policy`` casts parameters (``param_dtype`` set), every quantized unit (see
    :func:`quantized_units`) with a policy that casts nothing; then every decoder block (see ``block_classes``) and
    the root with ``mp_policy``. Without casting, the quantized units share their block's group (fewer
    collectives). In every case the scales become frozen Parameters, sharded with the packed weight. Each rank then
    stores about 1/world of the packed weights, scales and adapters; the packed bytes are all-gathered as they are
    before each group's forward and backward.

    Args:
        model: a model after ``quantize_model`` (and usually ``add_lora``), on the mesh's device.
        mesh: a 1-D ``DeviceMesh`` (None: FSDP2's default over the whole world on the current device type).
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` for the non-quantized parameters; never applied to packed data
            or scales (see the module docstring).
        reshard_after_forward: passed to ``fully_shard`` for every group but the root.
        offload_policy: an FSDP2 ``OffloadPolicy`` (e.g. ``CPUOffloadPolicy()``), or None.
        block_classes: the classes of the repeated blocks (default: transformers' ``_no_split_modules``, else the
            children of every ``nn.ModuleList``).
    """
    FSDPModule, MixedPrecisionPolicy, fully_shard = _fsdp()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError("model is already sharded (it is an FSDPModule)")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, got {mp_policy!r}")
    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
        raise ValueError("model has merged LoRA adapters; unmerge_lora(model) before sharding")
    kwargs = {"mesh": mesh}
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    units = quantized_units(model)
    if not units:
        raise ValueError("model has no Linear4bit layers: quantize_model(model) before shard_model")
    # Own groups for the quantized units only when the policy casts parameters: otherwise they share their block's
    # group, which needs fewer (and larger) collectives.
    separate = mp_policy is not None and mp_policy.param_dtype is not None
    for unit in units.values():
        base = unit.base_layer if isinstance(unit, LoRALinear) else unit
        base.scales_as_parameters()
        if separate:
            fully_shard(unit, mp_policy=_quant_policy(mp_policy), reshard_after_forward=reshard_after_forward, **kwargs)
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    unit_ids = {id(u) for u in units.values()} if separate else set()
    for block in _decoder_blocks(model, block_classes):
        if block is not model and id(block) not in unit_ids:
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, mp_policy=policy, **kwargs)
    return model


def sharded_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the 4-bit tensors this rank stores: ``{"packed": ..., "scales": ..., "adapters": ...}`` (local
    shards of sharded parameters, whole tensors otherwise). What a per-rank memory report counts."""
    from torch.distributed.tensor import DTensor

    def local(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    out = {"packed": 0, "scales": 0, "adapters": 0}
    seen = set()
    for module in _unwrap(model).modules():
        if isinstance(module, Linear4bit):
            out["packed"] += local(module.weight)
            for name in ("weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map",
                         "weight_offset"):  # fmt: skip
                t = getattr(module, name)
                out["scales"] += local(t) if t is not None else 0
        elif isinstance(module, LoRALinear):
            adapters = (module.lora_A, module.lora_B, module.lora_magnitude_vector)
            for p in (p for m in adapters for p in m.parameters()):
                if id(p) not in seen:
                    seen.add(id(p))
                    out["adapters"] += local(p)
    return out


# ------------------------------------------------------------------------------------------------------ saving
def gather_full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's full state dict (bitsandbytes' keys for the 4-bit layers), on the CPU, gathered from the shards.

    A collective: every rank must call it. With ``rank0_only`` the other ranks get an empty dict (they still take
    part in the gathers). Works on FSDP2-sharded, DDP-wrapped and plain models."""
    state = _unwrap(model).state_dict()
    out = {}
    keep = not rank0_only or _rank() == 0
    for key, value in state.items():  # the same order on every rank, so the gathers pair up
        full = _full(value)
        if keep:
            out[key] = full.detach().cpu()
    return out


def save_adapter_distributed(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """``fourbit.save_adapter`` from a distributed run: gathers the adapter's shards (FSDP2) or takes rank 0's copy
    (DDP), writes the PEFT-format folder once (rank 0, atomically), then waits at a barrier so every rank returns
    after the folder is complete. A collective: every rank must call it. The folder loads in a single process with
    ``fourbit.load_adapter`` or PEFT."""
    from .model import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, _adapter_tensors, _config_for_file, _json_default,
                        _require_adapter)  # fmt: skip

    import json

    model = _unwrap(model)
    _require_adapter(model, [adapter_name])
    tensors = {k: _full(v.detach()).cpu() for k, v in _adapter_tensors(model, adapter_name).items()}
    path = Path(path)
    if _rank() == 0:
        config = _config_for_file(model, adapter_name)

        def write(folder: Path) -> None:
            (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default))
            _io.write_safetensors(tensors, folder / ADAPTER_WEIGHTS)

        _io.atomic_folder_save(path, write)
    _barrier()
    return path


def save_quantized_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Gathers the full model (4-bit layers under bitsandbytes' keys, adapters included) and writes it once, as
    ``<path>/model.safetensors`` (rank 0, atomically; the others wait at a barrier). A collective. Load it in a single
    process with :func:`load_quantized_checkpoint` into a model prepared the same way (``quantize_model`` and, if
    it had them, the same adapters)."""
    state = gather_full_state_dict(model, rank0_only=True)
    path = Path(path)
    if _rank() == 0:
        _io.atomic_folder_save(path, lambda folder: _io.write_safetensors(state, folder / CHECKPOINT_WEIGHTS))
    _barrier()
    return path


def load_quantized_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Loads a folder written by :func:`save_quantized_checkpoint` (safetensors only, every quantization state
    validated by ``Linear4bit.load_state_dict``) into an unsharded model, and returns it. To continue a sharded run,
    load before :func:`shard_model`, or use :func:`load_checkpoint_dcp`."""
    folder = _io.resolve_folder(path, CHECKPOINT_WEIGHTS)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.load_state_dict(_io.read_safetensors(folder / CHECKPOINT_WEIGHTS, device), strict=strict)
    return model


def _dcp_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # The registered tensors by module name (weight, weight_absmax, weight_offset, ..., lora_A...): what DCP can
    # load in place. bitsandbytes' keys are derived views (a JSON blob whose length varies) and cannot be.
    model = _unwrap(model)
    state = dict(model.named_parameters())
    state.update((n, b) for n, b in model.named_buffers() if b is not None)
    return state


def save_checkpoint_dcp(
    model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Writes a ``torch.distributed.checkpoint`` of the model's registered tensors (packed weights, scales,
    adapters, everything else), each rank writing its own shards, plus the optimizer's state if given. A collective.
    """
    import torch.distributed.checkpoint as dcp

    state = {"model": _dcp_state(model)}
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state["optim"] = get_optimizer_state_dict(_unwrap(model), optimizer)
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint_dcp(
    model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """Reads a checkpoint written by :func:`save_checkpoint_dcp` into ``model`` (and ``optimizer``) in place; the
    model must be quantized and adapted the same way as the saved one (its tensors have the saved shapes).
    A collective; returns the model."""
    import torch.distributed.checkpoint as dcp

    state = {"model": _dcp_state(model)}
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state["optim"] = get_optimizer_state_dict(_unwrap(model), optimizer)
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(_unwrap(model), optimizer, state["optim"])
    return model
