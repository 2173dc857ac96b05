# SPDX-License-Identifier: Apache-2.0
"""No direction of the QLoRA layer ever materializes the full dequantized weight."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fourbit
from fourbit.nn import Linear4bit, LoRALinear


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation made while fn runs (bytes), from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.mark.parametrize("rows", [1, 64, 300])
def test_qlora_forward_backward_never_allocates_a_dequantized_weight(rows):
    n, k = 2048, 4096
    dequantized_bytes = n * k * 4
    layer = LoRALinear(Linear4bit.from_linear(torch.nn.Linear(k, n)), r=16, lora_alpha=16, init_lora_weights=False)
    x = torch.randn(rows, k, requires_grad=True)
    largest = _largest_allocation(lambda: layer(x).sum().backward())
    # Tiles are at most a quarter of W; activations here are far smaller than W.
    assert largest <= dequantized_bytes // 4, (largest, dequantized_bytes)
    # The measurement can fail: dequantizing the whole weight is caught.
    packed, state = layer.base_layer.weight, layer.base_layer.quant_state
    naive = _largest_allocation(lambda: torch.nn.functional.linear(x, fourbit.dequantize_4bit(packed, state)))
    assert naive >= dequantized_bytes
