"""Execution from packed weights equals dequantize-then-matmul (float64 references): the int8 kernel path, the
dequantizing path, experts with mixed widths through MoE's dispatch path and through ``decode``, and a whole model
swapped to its quantized form and back."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.compress import kernels
from moekit.compress.modules import (QuantizedExperts, QuantizedLinear, QuantizedMLP, dequantize_model_,
                                     quantize_model_, quantized_modules)
from moekit.compress.quantize import QuantSpec, quantize_rtn
from moekit.config import ModelConfig, MoEConfig
from moekit.layer.ffn import ffn
from moekit.layer.moe import MoE
from moekit.model.transformer import Transformer

SEEDS = (0, 1, 2)


@pytest.mark.parametrize("spec", [QuantSpec(8, None, True), QuantSpec(8, 32), QuantSpec(4, 32), QuantSpec(3, 64),
                                  QuantSpec(2, None)])
def test_quantized_linear_equals_dequantize_then_matmul(spec):
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        w, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
        qt = quantize_rtn(w, spec)
        lin = QuantizedLinear(qt, b)
        assert (qt.int8_weight() is not None) == (spec.bits == 8 and spec.group_size is None and spec.symmetric)
        x = torch.randn(2, 5, 64, generator=g)
        ref = x.double() @ qt.dequantize(torch.float64).t() + b.double()
        assert torch.allclose(lin(x).double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(lin(x.double()), ref, rtol=1e-12, atol=1e-12)  # float64 in: float64 math
        assert torch.allclose(lin(x.bfloat16()).double(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


def _moe(seed: int, shared: bool = True, dtype=torch.float64) -> MoE:
    torch.manual_seed(seed)
    cfg = MoEConfig(n_experts=6, top_k=2, expert_ffn_dim=48, n_shared_experts=1 if shared else 0,
                    shared_expert_gate=shared)
    moe = MoE(32, cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe.to(dtype).eval()


def _quantize_layer(moe: MoE, widths: list[int], spec: QuantSpec) -> None:
    ex = moe.experts
    stacks = {}
    for b in sorted(set(widths)):
        idx = [e for e, w in enumerate(widths) if w == b]
        stacks[b] = (quantize_rtn(ex.w_in[idx], spec.with_bits(b)), quantize_rtn(ex.w_out[idx], spec.with_bits(b)))
    new = {"experts": QuantizedExperts(ex, widths, stacks)}
    if moe.shared is not None:
        new["shared"] = QuantizedMLP(moe.shared, quantize_rtn(moe.shared.w_in, spec.with_bits(4)),
                                     quantize_rtn(moe.shared.w_out, spec.with_bits(4)))
    quantize_model_(moe, new)


def _reference(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """out_t = sum_k w_tk f_{e_tk}(x_t) + gate(x_t) f_shared(x_t), every weight dequantized, in float64."""
    x = x_TD.double()
    routing = moe.router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(routing.topk_idx_TK[t].tolist(), routing.topk_weight_TK[t].tolist()):
            q_in, q_out = moe.experts.expert(e)
            out[t] += w * ffn(x[t], q_in.dequantize(torch.float64), q_out.dequantize(torch.float64), "swiglu")
    if moe.shared is not None:
        s = ffn(x, moe.shared.w_in.qt.dequantize(torch.float64), moe.shared.w_out.qt.dequantize(torch.float64),
                "swiglu")
        out += torch.sigmoid(x @ moe.shared_gate.weight.double().t()) * s
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tokens", (1, 3, 40))
def test_quantized_experts_through_moe_equal_the_float64_reference(seed, tokens):
    moe = _moe(seed)
    _quantize_layer(moe, [2, 8, 4, 3, 4, 8], QuantSpec(4, 32))
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        ref = _reference(moe, x)
        for aux in (True, False):
            assert torch.allclose(moe(x, aux=aux).out, ref, rtol=1e-10, atol=1e-10)
        moe32 = copy.deepcopy(moe).float()
        # a few fp32 rows take the packed-weight kernel (moekit.compress.kernels), which rounds x to int8 blocks
        tol = 3e-2 * ref.abs().max().item() if tokens <= kernels.MAX_ROWS and kernels.matvec.available() else 1e-4
        assert torch.allclose(moe32(x.float(), aux=False).out.double(), ref, rtol=tol, atol=tol)


def test_decode_reads_only_the_chosen_experts_and_matches_the_reference():
    moe = _moe(3, shared=False)
    _quantize_layer(moe, [4, 4, 2, 8, 3, 2], QuantSpec(4, None, True))
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    routing = moe.router(x)
    read = []
    ex = moe.experts
    original = ex.expert
    ex.expert = lambda e: (read.append(e), original(e))[1]
    out = ex.decode(x, routing.topk_idx_TK, routing.topk_weight_TK)
    del ex.expert
    assert sorted(read) == sorted(set(routing.topk_idx_TK.flatten().tolist()))
    assert torch.allclose(out, _reference(moe, x), rtol=1e-10, atol=1e-10)
    assert not ex.decode_eligible(x, 2)  # MoE keeps quantized layers on the dispatch path


def test_whole_model_swap_and_back():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32, first_dense_layers=1,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32, n_shared_experts=1))
    model = Transformer(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 12))
    spec = QuantSpec(3, 32)
    new = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            new[f"{name}.experts"] = QuantizedExperts(m.experts, [3, 3, 8, 2], {
                3: (quantize_rtn(m.experts.w_in[:2], spec), quantize_rtn(m.experts.w_out[:2], spec)),
                8: (quantize_rtn(m.experts.w_in[2:3], spec.with_bits(8)),
                    quantize_rtn(m.experts.w_out[2:3], spec.with_bits(8))),
                2: (quantize_rtn(m.experts.w_in[3:], spec.with_bits(2)),
                    quantize_rtn(m.experts.w_out[3:], spec.with_bits(2)))})
        elif name.endswith("attn.wq") or name.endswith("attn.wo"):
            new[name] = QuantizedLinear(quantize_rtn(m.weight, spec.with_bits(8)), m.bias)
        elif name == "layers.0.ffn":
            new[name] = QuantizedMLP(m, quantize_rtn(m.w_in, spec), quantize_rtn(m.w_out, spec))
    quantize_model_(model, new)
    assert set(quantized_modules(model)) == set(new)
    with torch.no_grad():
        got = model(ids).logits
        back = dequantize_model_(copy.deepcopy(model), torch.float64)
        assert not quantized_modules(back)
        assert torch.allclose(back(ids).logits, got, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="not a quantized module"):
        quantize_model_(model, {"layers.0.attn.wk": torch.nn.Linear(32, 32)})
