# SPDX-License-Identifier: Apache-2.0
"""Linear4bit: an ``nn.Linear`` whose weight is stored in 4 bits (NF4/FP4), bitsandbytes-compatible on disk."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..functional import dequantize_4bit, quantize_4bit
from ..quant_state import QuantState, quant_map

__all__ = ["Linear4bit"]

# Registered tensors holding the quantization, next to the packed `weight` parameter. Their values must never be
# cast by .to(dtype) / .half() / autocast; only moved between devices.
_SCALE_BUFFERS = ("weight_absmax", "weight_quant_map", "weight_nested_absmax", "weight_nested_quant_map", "weight_offset")


class Linear4bit(nn.Module):
    """``y = x @ W.T + bias`` with W stored blockwise in 4 bits.

    Registered tensors (what FSDP2 shards and ``named_parameters`` / ``named_buffers`` show): ``weight`` (the packed
    codes, a Parameter with ``requires_grad=False``, ``[(out * in + 1) // 2, 1]`` uint8 or the ``quant_storage`` view)
    and the buffers ``weight_absmax``, ``weight_quant_map`` and, with double quantization, ``weight_nested_absmax``,
    ``weight_nested_quant_map`` and ``weight_offset``. ``forward`` reads them each call (no cached state), so a
    wrapper may swap them.

    ``state_dict()`` uses bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``) and
    ``load_state_dict`` accepts what bitsandbytes' ``Linear4bit`` writes (validated before use).

    ``compute_dtype``: the dtype the matmul runs in (None: the input's dtype); the output has the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        quant_storage: torch.dtype = torch.uint8,
        blocksize: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features} and {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage
        # `weight`: the dense [out_features, in_features] weight to quantize. Without one, the quantization of zeros
        # holds the place until load_state_dict fills it.
        if weight is None:
            weight = torch.zeros(out_features, in_features, device=device, dtype=dtype)
        self._store(*quantize_4bit(weight.detach(), blocksize, quant_type, compress_statistics, quant_storage))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    # ------------------------------------------------------------------ the quantized weight
    def _store(self, packed: torch.Tensor, state: QuantState) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(state.shape)} does not match this layer's "
                f"({self.out_features}, {self.in_features})"
            )
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype  # the dtype the weight had before quantization
        self._set_quant_tensor("weight_absmax", state.absmax)
        self.register_buffer("weight_quant_map", state.code)
        nested = state.nested
        self._set_quant_tensor("weight_nested_absmax", state.state2.absmax if nested else None)
        self.register_buffer("weight_nested_quant_map", state.state2.code if nested else None)
        self.register_buffer("weight_offset", state.offset if nested else None)
        self.nested_blocksize = state.state2.blocksize if nested else None

    def _set_quant_tensor(self, name: str, tensor: torch.Tensor | None) -> None:
        # A scale keeps the kind it is registered as (buffer, or frozen Parameter after scales_as_parameters()).
        if name in self._parameters:
            self._parameters[name] = None if tensor is None else nn.Parameter(tensor, requires_grad=False)
        else:
            self.register_buffer(name, tensor)

    def scales_as_parameters(self) -> Linear4bit:
        """Re-registers the per-block scales (``weight_absmax`` and ``weight_nested_absmax``) as Parameters with
        ``requires_grad=False`` instead of buffers, and returns the layer.

        Why: FSDP2 (``fully_shard``) shards parameters only; buffers stay whole on every rank. The absmax is 1/8 of
        the packed bytes without double quantization, so it is sharded with the packed weight (see
        ``fourbit.distributed.shard_model``). The tiny constants (``weight_quant_map``, ``weight_nested_quant_map``,
        the 0-dim ``weight_offset``) stay buffers. Names, forward and ``state_dict`` keys are unchanged."""
        for name in ("weight_absmax", "weight_nested_absmax"):
            if name in self._buffers:
                tensor = self._buffers.pop(name)
                self._parameters[name] = None if tensor is None else nn.Parameter(tensor, requires_grad=False)
        return self

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint (get_model_state_dict, used by FSDP2 / accelerate saves) resolves each
        # state-dict key by getattr along its dots; bitsandbytes' keys (weight.absmax, ...) are not attributes of
        # the weight tensor, so the walk through "weight" is redirected to an object that has them.
        return {"weight": "_state_dict_key_view"}

    @property
    def _state_dict_key_view(self) -> _StateDictKeyView:
        return _StateDictKeyView(self)

    @property
    def quant_state(self) -> QuantState:
        """The QuantState of the current tensors (built on each access, never cached)."""
        state2 = None
        if self.weight_nested_absmax is not None:
            state2 = QuantState(
                self.weight_nested_absmax, code=self.weight_nested_quant_map, blocksize=self.nested_blocksize,
                dtype=torch.float32, validate=False,
            )  # fmt: skip
        return QuantState(
            self.weight_absmax, (self.out_features, self.in_features), self.weight_quant_map, self.blocksize,
            self.quant_type, self.weight_dtype, self.weight_offset, state2, validate=False,
        )  # fmt: skip

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> Linear4bit:
        """Quantizes ``linear``'s weight (on its device); the bias is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                    compress_statistics=compress_statistics, quant_type=quant_type, quant_storage=quant_storage,
                    blocksize=blocksize, weight=linear.weight)  # fmt: skip
        layer.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor (``dtype`` or the dtype it had before quantization)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def op_args(self) -> tuple:
        """The weight as fourbit's ops take it, read from the registered tensors now: ``(packed, absmax, blocksize,
        quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize)``. Forward passes use this instead
        of ``quant_state`` (no Python objects built per call: at decode sizes that overhead is the layer's cost)."""
        # The registered tensors straight from the module's tables (nn.Module.__getattr__ per name is a measurable
        # part of a decode step); the scales are buffers, or parameters after scales_as_parameters().
        params, buffers = self._parameters, self._buffers
        absmax = buffers["weight_absmax"] if "weight_absmax" in buffers else params["weight_absmax"]
        nested = buffers["weight_nested_absmax"] if "weight_nested_absmax" in buffers else params["weight_nested_absmax"]
        if nested is None:
            return (params["weight"], absmax, self.blocksize, self.quant_type, [self.out_features, self.in_features],
                    None, None, None, 256)  # fmt: skip
        return (params["weight"], absmax, self.blocksize, self.quant_type, [self.out_features, self.in_features],
                nested, buffers["weight_nested_quant_map"], buffers["weight_offset"], self.nested_blocksize)  # fmt: skip

    def dtypes_for(self, x: torch.Tensor) -> tuple[torch.dtype, torch.dtype, bool]:
        """(compute dtype, output dtype, autocast on) for input ``x``: ``compute_dtype`` if set, else autocast's
        dtype inside an autocast region (whose output dtype the layer then returns, like ``nn.Linear``), else x's."""
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:
            dtype = torch.get_autocast_dtype(x.device.type)
            return self.compute_dtype or dtype, dtype, True
        return self.compute_dtype or x.dtype, x.dtype, False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, out_dtype, autocast = self.dtypes_for(x)
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize = self.op_args()
        # Inside autocast the op runs with autocast off: the operands are cast here, never the packed data or scales.
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            y = torch.ops.fourbit.matmul_4bit(x if x.dtype == dtype else x.to(dtype), packed, absmax, blocksize,
                                              quant_type, shape, bias, nested_absmax, nested_code, offset,
                                              nested_blocksize)  # fmt: skip
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def extra_repr(self) -> str:
        nested = ", double quantized" if self.weight_nested_absmax is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}{nested}, compute_dtype={self.compute_dtype}"
        )

    # ------------------------------------------------------------------ devices and dtypes
    def _apply(self, fn, recurse=True):
        # .to(dtype), .half(), .float() must move the quantization tensors but never change their dtype: hand them
        # to `fn` as integer views of the same bits (which dtype casts skip), then view them back.
        saved = {}
        for name in ("weight", *_SCALE_BUFFERS):
            t = getattr(self, name)
            if t is not None and t.is_floating_point():
                saved[name] = t.dtype
                view = t.data.view(_int_type(t.dtype))
                if name == "weight" or name in self._parameters:
                    self._parameters[name] = nn.Parameter(view, requires_grad=False)
                else:
                    self._buffers[name] = view
        super()._apply(fn, recurse)
        for name, dtype in saved.items():
            t = getattr(self, name)
            if name == "weight" or name in self._parameters:
                self._parameters[name] = nn.Parameter(t.data.view(dtype), requires_grad=False)
            else:
                self._buffers[name] = t.view(dtype)
        return self

    # ------------------------------------------------------------------ bitsandbytes-compatible state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "weight"] = weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        weight_key = prefix + "weight"
        quant_keys = {k: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
        elif not isinstance(state_dict[weight_key], torch.Tensor):
            error_msgs.append(f"{weight_key}: must be a tensor, got {type(state_dict[weight_key]).__name__}")
        elif not quant_keys:
            error_msgs.append(f"{weight_key}: no quantization state (keys {weight_key}.absmax, ...) in the state dict")
        else:
            try:
                device = self.weight.device
                state = QuantState.from_dict(
                    {k[len(weight_key) + 1 :]: v for k, v in quant_keys.items()}, device=device
                )
                packed = state_dict[weight_key].to(device)
                needed = (math.prod(state.shape) + 1) // 2
                if packed.numel() * packed.element_size() < needed:
                    raise ValueError(f"{weight_key} holds {packed.numel() * packed.element_size()} bytes, the "
                                     f"quantization state needs {needed}")  # fmt: skip
                self._store(packed, state)
                self.quant_storage = packed.dtype
            except (ValueError, TypeError) as e:
                error_msgs.append(f"{weight_key}: {e}")
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                bias = state_dict[bias_key]
                if not isinstance(bias, torch.Tensor):
                    error_msgs.append(f"{bias_key}: must be a tensor, got {type(bias).__name__}")
                elif bias.shape != self.bias.shape:
                    error_msgs.append(f"{bias_key}: shape {tuple(bias.shape)}, expected {tuple(self.bias.shape)}")
                else:
                    with torch.no_grad():
                        self.bias.copy_(bias)
            else:
                missing_keys.append(bias_key)
        if strict:
            known = {weight_key, bias_key, *quant_keys}
            for key in state_dict:
                if key.startswith(prefix) and key not in known and "." not in key[len(prefix) :]:
                    unexpected_keys.append(key)


class _StateDictKeyView:
    """``weight``, ``weight.absmax``, ... ``weight.quant_state.bitsandbytes__<type>`` as attributes of one object:
    what torch.distributed.checkpoint's key resolution walks for a Linear4bit (see ``Linear4bit._fqn_modifiers``)."""

    def __init__(self, layer: Linear4bit) -> None:
        self.weight = self
        self.absmax = layer.weight_absmax
        self.quant_map = layer.weight_quant_map
        self.nested_absmax = layer.weight_nested_absmax
        self.nested_quant_map = layer.weight_nested_quant_map
        self.quant_state = self

    def __getattr__(self, name: str):
        if name.startswith("bitsandbytes__"):
            return self
        raise AttributeError(name)


def _int_type(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
