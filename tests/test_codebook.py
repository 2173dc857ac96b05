# SPDX-License-Identifier: Apache-2.0
"""The codebooks exist once in C++ (csrc/core/); they must equal the reference's construction and bitsandbytes'."""

import bitsandbytes.functional as bnbF
import pytest
import torch

import fourbit
from fourbit import reference as ref


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codebook_matches_reference_and_bitsandbytes(quant_type):
    ours = torch.ops.fourbit.quant_map(quant_type)
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    assert torch.equal(ours.view(torch.int32), ref.levels(quant_type).view(torch.int32))  # bit patterns, signs too
    assert torch.equal(ours, bnbF.get_4bit_type(quant_type, device="cpu"))


def test_dynamic_map_matches_reference_and_bitsandbytes():
    ours = torch.ops.fourbit.quant_map("dynamic")
    assert ours.shape == (256,)
    assert torch.equal(ours, ref.create_dynamic_map())
    assert torch.equal(ours, bnbF.create_dynamic_map())
    assert (ours == 0).sum() == 1 and ours.max() == 1.0 and bool((ours[1:] > ours[:-1]).all())


def test_fp4_layout_sign_bit_and_zeros():
    fp4 = torch.ops.fourbit.quant_map("fp4")
    assert fp4[3] == 1.0 and fp4[11] == -1.0  # magnitude 0b011 = 12/12
    assert torch.equal(fp4[8:], -fp4[:8])  # bit 3 is the sign
    assert fp4[0].item() == 0.0 and fp4[8].item() == 0.0 and not torch.signbit(fp4[8])  # bitsandbytes' "-0" is +0


def test_unknown_codebook_is_a_value_error():
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'af4'"):
        torch.ops.fourbit.quant_map("af4")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_level_and_every_midpoint_quantizes_as_specified(quant_type, cpu_isa):
    # A block whose absmax is exactly 1 (multiplier 1.0) holding every level and every float32 midpoint: levels map to
    # their own code (the lower of two equal FP4 zeros), midpoints to the lower neighbour, the next float up to the
    # upper one.
    table = ref.levels(quant_type)
    order = torch.argsort(table, stable=True)
    ordered = table[order]
    mids = (ordered[:-1] + ordered[1:]) / 2
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    values = torch.cat([ordered, mids, above, torch.tensor([1.0])])
    values = torch.cat([values, torch.zeros(64 - values.numel())])
    packed, state = fourbit.quantize_4bit(values, blocksize=64, quant_type=quant_type)
    codes = ref.unpack_codes(packed, values.numel())
    assert state.absmax.item() == 1.0
    expected_levels = order.clone()
    expected_levels[8 if quant_type == "fp4" else 7] = order[7]  # two equal zeros in FP4: the first code wins
    assert torch.equal(codes[:16], expected_levels)
    assert torch.equal(codes[16:31], order[:-1])  # ties go to the lower code
    assert torch.equal(codes[31:46], order[1:])
    ref_packed, _ = ref.quantize_4bit(values, 64, quant_type)
    bnb_packed, _ = bnbF.quantize_4bit(values, blocksize=64, quant_type=quant_type)
    assert torch.equal(packed, ref_packed) and torch.equal(packed, bnb_packed)
