# SPDX-License-Identifier: Apache-2.0
"""fourbit: 4-bit (NF4/FP4) quantization, fused QLoRA kernels and QAT for PyTorch, compatible with bitsandbytes."""

from __future__ import annotations

import torch

from . import _build_info


def _check_torch_version() -> None:
    # The extension uses torch's C++ API, which is only stable within a minor release.
    built = _build_info.TORCH_VERSION.split("+")[0].split(".")[:2]
    running = torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        raise ImportError(
            f"fourbit was compiled against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} is "
            "installed; rebuild it against this torch with: pip install --no-build-isolation --force-reinstall "
            "--no-deps fourbit (from the source tree: pip install --no-build-isolation .)"
        )


_check_torch_version()

from . import _C  # noqa: E402  (registers the torch.ops.fourbit operators)
from . import _ops  # noqa: E402,F401  (their fake implementations)
from .functional import dequantize_4bit, lora_linear, lora_linear_multi, matmul_4bit, quantize_4bit  # noqa: E402
from .functional import fake_quantize, fake_quantize_4bit  # noqa: E402
from .quant_state import QuantState  # noqa: E402
from . import nn  # noqa: E402,F401
from . import qat  # noqa: E402,F401
from .config import LoraConfig  # noqa: E402
from .model import (  # noqa: E402
    active_adapters,
    adapter_state_dict,
    add_lora,
    delete_adapter,
    disable_adapters,
    load_adapter,
    load_adapter_weights,
    lora_layers,
    merge_lora,
    per_row_adapters,
    prepare_for_kbit_training,
    quantize_model,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unmerge_lora,
)
from .pretrained import from_pretrained, save_pretrained, save_quantized  # noqa: E402
from . import distributed  # noqa: E402,F401
from .distributed import save_adapter_distributed, shard_model  # noqa: E402

from .adapters import (  # noqa: E402
    add_bottleneck_adapters,
    bottleneck_adapter_names,
    bottleneck_state_dict,
    delete_bottleneck_adapter,
    disable_bottleneck_adapters,
    load_bottleneck_adapters,
    save_bottleneck_adapters,
    set_bottleneck_adapter,
)
from .prompt_tuning import add_prompt_tuning, load_prompt_tuning, save_prompt_tuning  # noqa: E402

__version__ = "0.1.0"


def cuda_kernels_built() -> bool:
    """Whether this build of fourbit contains the CUDA kernels."""
    return bool(_build_info.WITH_CUDA)


def build_info() -> dict:
    """What this build was compiled against, and what it runs on."""
    return {
        "fourbit": __version__,
        "torch_built": _build_info.TORCH_VERSION,
        "torch": torch.__version__,
        "cuda_kernels": bool(_build_info.WITH_CUDA),
        "cuda_archs": [f"sm_{a}" for a in _build_info.CUDA_ARCHS.split(";") if a],
        "cuda_skipped_reason": _build_info.CUDA_SKIPPED_REASON,
        "cpu_isa": _C.cpu_isa(),
        "cpu_isas_supported": _C.supported_cpu_isas(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


__all__ = [
    "fake_quantize",
    "fake_quantize_4bit",
    "qat",
    "LoraConfig", "quantize_model", "add_lora", "save_adapter", "load_adapter", "load_adapter_weights", "merge_lora", "unmerge_lora",
    "set_adapter", "active_adapters", "delete_adapter", "disable_adapters", "per_row_adapters", "lora_layers",
    "adapter_state_dict", "prepare_for_kbit_training", "trainable_parameters",
    "from_pretrained", "save_pretrained", "save_quantized",
    "distributed", "shard_model", "save_adapter_distributed",
    "add_bottleneck_adapters", "set_bottleneck_adapter", "delete_bottleneck_adapter", "disable_bottleneck_adapters",
    "bottleneck_adapter_names", "bottleneck_state_dict", "save_bottleneck_adapters", "load_bottleneck_adapters",
    "add_prompt_tuning", "save_prompt_tuning", "load_prompt_tuning",
    "QuantState", "quantize_4bit", "dequantize_4bit", "matmul_4bit", "lora_linear", "lora_linear_multi", "cuda_kernels_built", "build_info", "__version__"]
