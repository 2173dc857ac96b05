# SPDX-License-Identifier: Apache-2.0
"""LoraConfig: PEFT's LoRA configuration fields, validated, and its ``adapter_config.json`` form.

The field names and defaults are PEFT's (``peft/tuners/lora/config.py``), so a config moves between the two
libraries. Options fourbit does not implement are refused with an error naming them, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoraConfig"]

# adapter_config.json keys PEFT writes that carry no meaning for fourbit when they hold their default value; any
# other value means the adapter relies on a feature fourbit does not implement.
_PEFT_DEFAULTS: dict[str, Any] = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "loftq_config": {},
    "layer_replication": None,
    "eva_config": None,
    "corda_config": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "ensure_weight_tying": False,
    "lora_ga_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "kasa_config": None,
}
# Bookkeeping keys PEFT writes; read and kept, never interpreted.
_PEFT_METADATA = ("peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                  "peft_version", "runtime_config")  # fmt: skip

_INITS = (True, False, "gaussian")
_BIASES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """LoRA hyper-parameters with PEFT's names.

    Args:
        r: the rank (> 0). lora_alpha: scaling numerator; ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
            ``use_rslora``). lora_dropout: dropout probability on the LoRA branch's input.
        target_modules: which linear layers get adapters: a list of names or name suffixes (``["q_proj",
            "v_proj"]``), a regular expression matched against the full module name, or ``"all-linear"`` (every
            linear layer but the output layer). None: the model type's usual targets (PEFT's defaults).
        exclude_modules: names, suffixes or a regular expression never to adapt.
        use_rslora, use_dora: rank-stabilised scaling; DoRA (weight-decomposed LoRA).
        init_lora_weights: True (A kaiming-uniform, B zeros), "gaussian" (A normal with std 1/r, B zeros) or False.
        bias: "none", "all" (every bias trains and is saved) or "lora_only" (biases of adapted layers).
        modules_to_save: names or suffixes of modules trained in full and saved with the adapter (e.g. a
            classification head).
        fan_in_fan_out: True for transformers' Conv1D (GPT-2); fourbit detects Conv1D by itself and records it.
        rank_pattern, alpha_pattern: ``{regex: r}`` / ``{regex: alpha}`` overrides per module name.
        lora_bias: not supported (refused).
        task_type: recorded in the adapter config (e.g. "CAUSAL_LM").
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise TypeError(f"{name} must be None, a string or a list of strings, got {value!r}")
            if isinstance(value, str):
                _compile(value, name)
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.init_lora_weights not in _INITS or isinstance(self.init_lora_weights, int) and not isinstance(self.init_lora_weights, bool):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by fourbit; use True, False or "
                "'gaussian' (PiSSA, OLoRA, LoftQ, EVA, CorDA and the other data-driven inits are not implemented)"
            )
        if self.bias not in _BIASES:
            raise ValueError(f"bias must be one of {_BIASES}, got {self.bias!r}")
        if self.lora_bias:
            raise ValueError("lora_bias=True is not supported by fourbit (a bias on lora_B)")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise TypeError(f"{name} must be a dict of {{regex: value}}, got {pattern!r}")
            for key, value in pattern.items():
                _compile(key, f"{name} key")
                if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
                    raise ValueError(f"{name}[{key!r}] must be a positive number, got {value!r}")

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    # ------------------------------------------------------------------ adapter_config.json
    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` contents PEFT reads (all of PEFT's long-standing keys present)."""
        d = dataclasses.asdict(self)
        d.update(
            peft_type="LORA", inference_mode=True, revision=None, auto_mapping=None,
            layers_to_transform=None, layers_pattern=None, loftq_config={}, megatron_config=None,
            megatron_core="megatron.core",
        )  # fmt: skip
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Reads an ``adapter_config.json`` written by PEFT or fourbit: keys fourbit does not know are ignored with a
        warning; known PEFT features fourbit lacks are refused when they are set."""
        if not isinstance(d, dict):
            raise TypeError(f"an adapter config must be a dict, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"adapter config has peft_type={peft_type!r}; this loader reads LoRA adapters ('LORA')")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in d.items():
            if key in own:
                kwargs[key] = value
            elif key in _PEFT_DEFAULTS:
                if value != _PEFT_DEFAULTS[key] and value not in (None, {}, [], False):
                    raise ValueError(f"adapter config sets {key}={value!r}, a PEFT feature fourbit does not support")
            elif key not in _PEFT_METADATA:
                unknown.append(key)
        if unknown:
            warnings.warn(f"adapter config: ignoring keys fourbit does not know: {sorted(unknown)}", stacklevel=3)
        return cls(**kwargs)


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {e}") from None


def _pattern_value(patterns: dict, module_name: str, default):
    # PEFT's rule: the first key that matches the end of the module name (whole dotted components).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
