# SPDX-License-Identifier: Apache-2.0
"""BottleneckAdapter: AdapterHub's sequential bottleneck adapter (Houlsby et al. 2019, Pfeiffer et al. 2020).

``h <- h + dropout(scaling * W_up act(W_down h))``, applied to a sublayer's output before the transformer adds its
residual. The sub-module names (``adapter_down``, ``adapter_up``) and the init schemes are AdapterHub's
(``adapters/methods/modeling.py``); :func:`fourbit.add_bottleneck_adapters` places them in a model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BottleneckAdapter"]

_NON_LINEARITIES = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
# "mam_adapter" first: the default must leave the model unchanged until the adapter trains.
_INITS = ("mam_adapter", "bert", "houlsby")


def bottleneck_size(hidden_size: int, reduction_factor: float) -> int:
    """AdapterHub's ``int(hidden_size // reduction_factor)``, at least 1."""
    return max(1, int(hidden_size // reduction_factor))


class AdapterProjection(nn.Module):
    """``x @ weight.T + bias`` with ``nn.Linear``'s parameter names and layout, deliberately not an ``nn.Linear``:
    :func:`fourbit.quantize_model` and ``add_lora(target_modules="all-linear")`` look for ``nn.Linear`` layers and
    must leave adapters alone."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BottleneckAdapter(nn.Module):
    """A sequential bottleneck adapter with its own residual: ``forward(h) = h + f(h)``.

    Args:
        hidden_size: the width of ``h`` (the model's hidden size).
        reduction_factor: the bottleneck is ``hidden_size // reduction_factor`` wide (> 0; below 1 it is wider than
            ``hidden_size``, as in AdapterHub).
        non_linearity: "relu", "gelu", "gelu_new" (tanh approximation), "swish" / "silu" or "tanh".
        init_weights: "mam_adapter" (default: down-projection kaiming-uniform with a = sqrt(5), biases and
            up-projection zero, so the adapter is exactly the identity until it trains), "bert" (weights N(0, 0.02), biases
            0: close to, not exactly, the identity) or "houlsby" (weights truncated N(0, 0.01) in [-0.02, 0.02],
            biases 0).
        dropout: dropout probability on the adapter's output (before the residual add).
        scaling: a constant factor on the adapter's output.
        dtype, device: of the adapter's parameters. ``h`` is cast to their dtype and the result back to ``h``'s, so
            float32 adapters (the default, as PEFT keeps adapters) train on a bf16 / fp16 / 4-bit model.
    """

    def __init__(
        self,
        hidden_size: int,
        reduction_factor: float = 16,
        non_linearity: str = "relu",
        init_weights: str = "mam_adapter",
        dropout: float = 0.0,
        scaling: float = 1.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if (isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float))
                or not math.isfinite(reduction_factor) or reduction_factor <= 0):  # fmt: skip
            raise ValueError(f"reduction_factor must be a positive number, got {reduction_factor!r}")
        if non_linearity not in _NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {sorted(_NON_LINEARITIES)}, got {non_linearity!r}")
        if init_weights not in _INITS:
            raise ValueError(f"init_weights must be one of {list(_INITS)}, got {init_weights!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"scaling must be a finite number, got {scaling!r}")
        self.hidden_size = hidden_size
        self.reduction_factor = reduction_factor
        self.bottleneck_size = bottleneck_size(hidden_size, reduction_factor)
        self.non_linearity_name = non_linearity
        self.init_weights = init_weights
        self.scaling = float(scaling)
        factory = dict(dtype=dtype if dtype is not None else torch.float32, device=device)
        self.adapter_down = AdapterProjection(hidden_size, self.bottleneck_size, **factory)
        self.non_linearity = _NON_LINEARITIES[non_linearity]()
        self.adapter_up = AdapterProjection(self.bottleneck_size, hidden_size, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        down, up = self.adapter_down, self.adapter_up
        if self.init_weights == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        elif self.init_weights == "bert":
            for layer in (down, up):
                nn.init.normal_(layer.weight, mean=0.0, std=0.02)
                nn.init.zeros_(layer.bias)
        else:  # houlsby
            for layer in (down, up):
                nn.init.trunc_normal_(layer.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(layer.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``f(h)`` in the adapter's dtype: what the adapter adds to ``h``."""
        x = h.to(self.adapter_down.weight.dtype)
        return self.dropout(self.adapter_up(self.non_linearity(self.adapter_down(x))) * self.scaling)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"BottleneckAdapter of hidden_size {self.hidden_size} got an input of shape {tuple(h.shape)}")
        return h + self.delta(h).to(h.dtype)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"non_linearity={self.non_linearity_name!r}, init_weights={self.init_weights!r}, scaling={self.scaling}")  # fmt: skip
