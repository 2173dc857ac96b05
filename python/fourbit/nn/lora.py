# SPDX-License-Identifier: Apache-2.0
"""LoRALinear: LoRA adapters over an ``nn.Linear``, a transformers ``Conv1D`` or a 4-bit ``Linear4bit`` (QLoRA).

The semantics and names are PEFT's (``peft/tuners/lora/layer.py``), so adapters move between the two: sub-modules
``base_layer``, ``lora_A[name]`` (``nn.Linear(in, r, bias=False)``), ``lora_B[name]`` (``nn.Linear(r, out,
bias=False)``), ``lora_dropout[name]``; ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA); several
named adapters, the active ones summed; merging into the base weight. Over a ``Linear4bit`` the forward and backward
run through fourbit's fused ``lora_linear`` op.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..functional import lora_linear_multi, matmul_4bit, quantize_4bit
from .linear4bit import Linear4bit

__all__ = ["LoRALinear"]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in_features, out_features]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _features(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, (nn.Linear, Linear4bit)):
        return base.in_features, base.out_features
    if _is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"base_layer must be nn.Linear, transformers' Conv1D or fourbit.nn.Linear4bit, got {type(base).__name__}")


class LoRALinear(nn.Module):
    """A base linear layer plus named LoRA adapters.

    Args:
        base_layer: ``nn.Linear``, transformers ``Conv1D`` (fan_in_fan_out) or ``fourbit.nn.Linear4bit`` (QLoRA).
        adapter_name: the first adapter's name.
        r: rank (> 0). lora_alpha: the scale numerator. lora_dropout: dropout on the LoRA input.
        use_rslora: ``scaling = lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        init_lora_weights: True (PEFT's default: A kaiming-uniform with a = sqrt(5), B = 0, so the adapter starts as
            a no-op), "gaussian" (A normal with std 1/r, B = 0) or False (A and B random, for tests).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = _features(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self._dora_norms: list[torch.Tensor | None] = []  # weight norms at each merge, for unmerge
        self.merged_adapters: list[str] = []
        self._merged_4bit: list[tuple] = []  # (packed weight, QuantState) before each merge into 4 bits
        self._disable_adapters = False
        self.active_adapters: list[str] = []
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                     use_dora=False):  # fmt: skip
        """Adds (or replaces) the adapter ``adapter_name``. With ``use_dora`` it is a DoRA adapter: a trainable
        magnitude per output row, initialised to the row norms of ``W + scaling * B @ A``."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        device = next((p.device for p in self.base_layer.parameters()), None)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        if use_dora:
            with torch.no_grad():
                norm = self._weight_norm(adapter_name)
            self.lora_magnitude_vector[adapter_name] = _Magnitude(norm)
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Makes these adapters the active ones (several are summed); their parameters train, the others do not."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.lora_A:
                raise ValueError(f"unknown adapter {name!r}; this layer has {list(self.lora_A)}")
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(name in names)
            self.lora_B[name].requires_grad_(name in names)
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].requires_grad_(name in names)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        if adapter_name not in self.lora_A:
            raise ValueError(f"unknown adapter {adapter_name!r}; this layer has {list(self.lora_A)}")
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            del table[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    @contextlib.contextmanager
    def disable_adapters(self):
        """Within this context the layer computes its base layer only. A merged layer is unmerged at its first
        forward inside the context (so the base weight is the original one) and stays unmerged afterwards."""
        previous = self._disable_adapters
        self._disable_adapters = True
        try:
            yield self
        finally:
            self._disable_adapters = previous

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        if self.merged:
            return self.base_layer(x)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if isinstance(self.base_layer, Linear4bit) and len(active) == 1 and active[0] not in self.lora_magnitude_vector:
            return self._qlora_forward(x, active[0])
        result = self.base_layer(x)
        for name in active:
            if name in self.lora_magnitude_vector:
                result = result + self._dora_term(x, name).to(result.dtype)
            else:
                result = result + self._lora_term(x, name).to(result.dtype)
        return result

    def _dora_term(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """DoRA (PEFT's formulation): y = base(x) + (mag - 1) * W x_d + mag * scaling * B A x_d, with
        mag = magnitude / ||W + scaling * B @ A|| (the norm detached, per output row) and x_d the LoRA input."""
        A, B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        xa = dropout(x.to(A.weight.dtype))
        with torch.no_grad():
            norm = self._weight_norm(name)
        mag = self.lora_magnitude_vector[name].weight / norm
        base_out = self._base_without_bias(xa)
        return (mag - 1) * base_out + mag * (B(A(xa)) * self.scaling[name])

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            dtype = base.compute_dtype or x.dtype
            return matmul_4bit(x.to(dtype), base.weight, base.quant_state).to(x.dtype)
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        return nn.functional.linear(x, weight.to(x.dtype))

    def _weight_norm(self, name: str) -> torch.Tensor:
        """Row norms of W + scaling * B @ A (float32 [out_features]); a 4-bit W is dequantized tile by tile."""
        delta = self.delta_weight(name)
        if self.fan_in_fan_out:
            delta = delta.t()
        base = self.base_layer
        if not isinstance(base, Linear4bit):
            weight = base.weight.detach().float()
            weight = weight.t() if self.fan_in_fan_out else weight
            return (weight + delta.to(weight.device)).norm(dim=1)
        norms = []
        for row0, tile in _dequantized_row_tiles(base):
            norms.append((tile + delta[row0 : row0 + tile.shape[0]].to(tile.device)).norm(dim=1))
        return torch.cat(norms)

    def _lora_term(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]

    def _qlora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        dtype, out_dtype, autocast = base.dtypes_for(x)
        xc = x if x.dtype == dtype else x.to(dtype)
        dropout = self.lora_dropout[name]
        lora_x = dropout(xc) if self.training and isinstance(dropout, nn.Dropout) else None
        bias = base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset, nested_blocksize = base.op_args()
        # Inside autocast the op runs with autocast off (it casts x itself; float32 adapters stay float32, as PEFT
        # keeps them, and the packed data and scales are never cast).
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            y = torch.ops.fourbit.lora_linear(
                xc, packed, absmax, blocksize, quant_type, shape, self.lora_A[name].weight, self.lora_B[name].weight,
                float(self.scaling[name]), bias, lora_x, nested_absmax, nested_code, offset, nested_blocksize,
            )  # fmt: skip
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Row i of the batch uses adapter ``adapter_names[i]`` ("__base__": none), as PEFT's ``adapter_names``."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows")
        if self.merged:
            raise ValueError("cannot select adapters per row while adapters are merged; unmerge() first")
        unknown = sorted({a for a in adapter_names if a != "__base__" and a not in self.lora_A})
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this layer has {list(self.lora_A)}")
        base = self.base_layer
        dropouts_off = all(not isinstance(self.lora_dropout[a], nn.Dropout) or not self.training
                           for a in adapter_names if a != "__base__")  # fmt: skip
        if isinstance(base, Linear4bit) and dropouts_off:
            return self._multi_adapter_qlora(x, adapter_names)
        result = base(x)
        for name in dict.fromkeys(adapter_names):
            if name == "__base__":
                continue
            rows = [i for i, a in enumerate(adapter_names) if a == name]
            result[rows] = result[rows] + self._lora_term(x[rows], name).to(result.dtype)
        return result

    def _multi_adapter_qlora(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """The per-row adapters in one pass over the 4-bit weight (fourbit.lora_linear_multi): the adapters used are
        stacked, lower ranks padded with zeros."""
        used = [a for a in dict.fromkeys(adapter_names) if a != "__base__"]
        base = self.base_layer
        dtype = base.compute_dtype or x.dtype
        if not used:
            return base(x)
        rank = max(self.r[a] for a in used)
        adapter_dtype = self.lora_A[used[0]].weight.dtype
        A = x.new_zeros((len(used), rank, self.in_features), dtype=adapter_dtype)
        B = x.new_zeros((len(used), self.out_features, rank), dtype=adapter_dtype)
        for j, name in enumerate(used):
            A[j, : self.r[name]] = self.lora_A[name].weight
            B[j, :, : self.r[name]] = self.lora_B[name].weight
        scaling = torch.tensor([self.scaling[a] for a in used], device=x.device)
        position = {name: j for j, name in enumerate(used)}
        index = torch.tensor([position.get(a, -1) for a in adapter_names], device=x.device)
        bias = base.bias.to(dtype) if base.bias is not None else None
        y = lora_linear_multi(x.to(dtype), base.weight, base.quant_state, A, B, scaling, index, bias)
        return y.to(x.dtype)

    # ------------------------------------------------------------------ merging
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout ([in, out] for Conv1D), float32."""
        delta = (self.lora_B[adapter_name].weight.float() @ self.lora_A[adapter_name].weight.float())
        delta = delta * self.scaling[adapter_name]
        return delta.t() if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Adds the adapters to the base weight. Into a Linear4bit this dequantizes, adds and requantizes (lossy: a
        warning says so); the original packed bytes are kept so that unmerge() restores them exactly."""
        names = [a for a in (adapter_names or self.active_adapters) if a not in self.merged_adapters]
        if not names:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        base = self.base_layer
        for name in names:
            delta = self.delta_weight(name)
            norm = None
            if name in self.lora_magnitude_vector:
                # DoRA: W' = magnitude / ||W + dW|| * (W + dW), per output row.
                norm = self._weight_norm(name).detach()
                scale = (self.lora_magnitude_vector[name].weight.detach().float() / norm).unsqueeze(1)
                dense = base.dequantize(torch.float32) if isinstance(base, Linear4bit) else self._dense_weight()
                merged_rows = scale * (dense + (delta.t() if self.fan_in_fan_out else delta).to(dense.device))
                delta = (merged_rows - dense)
                delta = delta.t() if self.fan_in_fan_out else delta
            self._dora_norms.append(norm)
            if isinstance(base, Linear4bit):
                warnings.warn(
                    "Merging LoRA into a 4-bit weight requantizes it: outputs change by the NF4/FP4 rounding. "
                    "merged_weight() gives the merged weight without that loss.", stacklevel=2,
                )  # fmt: skip
                merged = base.dequantize(torch.float32) + delta.to(base.weight.device)
                _check_finite(merged, name, safe_merge)
                self._merged_4bit.append((base.weight.data, base.quant_state))
                state = base.quant_state
                packed, new_state = quantize_4bit(merged.to(state.dtype), state.blocksize, state.quant_type,
                                                  state.nested, base.weight.dtype)  # fmt: skip
                base._store(packed, new_state)
            else:
                weight = base.weight
                merged = weight.data.float() + delta.to(weight.device)
                _check_finite(merged, name, safe_merge)
                weight.data.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undoes merge(), last merged first. A Linear4bit gets its original packed bytes back exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            norm = self._dora_norms.pop()
            if isinstance(base, Linear4bit):
                base._store(*self._merged_4bit.pop())
            elif norm is None:
                weight = base.weight
                weight.data.copy_((weight.data.float() - self.delta_weight(name).to(weight.device)).to(weight.dtype))
            else:  # DoRA: W = W' / (magnitude / norm) - dW, with the norm from the merge
                scale = (self.lora_magnitude_vector[name].weight.detach().float() / norm).unsqueeze(1)
                delta = self.delta_weight(name)
                dense = self._dense_weight() / scale - (delta.t() if self.fan_in_fan_out else delta)
                weight = base.weight
                weight.data.copy_((dense.t() if self.fan_in_fan_out else dense).to(weight.dtype))

    def _dense_weight(self) -> torch.Tensor:
        """The (non-4-bit) base weight as float32 [out, in]."""
        weight = self.base_layer.weight.detach().float()
        return weight.t() if self.fan_in_fan_out else weight

    def merged_weight(self, dtype: torch.dtype = torch.bfloat16, adapter_names: list[str] | None = None):
        """The base weight with the adapters added, as a dense tensor ([out, in]), without requantizing."""
        base = self.base_layer
        if self.merged:
            raise ValueError("merged_weight() needs the unmerged layer; unmerge() first")
        if isinstance(base, Linear4bit):
            weight = base.dequantize(torch.float32)
        else:
            weight = base.weight.detach().float()
            weight = weight.t() if self.fan_in_fan_out else weight
        for name in adapter_names or self.active_adapters:
            delta = self.delta_weight(name)
            delta = (delta.t() if self.fan_in_fan_out else delta).to(weight.device)
            if name in self.lora_magnitude_vector:
                norm = (weight + delta).norm(dim=1, keepdim=True)
                weight = self.lora_magnitude_vector[name].weight.detach().float().unsqueeze(1) / norm * (weight + delta)
            else:
                weight = weight + delta
        return weight.to(dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}(r={self.r[a]}, scaling={self.scaling[a]:g})" for a in self.lora_A)
        return f"adapters: {adapters}; active: {self.active_adapters}; merged: {self.merged_adapters}"


class _Magnitude(nn.Module):
    """DoRA's magnitude vector, a module holding one ``weight`` as in PEFT (key ``lora_magnitude_vector.<name>.weight``)."""

    def __init__(self, norm: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.clone())


def _dequantized_row_tiles(layer: Linear4bit, max_elements: int = 1 << 20):
    """Yields (first_row, float32 tile) over a Linear4bit's weight, a tile of rows at a time (block aligned)."""
    state = layer.quant_state
    n, k = layer.out_features, layer.in_features
    align = state.blocksize // math.gcd(k, state.blocksize)
    rows = max(align, (max_elements // k) // align * align)
    scales = state.absmax
    if state.nested:
        scales = torch.ops.fourbit.dequantize_absmax(state.absmax, state.state2.absmax, state.state2.code,
                                                     state.offset, state.state2.blocksize)  # fmt: skip
    data = layer.weight.reshape(-1).view(torch.uint8)
    for row0 in range(0, n, rows):
        count = min(rows, n - row0) * k
        first = row0 * k
        tile = torch.empty(count // k, k, device=data.device)
        torch.ops.fourbit.dequantize_4bit_into(
            data[first // 2 : first // 2 + (count + 1) // 2],
            scales[first // state.blocksize : first // state.blocksize + -(-count // state.blocksize)],
            state.blocksize, state.quant_type, [count // k, k], tile,
        )  # fmt: skip
        yield row0, tile


def _check_finite(weight: torch.Tensor, name: str, safe_merge: bool) -> None:
    if safe_merge and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
