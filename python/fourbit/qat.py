# SPDX-License-Identifier: Apache-2.0
"""Quantization-aware training: train with fake-quantized weights (and optionally activations), then convert to the
real low-bit layers with the same outputs.

Workflow::

    config = fourbit.qat.QATConfig(weight=fourbit.qat.IntWeightConfig(bits=4, group_size=32))
    model = fourbit.qat.prepare_qat(model, config)      # nn.Linear -> FakeQuantLinear (in place)
    ...train...
    model = fourbit.qat.convert_qat(model)              # FakeQuantLinear -> LinearInt / Linear4bit (in place)

Weight configs: :class:`IntWeightConfig` (int4 / int8 per group, symmetric or asymmetric, scales recomputed from the
weight every step or learned with LSQ) converts to :class:`fourbit.nn.LinearInt`; :class:`FourBitWeightConfig`
(NF4 / FP4 blockwise, with or without double quantization) converts to :class:`fourbit.nn.Linear4bit`. The fake
quantizer uses the same grid and rounding as the converted layer, so the converted weights equal the fake-quantized
ones bit for bit (and the outputs agree up to the matmul's summation order).

Activation config: :class:`Int8ActivationConfig` (int8 per-token dynamic); the converted layer keeps the same
activation fake quantization (a forward pre-hook), so outputs still match.

LoRA: a :class:`fourbit.nn.LoRALinear` over an ``nn.Linear`` becomes a :class:`FakeQuantLoRALinear`, which
fake-quantizes the *merged* weight ``W + scaling * B @ A`` while only the adapters train; ``convert_qat`` merges and
quantizes, so the merged low-bit model is exactly the model that was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .functional import fake_quantize, fake_quantize_4bit
from .nn.linear4bit import Linear4bit
from .nn.linear_int import LinearInt, int_qparams

__all__ = [
    "IntWeightConfig",
    "FourBitWeightConfig",
    "Int8ActivationConfig",
    "QATConfig",
    "FakeQuantLinear",
    "FakeQuantLoRALinear",
    "prepare_qat",
    "convert_qat",
]


# ---------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class IntWeightConfig:
    """Integer weight fake quantization per group of ``group_size`` input features.

    bits: 4 or 8. symmetric: levels ``[-2^(b-1), 2^(b-1) - 1]`` with zero point 0 and ``scale = max|w| / (levels /
    2)``; otherwise levels ``[0, 2^b - 1]`` with a zero point (see :func:`fourbit.nn.linear_int.int_qparams`).
    range_learning: the scales (and asymmetric zero points) become parameters initialised from the weight and
    trained with LSQ gradients (``grad_factor = 1 / sqrt(weight.numel() * quant_max)``); otherwise they are recomputed
    from the current weight on every forward, without gradient.
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    range_learning: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or (self.bits == 4 and self.group_size % 2):
            raise ValueError(f"group_size must be a positive integer (even for int4), got {self.group_size!r}")

    @property
    def quant_range(self) -> tuple[int, int]:
        if self.symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def check_layer(self, in_features: int, name: str) -> None:
        if in_features % self.group_size:
            raise ValueError(f"{name}: group_size {self.group_size} does not divide in_features {in_features}")


@dataclass(frozen=True)
class FourBitWeightConfig:
    """NF4 / FP4 blockwise weight fake quantization: exactly ``dequantize_4bit(quantize_4bit(w, blocksize,
    quant_type, compress_statistics))``, what :class:`fourbit.nn.Linear4bit` stores. Gradients pass straight
    through."""

    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = False

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if not (isinstance(self.blocksize, int) and 32 <= self.blocksize <= 4096 and not self.blocksize & (self.blocksize - 1)):
            raise ValueError(f"blocksize must be a power of two in [32, 4096], got {self.blocksize!r}")

    def check_layer(self, in_features: int, name: str) -> None:
        pass


@dataclass(frozen=True)
class Int8ActivationConfig:
    """int8 per-token dynamic activation fake quantization: each row of the input (all leading dims flattened) gets
    its own scale and zero point from its min / max on every forward (asymmetric, levels [-128, 127], as torchao's
    8da4w; or symmetric with zero point 0). Gradients pass straight through inside the range."""

    symmetric: bool = False
    eps: float = torch.finfo(torch.float32).eps

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        with torch.no_grad():
            rows = x.detach().float().reshape(-1, k)
            if self.symmetric:
                scale = (rows.abs().amax(dim=1) / 127.5).clamp(min=self.eps)
                zero_point = torch.zeros_like(scale)
            else:
                min_neg = rows.amin(dim=1).clamp(max=0)
                max_pos = rows.amax(dim=1).clamp(min=0)
                scale = ((max_pos - min_neg) / 255.0).clamp(min=self.eps)
                zero_point = (-128 - torch.round(min_neg / scale)).clamp(-128, 127)
        return fake_quantize(x, scale, zero_point, -128, 127, group_size=k)


