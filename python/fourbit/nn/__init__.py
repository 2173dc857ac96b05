# SPDX-License-Identifier: Apache-2.0
"""fourbit's modules."""

from .linear4bit import Linear4bit
from .lora import LoRALinear
from .linear_int import LinearInt
from .adapters import BottleneckAdapter
from .prompt_tuning import PromptTunedModel, PromptTuning

__all__ = ["Linear4bit", "LoRALinear", "LinearInt", "BottleneckAdapter", "PromptTuning", "PromptTunedModel"]
