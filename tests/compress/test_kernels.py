"""The packed-weight products (``moekit.compress.kernels``) equal dequantize-then-matmul in float64, for every width
and layout they take; a model whose experts are packed decodes through them, with no dequantized copy, and
generates the reference's tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.compress import kernels
from moekit.compress.modules import QuantizedExperts, qlinear, quantize_model_
from moekit.compress.quantize import QuantizedTensor, QuantSpec, quantize_rtn
from moekit.config import ModelConfig, MoEConfig
from moekit.layer.ffn import ffn
from moekit.layer.moe import MoE
from moekit.model import decode
from moekit.model.generate import prefill
from moekit.model.transformer import KVCache, Transformer

SEEDS = (0, 1, 2)
SPECS = [QuantSpec(4, 128), QuantSpec(4, 32, True), QuantSpec(2, 64), QuantSpec(2, 128, True), QuantSpec(8, 32),
         QuantSpec(8, None, True), QuantSpec(8, 128, True), QuantSpec(4, None), QuantSpec(2, 32)]

if not kernels.matvec.available():
    pytest.skip("the packed-weight kernel needs an x86 host with AVX2 and a C++ toolchain (matvec.available())",
                allow_module_level=True)


def _ref(x, qt):
    return x.double() @ qt.dequantize(torch.float64).transpose(-1, -2)


def _kernel_ref(x, qt):
    """What the kernel computes: x rounded to its int8 blocks, against the dequantized weight, in float64."""
    return _ref(kernels.rounded_x(x, qt), qt)


def _rounding_bound(x, qt):
    """|x W^T - rounded(x) W^T| <= sum_j |w_j| |x_j - rounded(x)_j| (half an int8 step of x's block each)."""
    err = (x.double() - kernels.rounded_x(x, qt).double()).abs()
    return err @ qt.dequantize(torch.float64).abs().transpose(-1, -2)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("I", (256, 224))  # 224: the last 128-group is padded (a whole-row group: 7 vectors of 32)
def test_rows_matvec_equals_dequantize_then_matmul_on_the_rounded_x(spec, I):
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        qt = quantize_rtn(torch.randn(72, I, generator=g), spec)
        if not kernels.layout_applies(qt):  # 2-bit needs groups of 64 codes; a whole row of 224 is not
            assert spec.bits == 2 and qt.group_size % 64
            continue
        for T in (1, 3, 8):
            x = torch.randn(T, I, generator=g)
            x[0, 5] = 40.0  # an outlier: its block's step is coarse, the other blocks' are not
            assert kernels.applies(x, qt)
            got = kernels.q_rows_matvec(x, qt)
            assert got.dtype == torch.float32 and got.shape == (T, 72)
            torch.testing.assert_close(got.double(), _kernel_ref(x, qt), rtol=1e-4, atol=1e-4)
            assert ((got.double() - _ref(x, qt)).abs() <= _rounding_bound(x, qt) + 1e-3).all()


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(2, 64), QuantSpec(8, 128, True), QuantSpec(8, 32)], ids=str)
def test_experts_matvec_reads_each_rows_expert_and_skips_minus_one(spec):
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        qt = quantize_rtn(torch.randn(5, 40, 128, generator=g), spec)
        x_NI = torch.randn(3, 128, generator=g)
        idx_R = torch.tensor([4, 0, -1, 2, 2, 1])  # k = 2 experts for each of 3 rows; one slot skipped
        got = kernels.q_experts_matvec(x_NI, qt, idx_R)
        xr = kernels.rounded_x(x_NI, qt).double()
        w = qt.dequantize(torch.float64)
        for r, e in enumerate(idx_R.tolist()):
            want = torch.zeros(40, dtype=torch.float64) if e < 0 else w[e] @ xr[r // 2]
            torch.testing.assert_close(got[r].double(), want, rtol=1e-4, atol=1e-4)
        own = kernels.q_experts_matvec(torch.randn(6, 128, generator=g), qt, idx_R.clamp_min(0))  # a row each
        assert own.shape == (6, 40)


def test_layouts_the_kernel_cannot_read_keep_the_dequantize_path():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 100, generator=g)
    for qt in (quantize_rtn(w, QuantSpec(3, 32)), quantize_rtn(w, QuantSpec(4, None))):  # 3-bit; a row of 100 is not whole 32-code vectors
        assert not kernels.layout_applies(qt)
        x = torch.randn(2, 100, generator=g)
        torch.testing.assert_close(qlinear(x, qt).double(), _ref(x, qt), rtol=1e-5, atol=1e-5)
    qt = quantize_rtn(torch.randn(16, 128, generator=g), QuantSpec(4, 32))
    assert not kernels.applies(torch.randn(9, 128), qt)  # past MAX_ROWS rows: dequantize one matrix and a GEMM
    assert not kernels.applies(torch.randn(2, 128, dtype=torch.float64), qt)  # float64 keeps float64 math
    with pytest.raises(ValueError, match="not a layout the kernel reads"):
        kernels.q_rows_matvec(torch.randn(1, 100), quantize_rtn(w, QuantSpec(3, 32)))
    with pytest.raises(ValueError, match="64 columns, the weight 128"):
        kernels.q_rows_matvec(torch.randn(1, 64), qt)
    with pytest.raises(ValueError, match="not a multiple"):
        kernels.q_experts_matvec(torch.randn(2, 128), quantize_rtn(torch.randn(2, 8, 128), QuantSpec(4, 32)),
                                 torch.tensor([0, 1, 0]))


