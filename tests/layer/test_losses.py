"""Balancing losses: hand-computed values on tiny examples, the float64 reference on random inputs, the
MoE layer's weighting of them, and their gradients w.r.t. the router weight (autograd vs finite differences
of the reference)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import ref_moe, ref_seq_loss, ref_switch_loss, ref_z_loss, state_dict64

from moekit.config import MoEConfig
from moekit.layer.losses import router_z_loss, seq_aux_loss, switch_aux_loss
from moekit.layer.moe import MoE

SEEDS = (0, 1, 2)

# 4 tokens, 2 experts, top-1.  f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75*0.65 + 0.25*0.35) = 1.15
PROBS_4x2 = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]
IDX_4x1 = [[0], [0], [1], [0]]
SWITCH_4x2 = 1.15
# as 2 sequences of 2 tokens: seq 0: f = (1, 0), P = (0.85, 0.15) -> 1.7;  seq 1: f = (.5, .5), P = (.45, .55) -> 1.0
SEQ_2x2x2 = (1.7 + 1.0) / 2


def t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def test_switch_loss_by_hand():
    probs, idx = t(PROBS_4x2), torch.tensor(IDX_4x1)
    assert switch_aux_loss(probs, idx).item() == pytest.approx(SWITCH_4x2, abs=1e-6)
    assert ref_switch_loss(t(PROBS_4x2, torch.float64), idx).item() == pytest.approx(SWITCH_4x2, abs=1e-12)
    # top-2 of 4: counts (2, 1, 1, 0) over T*K = 4 assignments -> f = (.5, .25, .25, 0);
    # P = (.45, .2, .25, .1): 4 * (.225 + .05 + .0625) = 1.35
    probs = t([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]], torch.float64)
    idx = torch.tensor([[0, 1], [0, 2]])
    assert switch_aux_loss(probs.float(), idx).item() == pytest.approx(1.35, abs=1e-6)
    assert ref_switch_loss(probs, idx).item() == pytest.approx(1.35, abs=1e-12)


def test_switch_loss_uniform_is_one_and_collapse_is_E():
    for E, K, T in [(2, 1, 4), (4, 2, 6), (8, 2, 8)]:
        probs = torch.full((T, E), 1.0 / E)
        idx = (torch.arange(T * K) % E).view(T, K)  # every expert gets T*K/E assignments
        assert switch_aux_loss(probs, idx).item() == pytest.approx(1.0, abs=1e-6)
        # everything on expert 0 with probability 1: E * 1 * 1
        probs = torch.zeros(T, E)
        probs[:, 0] = 1.0
        assert switch_aux_loss(probs, torch.zeros(T, 1, dtype=torch.long)).item() == pytest.approx(E, abs=1e-6)


def test_seq_loss_by_hand():
    probs, idx = t(PROBS_4x2).view(2, 2, 2), torch.tensor(IDX_4x1).view(2, 2, 1)
    assert seq_aux_loss(probs, idx).item() == pytest.approx(SEQ_2x2x2, abs=1e-6)
    assert ref_seq_loss(t(PROBS_4x2, torch.float64).view(2, 2, 2), idx).item() == pytest.approx(SEQ_2x2x2, abs=1e-12)
    # one sequence: the Switch loss
    assert seq_aux_loss(probs.view(1, 4, 2), idx.view(1, 4, 1)).item() == pytest.approx(SWITCH_4x2, abs=1e-6)


def test_z_loss_by_hand():
    # logsumexp: [0, 0] -> ln 2;  [ln 3, 0] -> ln 4;  [1, 1] -> 1 + ln 2
    logits = t([[0.0, 0.0], [math.log(3.0), 0.0], [1.0, 1.0]], torch.float64)
    ln2 = math.log(2.0)
    expected = (ln2**2 + (2 * ln2) ** 2 + (1 + ln2) ** 2) / 3
    assert router_z_loss(logits.float()).item() == pytest.approx(expected, rel=1e-6)
    assert ref_z_loss(logits).item() == pytest.approx(expected, rel=1e-12)
    # large logits: no overflow
    big = t([[100.0, 100.0]])
    assert router_z_loss(big).item() == pytest.approx((100 + ln2) ** 2, rel=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("E,K,B,S", [(8, 2, 3, 16), (4, 1, 2, 5), (16, 4, 1, 32)])
def test_losses_match_reference_random(seed, E, K, B, S):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, E, generator=g) * 2
    probs = logits.softmax(-1)
    idx = torch.rand(B, S, E, generator=g).argsort(-1)[..., :K]
    T = B * S
    torch.testing.assert_close(switch_aux_loss(probs.view(T, E), idx.view(T, K)).double(),
                               ref_switch_loss(probs.view(T, E), idx.view(T, K)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seq_aux_loss(probs, idx).double(), ref_seq_loss(probs, idx), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(router_z_loss(logits.view(T, E)).double(), ref_z_loss(logits.view(T, E)),
                               rtol=1e-5, atol=1e-6)


def _hand_layer(cfg: MoEConfig) -> tuple[MoE, torch.Tensor]:
    """2 experts, top-1, dim 2. Token t = (1, c_t), router logits (c_t, 0): softmax probs = PROBS_4x2."""
    layer = MoE(2, cfg).eval()
    with torch.no_grad():
        layer.router.weight.copy_(t([[0.0, 1.0], [0.0, 0.0]]))
    c = [math.log(p / (1 - p)) for p, _ in PROBS_4x2]
    x = t([[1.0, ci] for ci in c]).view(2, 2, 2)  # 2 sequences of 2 tokens
    return layer, x


def test_layer_losses_by_hand():
    cfg = MoEConfig(n_experts=2, top_k=1, expert_ffn_dim=4, aux_loss_coef=0.01, seq_aux_loss_coef=0.1,
                    z_loss_coef=0.001)
    layer, x = _hand_layer(cfg)
    with torch.no_grad():
        res = layer(x)
    assert res.stats.routed_per_expert.tolist() == [3.0, 1.0]
    assert res.stats.lb_loss.item() == pytest.approx(SWITCH_4x2, abs=1e-6)
    assert res.aux_loss.item() == pytest.approx(0.01 * SWITCH_4x2 + 0.1 * SEQ_2x2x2, abs=1e-7)
    # logits (ln(p/(1-p)), 0): logsumexp = ln(1/(1-p)) for p = .9, .8, .3, .6
    z = sum(math.log(1 / (1 - p)) ** 2 for p, _ in PROBS_4x2) / 4
    assert res.z_loss.item() == pytest.approx(0.001 * z, rel=1e-5)
    # a 2-D input is one sequence: the sequence loss equals the Switch loss
    with torch.no_grad():
        res2 = layer(x.view(4, 2))
    assert res2.aux_loss.item() == pytest.approx((0.01 + 0.1) * SWITCH_4x2, abs=1e-7)
    # coefficient 0 disables a loss
    layer0, _ = _hand_layer(MoEConfig(n_experts=2, top_k=1, expert_ffn_dim=4, aux_loss_coef=0.0))
    with torch.no_grad():
        layer0.router.weight.copy_(layer.router.weight)
        r0 = layer0(x)
    assert r0.aux_loss.item() == 0.0 and r0.z_loss.item() == 0.0
    assert r0.stats.lb_loss.item() == pytest.approx(SWITCH_4x2, abs=1e-6)  # still logged


LAYER_CASES = {
    "softmax": dict(),
    "sigmoid-normalised-probs": dict(score_func="sigmoid"),
    "expert_bias-groups": dict(score_func="sigmoid", expert_bias=True, n_groups=2, routed_scaling_factor=2.5),
    "mixtral-k1": dict(softmax_after_topk=True, top_k=1),
    "capacity": dict(capacity_factor=0.75),  # losses use the router's choice, before capacity
}


def _random_layer(cfg: MoEConfig, seed: int, dim: int = 8) -> MoE:
    g = torch.Generator().manual_seed(seed)
    layer = MoE(dim, cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.randn(cfg.n_experts, generator=g) * 0.05)
    return layer


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_losses_match_reference(case, seed):
    cfg = MoEConfig(n_experts=4, expert_ffn_dim=6, aux_loss_coef=0.01, seq_aux_loss_coef=0.003, z_loss_coef=1e-3,
                    **{"top_k": 2, **LAYER_CASES[case]})
    layer = _random_layer(cfg, seed)
    x = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        res = layer(x)
    ref = ref_moe(x, state_dict64(layer), cfg)
    assert ref.seq_loss.item() != pytest.approx(ref.lb_loss.item(), abs=1e-4)  # the two losses really differ
    torch.testing.assert_close(res.stats.lb_loss.double(), ref.lb_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.aux_loss.double(), 0.01 * ref.lb_loss + 0.003 * ref.seq_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.z_loss.double(), 1e-3 * ref.raw_z_loss, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(res.aux_loss.double(), ref.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.z_loss.double(), ref.z_loss, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("coefs", [dict(aux_loss_coef=1.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0),
                                   dict(aux_loss_coef=0.0, seq_aux_loss_coef=1.0, z_loss_coef=0.0),
                                   dict(aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=1.0)])
def test_each_loss_is_differentiable_wrt_router_weight(coefs):
    cfg = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=6, **coefs)
    layer = _random_layer(cfg, 0)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    res = layer(x)
    (res.aux_loss + res.z_loss).backward()
    grad = layer.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 1e-4
    assert layer.experts.w_in.grad is None  # the losses only reach the router


@pytest.mark.parametrize("opts", [dict(), dict(score_func="sigmoid", expert_bias=True)])
def test_loss_gradient_matches_finite_differences_of_reference(opts):
    """d(aux + z)/dW from autograd == central differences of the float64 reference loss (f is constant
    under a tiny perturbation: the chosen experts do not change)."""
    cfg = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=6, aux_loss_coef=0.3, seq_aux_loss_coef=0.7,
                    z_loss_coef=0.05, **opts)
    dim = 5
    layer = _random_layer(cfg, 2, dim=dim)
    x = torch.randn(2, 6, dim, generator=torch.Generator().manual_seed(3))
    res = layer(x)
    (res.aux_loss + res.z_loss).backward()
    grad = layer.router.weight.grad.double()
    sd = state_dict64(layer)
    num = torch.zeros_like(grad)
    h = 1e-6
    base_idx = ref_moe(x, sd, cfg).routing.topk_idx
    for i in range(grad.shape[0]):
        for j in range(grad.shape[1]):
            vals = []
            for sgn in (1, -1):
                sdp = dict(sd)
                sdp["router.weight"] = sd["router.weight"].clone()
                sdp["router.weight"][i, j] += sgn * h
                r = ref_moe(x, sdp, cfg)
                assert torch.equal(r.routing.topk_idx, base_idx)
                vals.append(r.aux_loss + r.z_loss)
            num[i, j] = (vals[0] - vals[1]) / (2 * h)
    assert num.abs().max() > 1e-3
    torch.testing.assert_close(grad, num, rtol=1e-3, atol=1e-5)
