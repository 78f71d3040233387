"""Packing, round-to-nearest and the stored form: exact packing for every width, the half-step error bound, honest
effective bits, and clear errors for malformed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.compress.quantize import (GROUP_SIZES, WIDTHS, QuantizedTensor, QuantSpec, bits_of, pack_codes,
                                      quantize_rtn, unpack_codes, unit)

SEEDS = (0, 1, 2)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_pack_unpack_is_exact_for_every_width(bits, seed):
    g = torch.Generator().manual_seed(seed)
    vals, nbytes = unit(bits)
    for lead in ((), (3,), (2, 5)):
        n = vals * int(torch.randint(1, 9, (), generator=g))
        codes = torch.randint(0, 1 << bits, (*lead, 7, n), generator=g, dtype=torch.int64).to(torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (*lead, 7, n * bits // 8)
        assert torch.equal(unpack_codes(packed, bits), codes)
    # the extreme codes survive too (all ones, all zeros, alternating)
    for fill in (0, (1 << bits) - 1):
        c = torch.full((4, vals * 3), fill, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(c, bits), bits), c)


def test_three_bit_packs_eight_codes_into_three_bytes_little_endian():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    assert pack_codes(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def _step_per_element(qt: QuantizedTensor, in_features: int) -> torch.Tensor:
    return qt.scales.double().repeat_interleave(qt.group_size, -1)[..., :in_features]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", (False, True))
def test_rtn_error_is_within_half_a_step_per_element(bits, group_size, symmetric):
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        # heavy tails, a constant-sign row, an all-zero row and a row length that is not a whole number of groups
        w = torch.randn(3, 6, 200, generator=g, dtype=torch.float64) ** 3
        w[0, 1] = w[0, 1].abs() + 1.0
        w[1, 2] = 0.0
        qt = quantize_rtn(w, QuantSpec(bits, group_size, symmetric))
        err = (qt.dequantize(torch.float64) - w).abs()
        assert (err <= 0.5 * _step_per_element(qt, 200) * (1 + 1e-9)).all()
        assert err[1, 2].max() == 0  # a zero row is exact
        # the grid is tight, not trivially wide: the step is within 0.2% of the group's range over 2^b - 1
        # (symmetric: 2 max|w| over 2^b - 1), so the bound is no looser than round-to-nearest must be
        wg = torch.nn.functional.pad(w, (0, qt.groups * qt.group_size - 200)).view(3, 6, qt.groups, qt.group_size)
        if symmetric:
            span = 2 * wg.abs().amax(-1)
        else:
            span = wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)
        ok = span > 1e-3
        assert torch.allclose(qt.scales.double()[ok], (span / ((1 << bits) - 1))[ok], rtol=2e-3)


def test_rtn_is_vectorised_over_experts():
    w = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(3, 32)
    stack = quantize_rtn(w, spec)
    for e in range(4):
        one = quantize_rtn(w[e], spec)
        assert torch.equal(stack.select(e).packed, one.packed) and torch.equal(stack.select(e).scales, one.scales)
        assert torch.equal(stack.select(e).dequantize(), one.dequantize())


def test_effective_bits_hand_counted():
    # [3, 10, 100] at 3 bits, groups of 32, asymmetric: 4 groups per row (the last holds 4 columns), 128 codes per
    # row -> 48 bytes; 30 rows: 1440 bytes of codes + 30 * 4 * 2 bytes of fp16 scales + as many of zeros = 1920
    # bytes = 15360 bits over 3000 weights
    qt = quantize_rtn(torch.randn(3, 10, 100), QuantSpec(3, 32, symmetric=False))
    assert qt.packed.shape == (3, 10, 48) and qt.scales.shape == (3, 10, 4)
    assert qt.nbytes == 1920 and qt.effective_bits == pytest.approx(15360 / 3000)
    # 4 bits, groups of 128: 4 + 32/128 = 4.25 (asymmetric), 4 + 16/128 = 4.125 (symmetric)
    assert quantize_rtn(torch.randn(8, 256), QuantSpec(4, 128)).effective_bits == 4.25
    assert quantize_rtn(torch.randn(8, 256), QuantSpec(4, 128, True)).effective_bits == 4.125
    for bits in WIDTHS:
        for gs in GROUP_SIZES:
            spec = QuantSpec(bits, gs)
            assert bits_of((2, 12, 72), spec) == 8 * quantize_rtn(torch.randn(2, 12, 72), spec).nbytes


def test_eight_bit_symmetric_is_the_int8_layout():
    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    qt = quantize_rtn(w, QuantSpec(8, None, symmetric=True))
    w8 = qt.int8_weight()
    assert w8 is not None and w8.dtype == torch.int8
    ref = w8.double() * qt.scales.double()
    assert torch.equal(ref, qt.dequantize(torch.float64))
    assert quantize_rtn(w, QuantSpec(8, 32, symmetric=True)).int8_weight() is None  # several groups per row


def test_unsupported_width_and_group_are_clear_errors():
    for bits in (1, 5, 6, 16, True):
        with pytest.raises(ValueError, match="unsupported width"):
            QuantSpec(bits)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, 48)
    with pytest.raises(ValueError, match="unsupported width"):
        pack_codes(torch.zeros(4, 8, dtype=torch.uint8), 5)


def test_malformed_quantized_tensor_names_the_part():
    qt = quantize_rtn(torch.randn(2, 8, 64), QuantSpec(4, 32))
    parts = dict(packed=qt.packed, scales=qt.scales, zeros=qt.zeros, bits=4, group_size=32, symmetric=False,
                 shape=(2, 8, 64))
    with pytest.raises(ValueError, match=r"packed: expected uint8 \[2, 8, 32\]"):
        QuantizedTensor(**{**parts, "packed": qt.packed[..., :-1]})
    with pytest.raises(ValueError, match="zeros: missing"):
        QuantizedTensor(**{**parts, "zeros": None})
    with pytest.raises(ValueError, match="scales: expected"):
        QuantizedTensor(**{**parts, "scales": qt.scales.float()})
    with pytest.raises(ValueError, match="unsupported width 5"):
        QuantizedTensor(**{**parts, "bits": 5})
    assert math.isclose(QuantizedTensor(**parts).effective_bits, qt.effective_bits)