def test_qlinear_takes_the_kernel_for_a_few_fp32_rows():
    g = torch.Generator().manual_seed(1)
    qt = quantize_rtn(torch.randn(24, 64, generator=g), QuantSpec(4, 32))
    b = torch.randn(24, generator=g)
    x = torch.randn(2, 1, 64, generator=g)
    calls = []
    original = kernels.q_rows_matvec
    kernels.q_rows_matvec = lambda *a: (calls.append(1), original(*a))[1]
    try:
        got = qlinear(x, qt, b)
    finally:
        kernels.q_rows_matvec = original
    assert calls and got.shape == (2, 1, 24)
    torch.testing.assert_close(got.double(), _kernel_ref(x.view(2, 64), qt).view(2, 1, 24) + b.double(), rtol=1e-4,
                               atol=1e-4)


def _packed_moe(seed: int, widths: list[int], spec: QuantSpec) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(64, MoEConfig(n_experts=len(widths), top_k=2, expert_ffn_dim=96))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.eval()
    ex = moe.experts
    stacks = {}
    for b in sorted(set(widths)):
        idx = [e for e, w in enumerate(widths) if w == b]
        stacks[b] = (quantize_rtn(ex.w_in[idx], spec.with_bits(b)), quantize_rtn(ex.w_out[idx], spec.with_bits(b)))
    quantize_model_(moe, {"experts": QuantizedExperts(ex, widths, stacks)})
    return moe


@pytest.mark.parametrize("widths", ([4, 4, 4, 4, 4, 4], [4, 2, 8, 4, 2, 8]), ids=("uniform", "mixed"))
@pytest.mark.parametrize("seed", SEEDS)
def test_packed_decode_equals_the_float64_reference_without_host_reads(widths, seed):
    moe = _packed_moe(seed, widths, QuantSpec(4, 64))  # (2-bit codes need groups of 64)
    ex = moe.experts
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert ex.decode_eligible(x, 2) and not ex.routed_decode
        routing = moe.router(x)
        dequantized = []
        original = QuantizedTensor.dequantize
        QuantizedTensor.dequantize = lambda self, *a: (dequantized.append(1), original(self, *a))[1]
        try:
            got = moe(x, aux=False).out
        finally:
            QuantizedTensor.dequantize = original
        assert not dequantized  # read packed: no expert was dequantized to memory
        want = torch.zeros(3, 64, dtype=torch.float64)
        for t in range(3):
            for e, w in zip(routing.topk_idx_TK[t].tolist(), routing.topk_weight_TK[t].tolist()):
                q_in, q_out = ex.expert(e)
                want[t] += w * ffn(x[t].double(), q_in.dequantize(torch.float64), q_out.dequantize(torch.float64),
                                   "swiglu")
        # x and the hidden activation are each rounded to int8 blocks (~0.4% of a block's largest value)
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        assert not ex.decode_eligible(x.double(), 2) and not ex.decode_eligible(torch.randn(5, 64), 2)


def test_a_model_with_packed_experts_takes_the_decode_step_and_generates_the_reference_tokens():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=64, n_shared_experts=1))
    model = Transformer(cfg).bfloat16().eval()
    spec = QuantSpec(4, 32)
    quantize_model_(model, {f"{n}.experts": QuantizedExperts(m.experts, [4] * 4, {4: (
        quantize_rtn(m.experts.w_in, spec), quantize_rtn(m.experts.w_out, spec))})
        for n, m in model.named_modules() if isinstance(m, MoE)})
    ids = torch.randint(0, 96, (1, 6))
    cache = KVCache(cfg, 1, dtype=torch.float32)
    ref_model = copy.deepcopy(model)
    ref_cache = KVCache(cfg, 1, dtype=torch.float32)
    with torch.no_grad():
        assert decode.fast_path_applies(model, ids[:, :1], cache)
        prefill(model, ids, cache)
        prefill(ref_model, ids, ref_cache)
        nxt = ids[:, -1:]
        for _ in range(4):
            got = decode.decode_step(model, nxt, cache)
            want = ref_model(nxt, cache=ref_cache, aux=False,
                             activation_dtype=decode.activation_dtype(ref_model)).logits.float()
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
            nxt = got[:, -1:].argmax(-1)
