"""The router against the independent float64 reference (tests/reference.py), option by option.

Also: hand-built group-scoring cases, the selection-only expert bias and its update rule (with a
balancing simulation), fp32 router math under bf16, training-only jitter / logit noise, and the
model-level shared router.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import ref_bias_update, ref_moe, ref_routing, state_dict64

from moekit.config import ModelConfig, MoEConfig
from moekit.layer.moe import MoE
from moekit.layer.router import Router, softmax_last
from moekit.model.transformer import Transformer

SEEDS = (0, 1, 2)
D = 12


def make_router(cfg: MoEConfig, seed: int, dim: int = D, w_std: float = 1.0, eb_std: float = 0.05) -> Router:
    """A router with spread-out random logits (std ~ w_std * sqrt(dim)) and random biases."""
    g = torch.Generator().manual_seed(1000 + seed)
    r = Router(dim, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, generator=g) * w_std / math.sqrt(dim))
        if r.bias is not None:
            r.bias.copy_(torch.randn(cfg.n_experts, generator=g) * 0.5)
        if r.expert_bias is not None:
            r.expert_bias.copy_(torch.randn(cfg.n_experts, generator=g) * eb_std)
    return r.eval()


def rand_x(seed: int, T: int = 64, dim: int = D) -> torch.Tensor:
    return torch.randn(T, dim, generator=torch.Generator().manual_seed(seed)) * 2.0


def ref_of(router: Router, x: torch.Tensor, cfg: MoEConfig, **kw):
    return ref_routing(x, router.weight, router.bias, router.expert_bias, cfg, **kw)


def assert_matches_ref(res, ref, weight_tol: float = 2e-6) -> None:
    assert res.topk_idx_TK.dtype == torch.int64
    assert torch.equal(res.topk_idx_TK, ref.topk_idx), "chosen experts differ from the float64 reference"
    for name in ("topk_weight_TK", "logits_TE", "scores_TE", "weight_scale_T"):
        assert getattr(res, name).dtype == torch.float32, name
    torch.testing.assert_close(res.topk_weight_TK.double(), ref.topk_weight, rtol=weight_tol, atol=weight_tol)
    torch.testing.assert_close(res.logits_TE.double(), ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.scores_TE.double(), ref.scores, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(res.weight_scale_T.double(), ref.weight_scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.probs_TE.double(), ref.probs, rtol=2e-6, atol=2e-6)
    inf_core, inf_ref = torch.isinf(res.choice_TE), torch.isinf(ref.choice)
    assert torch.equal(inf_core, inf_ref), "group mask differs from the reference"
    torch.testing.assert_close(res.choice_TE.double()[~inf_ref], ref.choice[~inf_ref], rtol=2e-6, atol=2e-6)


ROUTER_OPTIONS = {
    "softmax-norm": dict(),
    "softmax-nonorm": dict(norm_topk_prob=False),
    "softmax-k1": dict(top_k=1),
    "softmax-k3-nonorm": dict(top_k=3, norm_topk_prob=False),
    "mixtral-softmax_after_topk": dict(softmax_after_topk=True),
    "softmax_after_topk-nonorm-flag": dict(softmax_after_topk=True, norm_topk_prob=False),
    "sigmoid-norm": dict(score_func="sigmoid"),
    "sigmoid-nonorm": dict(score_func="sigmoid", norm_topk_prob=False),
    "sigmoid-k1": dict(score_func="sigmoid", top_k=1),
    "scaling-softmax": dict(routed_scaling_factor=2.5, norm_topk_prob=False),
    "scaling-after-topk": dict(routed_scaling_factor=1.7, softmax_after_topk=True),
    "router_bias": dict(router_bias=True),
    "expert_bias-softmax": dict(expert_bias=True),
    "expert_bias-after-topk": dict(expert_bias=True, softmax_after_topk=True),
    "groups-top2sum": dict(n_groups=4, topk_groups=2, group_score="top2_sum"),
    "groups-max": dict(n_groups=4, topk_groups=2, group_score="max", top_k=3),
    "groups-one-group": dict(n_groups=2, topk_groups=1, group_score="max"),
    "deepseek-v3": dict(score_func="sigmoid", n_groups=4, topk_groups=2, group_score="top2_sum",
                        expert_bias=True, routed_scaling_factor=2.5, top_k=3),
    "deepseek-v2": dict(n_groups=4, topk_groups=3, group_score="max", norm_topk_prob=False,
                        routed_scaling_factor=16.0, top_k=3),
    "everything-sigmoid": dict(score_func="sigmoid", router_bias=True, expert_bias=True, n_groups=2,
                               topk_groups=1, group_score="max", routed_scaling_factor=0.5),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(ROUTER_OPTIONS))
def test_router_matches_reference(name, seed):
    cfg = MoEConfig(n_experts=8, **{"top_k": 2, **ROUTER_OPTIONS[name]})
    router = make_router(cfg, seed)
    x = rand_x(seed)
    with torch.no_grad():
        res = router(x)
    assert_matches_ref(res, ref_of(router, x, cfg))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("expert_bias", [False, True])
def test_softmax_after_topk_equals_renormalised_topk_on_probs(seed, expert_bias):
    """Mixtral's softmax over the chosen logits == top-k on probs then renormalise (mathematically equal)."""
    a = MoEConfig(n_experts=8, top_k=2, softmax_after_topk=True, expert_bias=expert_bias)
    b = MoEConfig(n_experts=8, top_k=2, softmax_after_topk=False, norm_topk_prob=True, expert_bias=expert_bias)
    ra, rb = make_router(a, seed), make_router(b, seed)
    rb.load_state_dict(ra.state_dict())
    x = rand_x(seed)
    with torch.no_grad():
        oa, ob = ra(x), rb(x)
    assert torch.equal(oa.topk_idx_TK, ob.topk_idx_TK)
    torch.testing.assert_close(oa.topk_weight_TK, ob.topk_weight_TK, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(oa.weight_scale_T, ob.weight_scale_T, rtol=1e-5, atol=1e-6)
    # without renormalisation the top-k-on-probs weights are the raw probabilities: not equal
    c = MoEConfig(n_experts=8, top_k=2, norm_topk_prob=False, expert_bias=expert_bias)
    rc = make_router(c, seed)
    rc.load_state_dict(ra.state_dict())
    with torch.no_grad():
        oc = rc(x)
    assert torch.equal(oa.topk_idx_TK, oc.topk_idx_TK)
    assert (oc.topk_weight_TK.sum(-1) < 0.999).all()
    torch.testing.assert_close(oa.topk_weight_TK.sum(-1), torch.ones(len(x)))


def test_renormalise_and_scaling_by_hand():
    """One token, 4 experts with softmax probs (0.4, 0.3, 0.2, 0.1), k=2."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    x = torch.ones(1, 1)
    for norm, scale, expected in [(True, 1.0, [4 / 7, 3 / 7]), (False, 1.0, [0.4, 0.3]),
                                  (True, 2.5, [10 / 7, 7.5 / 7]), (False, 2.5, [1.0, 0.75])]:
        cfg = MoEConfig(n_experts=4, top_k=2, norm_topk_prob=norm, routed_scaling_factor=scale)
        r = Router(1, cfg).eval()
        with torch.no_grad():
            r.weight.copy_(probs.log().float()[:, None])
            res = r(x)
        assert res.topk_idx_TK.tolist() == [[0, 1]]
        torch.testing.assert_close(res.topk_weight_TK.double(), torch.tensor([expected], dtype=torch.float64))
        # weight(t, e) = scores[t, e] * weight_scale[t] for the chosen and the unchosen experts alike
        torch.testing.assert_close((res.scores_TE * res.weight_scale_T[:, None])[:, :2], res.topk_weight_TK)


def _sigmoid_router(scores: list[list[float]], cfg: MoEConfig) -> tuple[Router, torch.Tensor]:
    """A dim-1 router whose sigmoid scores for input 1.0 are exactly the given per-expert values."""
    r = Router(1, cfg).eval()
    with torch.no_grad():
        s = torch.tensor(scores[0], dtype=torch.float64)
        r.weight.copy_(torch.log(s / (1 - s)).float()[:, None])
    return r, torch.ones(1, 1)


def test_group_score_top2_sum_vs_max_by_hand():
    """Groups {0,1}: scores (0.9, 0.05); {2,3}: (0.6, 0.55). max picks group 0, top2_sum picks group 1."""
    scores = [[0.9, 0.05, 0.6, 0.55]]
    for group_score, expected in [("max", [0, 1]), ("top2_sum", [2, 3])]:
        cfg = MoEConfig(n_experts=4, top_k=2, score_func="sigmoid", n_groups=2, topk_groups=1,
                        group_score=group_score)
        r, x = _sigmoid_router(scores, cfg)
        with torch.no_grad():
            res = r(x)
        assert res.topk_idx_TK.tolist() == [expected], group_score
        s = torch.tensor(scores[0])[expected]
        torch.testing.assert_close(res.topk_weight_TK[0], s / s.sum())
    # without groups: the plain top-2 is {0, 2}
    r, x = _sigmoid_router(scores, MoEConfig(n_experts=4, top_k=2, score_func="sigmoid"))
    with torch.no_grad():
        assert r(x).topk_idx_TK.tolist() == [[0, 2]]


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_group_limit_restricts_and_is_not_vacuous(group_score):
    cfg = MoEConfig(n_experts=8, top_k=3, n_groups=4, topk_groups=2, group_score=group_score)
    plain = MoEConfig(n_experts=8, top_k=3)
    r = make_router(cfg, 0)
    rp = make_router(plain, 0)
    rp.load_state_dict(r.state_dict())
    x = rand_x(0, T=256)
    with torch.no_grad():
        idx, idx_plain = r(x).topk_idx_TK, rp(x).topk_idx_TK
    groups_used = torch.stack([(idx // 2 == g).any(-1) for g in range(4)], -1).sum(-1)
    assert (groups_used <= 2).all()
    assert (idx != idx_plain).any(-1).sum() >= 10, "group-limited routing should change some choices"


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_expert_bias_changes_choice_not_weights(score_func):
    """The selection bias picks experts; the weights are the UNBIASED scores of those experts."""
    cfg = MoEConfig(n_experts=8, top_k=2, score_func=score_func, expert_bias=True)
    r = make_router(cfg, 3)
    x = rand_x(3, T=128)
    with torch.no_grad():
        r.expert_bias.zero_()
        base = r(x)
        r.expert_bias[5] = 10.0  # expert 5 becomes everybody's choice
        biased = r(x)
    assert (biased.topk_idx_TK[:, 0] == 5).all()
    assert (base.topk_idx_TK != 5).all(-1).sum() > 32, "the bias should change many choices"
    torch.testing.assert_close(biased.scores_TE, base.scores_TE)  # scores never see the bias
    chosen = base.scores_TE.gather(1, biased.topk_idx_TK)
    torch.testing.assert_close(biased.topk_weight_TK, chosen / chosen.sum(-1, keepdim=True))
    assert (biased.topk_weight_TK[:, 0] < 0.9).any()  # (a biased score would give ~1 to expert 5)
    assert_matches_ref(biased, ref_of(r, x, cfg))


def test_router_bias_is_added_to_logits():
    cfg = MoEConfig(n_experts=8, top_k=2, router_bias=True)
    r = make_router(cfg, 4)
    x = rand_x(4)
    with torch.no_grad():
        with_bias = r(x)
        b = r.bias.clone()
        r.bias.zero_()
        without = r(x)
    torch.testing.assert_close(with_bias.logits_TE - without.logits_TE, b.expand(len(x), -1))
    assert (with_bias.topk_idx_TK != without.topk_idx_TK).any()


@pytest.mark.parametrize("opts", [dict(), dict(score_func="sigmoid", expert_bias=True, n_groups=2, router_bias=True)])
def test_router_math_in_fp32_under_bf16(opts):
    cfg = MoEConfig(n_experts=8, top_k=2, **opts)
    r32 = make_router(cfg, 5)
    rbf = make_router(cfg, 5).to(torch.bfloat16)
    assert rbf.weight.dtype == torch.bfloat16
    if rbf.expert_bias is not None:
        assert rbf.expert_bias.dtype == torch.float32  # the balancing bias stays fp32
    with torch.no_grad():
        r32.weight.copy_(rbf.weight.float())
        if r32.bias is not None:
            r32.bias.copy_(rbf.bias.float())
    x = rand_x(5).to(torch.bfloat16)
    with torch.no_grad():
        res = rbf(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res_ac = rbf(x)
        ref32 = r32(x.float())
    for out in (res, res_ac):
        for name in ("topk_weight_TK", "logits_TE", "scores_TE", "choice_TE", "weight_scale_T"):
            assert getattr(out, name).dtype == torch.float32, name
            torch.testing.assert_close(getattr(out, name), getattr(ref32, name), rtol=0, atol=0)
        assert torch.equal(out.topk_idx_TK, ref32.topk_idx_TK)
    assert_matches_ref(res, ref_of(r32, x.float(), cfg))


def test_input_jitter_only_in_training():
    """dim 1: logits = u_t * x_t * w_e, so the jitter u_t is recoverable and must lie in [1-eps, 1+eps]."""
    eps = 0.2
    cfg = MoEConfig(n_experts=4, top_k=2, input_jitter_eps=eps)
    r = Router(1, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0], [-0.5], [0.25], [2.0]]))
    x = rand_x(6, T=2000, dim=1) + 0.1
    r.eval()
    with torch.no_grad():
        e1, e2 = r(x), r(x)
    assert torch.equal(e1.logits_TE, e2.logits_TE)
    assert_matches_ref(e1, ref_of(r, x, cfg))
    r.train()
    with torch.no_grad():
        torch.manual_seed(11)
        t1 = r(x)
        torch.manual_seed(11)
        t1b = r(x)
        torch.manual_seed(12)
        t2 = r(x)
    assert torch.equal(t1.logits_TE, t1b.logits_TE)  # seeded: reproducible
    assert not torch.equal(t1.logits_TE, t2.logits_TE)
    assert not torch.equal(t1.logits_TE, e1.logits_TE)
    u = (t1.logits_TE.double() / (x.double() * r.weight.double().T))  # [T, E]: the same u per token
    torch.testing.assert_close(u, u[:, :1].expand_as(u), rtol=1e-5, atol=1e-5)
    u = u[:, 0]
    assert (u >= 1 - eps - 1e-5).all() and (u <= 1 + eps + 1e-5).all()
    assert abs(u.mean().item() - 1.0) < 0.01 and abs(u.std().item() - eps / math.sqrt(3)) < 0.01  # uniform
    assert_matches_ref(t1, ref_of(r, x, cfg, jitter_TD=u[:, None]))


def test_logit_noise_only_in_training():
    std = 0.5
    cfg = MoEConfig(n_experts=8, top_k=2, logit_noise_std=std, score_func="sigmoid")
    r = make_router(cfg, 7)
    x = rand_x(7, T=1000)
    with torch.no_grad():
        e1, e2 = r(x), r(x)
        assert torch.equal(e1.topk_weight_TK, e2.topk_weight_TK) and torch.equal(e1.topk_idx_TK, e2.topk_idx_TK)
        assert_matches_ref(e1, ref_of(r, x, cfg))
        r.train()
        torch.manual_seed(3)
        t1 = r(x)
        torch.manual_seed(3)
        t1b = r(x)
        t2 = r(x)
    assert torch.equal(t1.logits_TE, t1b.logits_TE)
    assert not torch.equal(t1.logits_TE, t2.logits_TE)
    noise = (t1.logits_TE - e1.logits_TE).double()
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - std) < 0.025
    assert (t1.topk_idx_TK != e1.topk_idx_TK).any()
    assert_matches_ref(t1, ref_of(r, x, cfg, noise_TE=noise), weight_tol=1e-5)


def test_noise_free_config_is_deterministic_in_training():
    cfg = MoEConfig(n_experts=8, top_k=2)
    r = make_router(cfg, 8).train()
    x = rand_x(8)
    with torch.no_grad():
        torch.manual_seed(0)
        a = r(x)
        torch.manual_seed(1)
        b = r(x)
    assert torch.equal(a.logits_TE, b.logits_TE)


# ---------------------------------------------------------------------------------------------- bias update
def test_update_bias_rule_exact():
    cfg = MoEConfig(n_experts=4, top_k=1, expert_bias=True, bias_update_rate=0.125)
    r = Router(8, cfg)
    load = torch.tensor([10.0, 2.0, 5.0, 3.0])  # mean 5: overloaded, under, exactly mean, under
    r.update_bias(load)
    assert r.expert_bias.tolist() == [-0.125, 0.125, 0.0, 0.125]
    r.update_bias(load)
    r.update_bias(torch.tensor([1, 1, 1, 9]))  # int loads are fine too (mean 3)
    assert r.expert_bias.tolist() == [-0.125, 0.375, 0.125, 0.125]
    assert r.expert_bias.dtype == torch.float32
    # against the reference with a non-representable rate
    cfg = MoEConfig(n_experts=6, top_k=2, expert_bias=True, bias_update_rate=1e-3)
    r = make_router(cfg, 0)
    b0 = r.expert_bias.clone()
    load = torch.tensor([7.0, 0.0, 3.0, 3.0, 12.0, 5.0])
    r.update_bias(load)
    torch.testing.assert_close(r.expert_bias.double(), ref_bias_update(b0, load, 1e-3), rtol=0, atol=1e-7)
    delta = (r.expert_bias - b0).double()
    assert (delta[[0, 4]] < 0).all() and (delta[[1, 2, 3]] > 0).all() and delta[5] == 0


def test_update_bias_without_expert_bias_raises():
    with pytest.raises(ValueError, match="expert_bias"):
        Router(4, MoEConfig(n_experts=4, top_k=1)).update_bias(torch.ones(4))


def test_bias_update_balances_a_skewed_router():
    """Aux-loss-free balancing: routing a fixed batch with a router that favours expert 0 and updating the
    bias with the observed load drives max/mean load towards 1."""
    E, K, T, dim = 8, 2, 256, 8
    cfg = MoEConfig(n_experts=E, top_k=K, expert_ffn_dim=4, score_func="sigmoid", expert_bias=True,
                    bias_update_rate=0.01, backend="loop")
    layer = MoE(dim, cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, dim, generator=g)
    x[:, 0] = x[:, 0].abs() + 1.0  # a shared feature ...
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, dim, generator=g) * 0.3)
        layer.router.weight[0, 0] = 3.0  # ... that expert 0 loves and expert 1 likes
        layer.router.weight[1, 0] = 1.0
    imbalance = []
    with torch.no_grad():
        for _ in range(300):
            st = layer(x).stats
            load = st.routed_per_expert
            assert load.sum().item() == T * K
            imbalance.append((load.max() / load.mean()).item())
            assert abs(st.load_imbalance.item() - imbalance[-1]) < 1e-6
            layer.router.update_bias(load)
    assert imbalance[0] > 3.0, imbalance[0]  # starts very skewed (expert 0 takes almost every token)
    final = sum(imbalance[-20:]) / 20
    assert final < 1.4, final
    assert final < 0.4 * imbalance[0]


# ---------------------------------------------------------------------------------------------- shared router
def test_shared_router_is_one_module_for_all_moe_layers():
    moe = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=8, shared_router=True, expert_bias=True)
    cfg = ModelConfig(vocab_size=31, dim=16, n_layers=3, n_heads=2, ffn_dim=24, max_seq_len=8, moe=moe)
    model = Transformer(cfg).eval()
    unshared = Transformer(ModelConfig(**{**cfg.to_dict(), "moe": {**cfg.to_dict()["moe"], "shared_router": False}}))
    layers = model.moe_layers
    assert len(layers) == 3
    assert all(m.router is layers[0].router for m in layers)
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in unshared.parameters()) - n_params == 2 * 4 * 16
    assert sum(p is layers[0].router.weight for p in model.parameters()) == 1
    # every layer routes with the shared parameters: check each layer's routing against the reference
    seen = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out))) for m in layers[:1]]
    ids = torch.randint(0, 31, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layers[0].router.weight.normal_(0, 1.0)
        out = model(ids)
    for h in hooks:
        h.remove()
    assert len(seen) == 3  # the single router module ran once per MoE layer
    for x_TD, res in seen:
        r = layers[0].router
        assert_matches_ref(res, ref_routing(x_TD, r.weight, r.bias, r.expert_bias, moe))
    # gradients from every layer accumulate in the one weight
    model.train()
    loss = model(ids, targets=ids).loss
    loss.backward()
    assert layers[0].router.weight.grad is not None and layers[0].router.weight.grad.abs().sum() > 0
    # the bias rule sees the load summed over layers
    loads = [s.routed_per_expert for s in out.stats if s is not None]
    b0 = layers[0].router.expert_bias.clone()
    model.update_router_biases(loads)
    expected = ref_bias_update(b0, torch.stack(loads).sum(0), moe.bias_update_rate)
    torch.testing.assert_close(layers[0].router.expert_bias.double(), expected, rtol=0, atol=1e-7)


def test_state_dict64_roundtrip_smoke():
    cfg = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=8, expert_bias=True, router_bias=True)
    sd = state_dict64(MoE(6, cfg))
    assert sd["router.weight"].dtype == torch.float64 and "router.expert_bias" in sd and "router.bias" in sd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_expert_bias_keeps_exact_fp32_values_across_dtype_casts(dtype):
    """Small bias-rule updates (rate 1e-3 on top of 0.5) must survive model.to(dtype): not a bf16 round trip."""
    cfg = MoEConfig(n_experts=4, top_k=1, expert_bias=True, bias_update_rate=1e-3)
    r = Router(4, cfg)
    with torch.no_grad():
        r.expert_bias.fill_(0.5)
    r.update_bias(torch.tensor([0.0, 1.0, 1.0, 2.0]))
    before = r.expert_bias.clone()
    assert before[0].item() != 0.5
    r = r.to(dtype)
    assert r.weight.dtype == dtype
    assert r.expert_bias.dtype == torch.float32
    assert torch.equal(r.expert_bias, before)
    assert torch.equal(r.float().expert_bias, before)


def _layer_router_outputs(layer: MoE):
    seen = []
    layer.router.register_forward_hook(lambda mod, inp, out: seen.append(out))
    return seen


def test_layer_training_noise_reaches_only_the_router():
    """In a training-mode MoE layer the jitter multiplies the ROUTER input only (the experts see x) and the
    logit noise only moves the routing: the layer equals the reference given the same draws."""
    dim = 1  # logits = u_t * x_t * w_e: the jitter draw u is recoverable
    cfg = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=4, input_jitter_eps=0.3, backend="loop")
    layer = MoE(dim, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 16, dim, generator=g)
    seen = _layer_router_outputs(layer)
    layer.train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = layer(x).out
    u = seen[-1].logits_TE.double() / (x.reshape(-1, 1).double() * layer.router.weight.double().T)
    u = u[:, :1]
    assert (u - 1).abs().max() > 0.05  # the jitter did something
    ref = ref_moe(x, state_dict64(layer), cfg, jitter_TD=u)
    torch.testing.assert_close(out.double(), ref.out, rtol=1e-4, atol=1e-5)
    # logit noise, a wider layer
    cfg = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=4, logit_noise_std=1.0, backend="loop")
    layer = MoE(8, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 16, 8, generator=g)
    seen = _layer_router_outputs(layer)
    with torch.no_grad():
        clean = layer.eval()(x).out
        torch.manual_seed(1)
        noisy = layer.train()(x).out
    noise = (seen[1].logits_TE - seen[0].logits_TE).double()
    assert not torch.allclose(clean, noisy)
    torch.testing.assert_close(clean.double(), ref_moe(x, state_dict64(layer), cfg).out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(noisy.double(), ref_moe(x, state_dict64(layer), cfg, noise_TE=noise).out,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_experts", [1, 3, 8, 15, 16, 40])
def test_softmax_last_equals_torch_softmax_with_gradients(n_experts):
    """The router's softmax (explicit form below 16 experts on the CPU) against torch.softmax, values and
    gradients, including rows far from zero; gradcheck in float64."""
    gen = torch.Generator().manual_seed(n_experts)
    logits = torch.randn(33, n_experts, generator=gen, dtype=torch.float64) * 5
    logits[0] += 800.0  # exp would overflow without the max shift
    logits[1] -= 800.0
    logits.requires_grad_()
    g = torch.randn(33, n_experts, generator=gen, dtype=torch.float64)
    ours = softmax_last(logits)
    (ours * g).sum().backward()
    grad, logits.grad = logits.grad, None
    ref = torch.softmax(logits, -1)
    (ref * g).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-10, atol=1e-13)
    assert torch.autograd.gradcheck(softmax_last, (logits[:5].detach().clone().requires_grad_(),))