@dataclass(frozen=True)
class QATConfig:
    """What :func:`prepare_qat` fake-quantizes: ``weight`` (:class:`IntWeightConfig` or :class:`FourBitWeightConfig`),
    optionally ``activation`` (:class:`Int8ActivationConfig`), in every ``nn.Linear`` except those whose qualified name
    or last name component is in ``skip_modules``."""

    weight: IntWeightConfig | FourBitWeightConfig
    activation: Int8ActivationConfig | None = None
    skip_modules: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if not isinstance(self.weight, (IntWeightConfig, FourBitWeightConfig)):
            raise TypeError(f"weight must be an IntWeightConfig or a FourBitWeightConfig, got {type(self.weight).__name__}")
        if self.activation is not None and not isinstance(self.activation, Int8ActivationConfig):
            raise TypeError(f"activation must be an Int8ActivationConfig or None, got {type(self.activation).__name__}")


# ---------------------------------------------------------------------------------------------------- weight fake quant
class _WeightFakeQuant(nn.Module):
    """Fake-quantizes a ``[out, in]`` weight per its config; holds the learned scales under range learning."""

    def __init__(self, config: IntWeightConfig | FourBitWeightConfig, weight: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        if isinstance(config, IntWeightConfig) and config.range_learning:
            scale, zero_point, _, _ = int_qparams(weight, config.bits, config.group_size, config.symmetric)
            self.scale = nn.Parameter(scale.to(weight.device))
            self.zero_point = nn.Parameter(zero_point.to(weight.device), requires_grad=not config.symmetric)
        else:
            self.scale = self.zero_point = None

    def qparams(self, weight: torch.Tensor):
        c = self.config
        if self.scale is not None:
            # Kept positive as the op requires (torchao clamps learned scales the same way).
            return (self.scale.clamp(min=1e-9), self.zero_point, *c.quant_range)
        return int_qparams(weight, c.bits, c.group_size, c.symmetric)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        c = self.config
        if isinstance(c, FourBitWeightConfig):
            return fake_quantize_4bit(weight, c.quant_type, c.blocksize, c.compress_statistics)
        scale, zero_point, qmin, qmax = self.qparams(weight)
        grad_factor = 1.0 / math.sqrt(weight.numel() * qmax) if self.scale is not None else 1.0
        return fake_quantize(weight, scale, zero_point, qmin, qmax, group_size=c.group_size, grad_factor=grad_factor)


def _convert_weight(fq: _WeightFakeQuant, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    c = fq.config
    if isinstance(c, FourBitWeightConfig):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        linear.bias = nn.Parameter(bias.detach()) if bias is not None else None
        return Linear4bit.from_linear(linear, c.quant_type, c.blocksize, c.compress_statistics)
    scale, zero_point, qmin, qmax = fq.qparams(weight)
    return LinearInt.from_quantized(weight.detach(), scale, zero_point, qmin, qmax, c.bits, c.group_size,
                                    None if bias is None else bias.detach())  # fmt: skip


def _activation_pre_hook(module: nn.Module, args):
    return (module.qat_activation.fake_quantize(args[0]),) + tuple(args[1:])


# ---------------------------------------------------------------------------------------------------- modules
class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses the fake-quantized weight (and input, with an activation config):
    ``F.linear(act_fq(x), weight_fake_quant(weight), bias)``. The float weight stays trainable; gradients follow the
    straight-through estimator (and LSQ for learned scales)."""

    def __init__(self, in_features: int, out_features: int, config: QATConfig, bias: bool = True, device=None,
                 dtype=None) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.qat_config = config
        self.weight_fake_quant = _WeightFakeQuant(config.weight, self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig) -> FakeQuantLinear:
        """Shares ``linear``'s weight and bias Parameters (an optimizer built before keeps working)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.qat_config = config
        layer.weight_fake_quant = _WeightFakeQuant(config.weight, linear.weight)
        return layer

    def fake_quantized_weight(self) -> torch.Tensor:
        return self.weight_fake_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat_config.activation is not None:
            x = self.qat_config.activation.fake_quantize(x)
        return F.linear(x, self.fake_quantized_weight(), self.bias)

    def to_quantized(self) -> nn.Module:
        """The deployed layer: LinearInt or Linear4bit holding exactly the fake-quantized weight."""
        layer = _convert_weight(self.weight_fake_quant, self.weight, self.bias)
        if self.qat_config.activation is not None:
            layer.qat_activation = self.qat_config.activation
            layer.register_forward_pre_hook(_activation_pre_hook)
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.qat_config.weight}, activation={self.qat_config.activation}"


class FakeQuantLoRALinear(nn.Module):
    """QAT with LoRA: a frozen ``base_layer`` (``nn.Linear``) plus one trainable adapter (``lora_A[name]``,
    ``lora_B[name]``, PEFT's names), whose forward fake-quantizes the merged weight
    ``W + scaling * B @ A``. Training the adapters this way makes the merged, quantized model (``convert_qat``) the
    one that was trained, instead of a lossy requantization after merging."""

    def __init__(self, base_layer: nn.Linear, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float, config: QATConfig,
                 adapter_name: str = "default") -> None:  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({adapter_name: lora_A})
        self.lora_B = nn.ModuleDict({adapter_name: lora_B})
        self.adapter_name = adapter_name
        self.scaling = float(scaling)
        self.qat_config = config
        self.weight_fake_quant = _WeightFakeQuant(config.weight, base_layer.weight)

    def merged_weight(self) -> torch.Tensor:
        a = self.lora_A[self.adapter_name].weight
        b = self.lora_B[self.adapter_name].weight
        w = self.base_layer.weight
        return w + (self.scaling * (b @ a)).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat_config.activation is not None:
            x = self.qat_config.activation.fake_quantize(x)
        return F.linear(x, self.weight_fake_quant(self.merged_weight()), self.base_layer.bias)

    def to_quantized(self) -> nn.Module:
        with torch.no_grad():
            merged = self.merged_weight()
        layer = _convert_weight(self.weight_fake_quant, merged, self.base_layer.bias)
        if self.qat_config.activation is not None:
            layer.qat_activation = self.qat_config.activation
            layer.register_forward_pre_hook(_activation_pre_hook)
        return layer


# ---------------------------------------------------------------------------------------------------- prepare / convert
def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return name in skip or name.rsplit(".", 1)[-1] in skip


def _from_lora(module: nn.Module, config: QATConfig, name: str) -> FakeQuantLoRALinear:
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in module.lora_magnitude_vector or module.merged_adapters:
        raise ValueError(f"{name}: QAT with LoRA needs exactly one active, unmerged, non-DoRA adapter, got {active}")
    if type(module.base_layer) is not nn.Linear:
        raise TypeError(f"{name}: QAT with LoRA needs an nn.Linear base layer, got {type(module.base_layer).__name__}")
    adapter = active[0]
    if not isinstance(module.lora_dropout[adapter], nn.Identity):
        raise ValueError(f"{name}: LoRA dropout cannot be expressed in the merged weight that QAT fake-quantizes; "
                         "use lora_dropout=0")  # fmt: skip
    return FakeQuantLoRALinear(module.base_layer, module.lora_A[adapter], module.lora_B[adapter],
                               module.scaling[adapter], config, adapter)  # fmt: skip


def prepare_qat(model: nn.Module, config: QATConfig) -> nn.Module:
    """Replaces, in place, every ``nn.Linear`` (and every ``fourbit.nn.LoRALinear`` over an ``nn.Linear``) not in
    ``config.skip_modules`` by its fake-quant counterpart, and returns the model. Parameters are shared, not copied.
    Raises ValueError naming the layer when the config does not fit it (e.g. a group size that does not divide its
    in_features)."""
    from .nn.lora import LoRALinear

    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a fourbit.qat.QATConfig, got {type(config).__name__}")
    if isinstance(model, (nn.Linear, LoRALinear)):
        raise TypeError("prepare_qat works on a model's children in place; wrap a single layer in a module first")
    replacements = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if _skipped(full, config.skip_modules) or isinstance(child, (FakeQuantLinear, FakeQuantLoRALinear)):
                continue
            if isinstance(child, LoRALinear):
                replacements.append((module, child_name, full, "lora", child))
            elif type(child) is nn.Linear and not _inside_lora(model, full):
                replacements.append((module, child_name, full, "linear", child))
    for module, child_name, full, kind, child in replacements:
        config.weight.check_layer(child.in_features, full)
        new = _from_lora(child, config, full) if kind == "lora" else FakeQuantLinear.from_linear(child, config)
        setattr(module, child_name, new)
    return model


def _inside_lora(model: nn.Module, name: str) -> bool:
    from .nn.lora import LoRALinear

    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), LoRALinear):
            return True
    return False


def convert_qat(model: nn.Module) -> nn.Module:
    """Replaces, in place, every fake-quant layer that :func:`prepare_qat` made by the real quantized layer
    (``LinearInt`` for integer configs, ``Linear4bit`` for NF4/FP4) holding exactly the fake-quantized weight, and
    returns the model. With LoRA, the adapter is merged first."""
    replacements = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, (FakeQuantLinear, FakeQuantLoRALinear)):
                replacements.append((module, child_name, child))
    for module, child_name, child in replacements:
        setattr(module, child_name, child.to_quantized())
    return model
