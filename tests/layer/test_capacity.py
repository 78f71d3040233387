"""Expert capacity: the formula, hand-built drop / reroute cases with known outcomes, and random-input
agreement of the whole capacity path with the float64 reference, for every backend."""

from __future__ import annotations

import math

import pytest
import torch
from reference import ref_capacity_of, ref_ffn, ref_moe, state_dict64

from moekit.config import MoEConfig
from moekit.layer.dispatch import plan_dispatch
from moekit.layer.moe import MoE

BACKENDS = ("loop", "grouped", "padded")
SEEDS = (0, 1, 2)


@pytest.mark.parametrize("cf,T,k,E,C", [
    (1.0, 16, 2, 8, 4), (1.25, 16, 2, 8, 5), (1.5, 10, 3, 7, 7),  # ceil(45/7 = 6.43)
    (2.0, 3, 1, 4, 2), (0.01, 4, 1, 8, 1),  # at least one slot
    (1.1, 50, 2, 2, 55), (1.1, 50, 4, 4, 55), (1.1, 90, 2, 2, 99),  # float rounding would give 56, 56, 100
])
def test_capacity_formula(cf, T, k, E, C):
    cfg = MoEConfig(n_experts=E, top_k=k, capacity_factor=cf)
    assert cfg.capacity(T) == C
    assert ref_capacity_of(cfg, T) == C


# ---------------------------------------------------------------------------------------------- hand-built
# dim 4, 4 experts. Token t = (a_t, c_t, 1, 0); router rows: e0 = (1,0,0,0), e1 = (0,1,0,0), e2 = (0,-1,0,0),
# e3 = (0,0,-5,0)
# -> logits (a_t, c_t, -c_t, -5). a_t >= 2.5 > |c_t| = 1: expert 0 is everybody's first choice; the second
# choice is e1 when c_t = 1, else e2; e3 is last. Softmax scores are written out below with math.exp.
ROUTER_W = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -5.0, 0.0]]


def hand_scores(a: list[float], c: list[float]) -> list[list[float]]:
    out = []
    for ai, ci in zip(a, c, strict=True):
        z = [math.exp(ai), math.exp(ci), math.exp(-ci), math.exp(-5.0)]
        out.append([v / sum(z) for v in z])
    return out


def hand_layer(cfg: MoEConfig, a: list[float], c: list[float]) -> tuple[MoE, torch.Tensor]:
    layer = MoE(4, cfg).eval()  # (widths multiple of 4 floats: grouped_mm strides)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor(ROUTER_W))
        layer.experts.w_in.copy_(torch.randn(layer.experts.w_in.shape, generator=g))
        layer.experts.w_out.copy_(torch.randn(layer.experts.w_out.shape, generator=g))
    x = torch.tensor([[ai, ci, 1.0, 0.0] for ai, ci in zip(a, c, strict=True)])
    return layer, x


def expected_out(layer: MoE, x: torch.Tensor, table: list[list[tuple[int, float]]]) -> torch.Tensor:
    """sum over a token's kept (expert, weight) pairs of weight * expert(x_t); nothing for dropped pairs."""
    w_in, w_out = layer.experts.w_in.double(), layer.experts.w_out.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, pairs in enumerate(table):
        for e, w in pairs:
            out[t] += w * ref_ffn(x[t], w_in[e], w_out[e], layer.config.activation)
    return out


def check_layer(layer: MoE, x: torch.Tensor, table, capacity: int, routed: list[float]) -> None:
    """The layer output, its stats and its dispatch plan agree with the hand table of kept (expert, weight)."""
    cfg = layer.config
    T, K = x.shape[0], cfg.top_k
    with torch.no_grad():
        res = layer(x)
        plan = plan_dispatch(layer.router(x), cfg)
    torch.testing.assert_close(res.out.double(), expected_out(layer, x, table), rtol=1e-5, atol=1e-5)
    n_kept = sum(len(p) for p in table)
    tpe = [0.0] * cfg.n_experts
    for pairs in table:
        for e, _ in pairs:
            tpe[e] += 1
    assert res.stats.tokens_per_expert.tolist() == tpe
    assert max(tpe) <= capacity and plan.capacity == capacity
    assert res.stats.routed_per_expert.tolist() == routed
    assert res.stats.dropped_frac.item() == pytest.approx(1 - n_kept / (T * K), abs=1e-6)
    # per assignment: which (expert, weight) pairs the plan keeps
    kept_A = plan.slot_A[plan.inverse_A] >= 0
    expert_A = plan.expert_idx_A[plan.inverse_A]
    weight_A = plan.weight_A[plan.inverse_A]
    for t, pairs in enumerate(table):
        got = sorted((int(expert_A[t * K + k]), float(weight_A[t * K + k])) for k in range(K) if kept_A[t * K + k])
        want = sorted(pairs)
        assert [e for e, _ in got] == [e for e, _ in want], f"token {t}: kept experts"
        assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-5, abs=1e-7), f"token {t}: weights"
    assert (weight_A[~kept_A] == 0).all()
    # the reference, run on the same layer, reproduces the hand table too
    ref = ref_moe(x, state_dict64(layer), cfg)
    torch.testing.assert_close(ref.out, expected_out(layer, x, table), rtol=1e-10, atol=1e-10)


A6 = [3.0, 5.0, 4.0, 6.0, 2.5, 4.5]  # expert-0 logits; by score: t3 > t1 > t5 > t2 > t0 > t4
C6 = [1.0, -1.0, 1.0, 1.0, -1.0, 1.0]  # backup expert: e1 for c = 1, e2 for c = -1


def _k1_table(assign: dict[int, int]) -> list[list[tuple[int, float]]]:
    s = hand_scores(A6, C6)
    return [[(assign[t], s[t][assign[t]])] if t in assign else [] for t in range(6)]


# (capacity_factor, drop_policy, overflow_policy) -> kept {token: expert} (top-1: weight = that expert's score)
K1_CASES = {
    # C = ceil(1.0 * 6 * 1 / 4) = 2
    (1.0, "position", "drop"): {0: 0, 1: 0},  # the first two tokens keep expert 0
    (1.0, "probs", "drop"): {3: 0, 1: 0},  # the two highest expert-0 probabilities
    # dropped t2, t3, t5 -> e1 and t4 -> e2; e1 takes t2, t3 (first); t5 then gets e2 (its next free)
    (1.0, "position", "reroute"): {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2},
    # dropped t0, t2, t5 -> e1 and t4 -> e2; e1 takes the two highest e1 scores (t0, t2: lowest a); t5 -> e2
    (1.0, "probs", "reroute"): {3: 0, 1: 0, 0: 1, 2: 1, 4: 2, 5: 2},
    # C = ceil(0.5 * 6 / 4) = 1
    (0.5, "position", "drop"): {0: 0},
    # round 1: e1 <- t2 (first of t2, t3, t5), e2 <- t1 (first of t1, t4); round 2: e3 <- t3; t4, t5 dropped
    (0.5, "position", "reroute"): {0: 0, 2: 1, 1: 2, 3: 3},
    # e0 <- t3; round 1: e1 <- t0 (best e1 score), e2 <- t4 (a=2.5 beats t1's a=5); round 2: e3 <- t2 (a=4)
    (0.5, "probs", "reroute"): {3: 0, 0: 1, 4: 2, 2: 3},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(K1_CASES), ids=lambda c: "-".join(map(str, c)))
def test_hand_built_top1(case, backend):
    cf, drop, overflow = case
    cfg = MoEConfig(n_experts=4, top_k=1, expert_ffn_dim=4, capacity_factor=cf, drop_policy=drop,
                    overflow_policy=overflow, backend=backend)
    layer, x = hand_layer(cfg, A6, C6)
    C = {1.0: 2, 0.5: 1}[cf]
    check_layer(layer, x, _k1_table(K1_CASES[case]), C, routed=[6.0, 0.0, 0.0, 0.0])


A4 = [3.0, 5.0, 4.0, 6.0]
C4 = [1.0, 1.0, 1.0, -1.0]  # top-2: t0..t2 -> (e0, e1); t3 -> (e0, e2)


def _k2_table(assign: dict[tuple[int, int], int]) -> list[list[tuple[int, float]]]:
    """assign: (token, k) -> expert for the kept assignments. Weight = score(t, e) / (sum of the token's
    two ORIGINAL top-2 scores), for a rerouted assignment too."""
    s = hand_scores(A4, C4)
    second = [1, 1, 1, 2]
    table = []
    for t in range(4):
        denom = s[t][0] + s[t][second[t]]
        table.append([(e, s[t][e] / denom) for (tt, _), e in sorted(assign.items()) if tt == t])
    return table


# C = ceil(1.0 * 4 * 2 / 4) = 2
K2_CASES = {
    # e0: t0, t1 keep it (t2, t3 dropped); e1: t0, t1 (t2 dropped); e2: t3. t2 loses both experts, t3 keeps e2
    # at its original (not renormalised) weight.
    ("position", "drop"): {(0, 0): 0, (0, 1): 1, (1, 0): 0, (1, 1): 1, (3, 1): 2},
    # e0 by weight: t3 .993, t1 .982 | t2 .953, t0 .881 dropped; e1 by weight: t0 .119, t2 .047 | t1 .018 dropped
    ("probs", "drop"): {(3, 0): 0, (1, 0): 0, (0, 1): 1, (2, 1): 1, (3, 1): 2},
    # t2's two dropped assignments propose its two best free experts e2, e3; t3's dropped e0 proposes e3
    # (e1 is full, e2 is its own); e2 has room 1, e3 room 2: all accepted.
    ("position", "reroute"): {(0, 0): 0, (0, 1): 1, (1, 0): 0, (1, 1): 1, (2, 0): 2, (2, 1): 3,
                              (3, 0): 3, (3, 1): 2},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(K2_CASES), ids=lambda c: "-".join(c))
def test_hand_built_top2(case, backend):
    drop, overflow = case
    cfg = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=4, capacity_factor=1.0, drop_policy=drop,
                    overflow_policy=overflow, backend=backend)
    layer, x = hand_layer(cfg, A4, C4)
    check_layer(layer, x, _k2_table(K2_CASES[case]), 2, routed=[4.0, 3.0, 1.0, 0.0])


def test_dropped_token_keeps_its_residual_in_a_block():
    """A token whose every assignment is dropped gets a zero MoE output, so x + moe(x) is x."""
    cfg = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=4, capacity_factor=1.0)
    layer, x = hand_layer(cfg, A4, C4)
    with torch.no_grad():
        out = layer(x).out
    assert torch.equal(out[2], torch.zeros(4))  # t2 lost e0 and e1
    assert (out[[0, 1, 3]].abs().sum(-1) > 0).all()
    assert torch.equal((x + out)[2], x[2])


# ---------------------------------------------------------------------------------------------- random
def random_layer(cfg: MoEConfig, seed: int, dim: int = 8) -> MoE:
    g = torch.Generator().manual_seed(seed)
    layer = MoE(dim, cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.randn(cfg.n_experts, generator=g) * 0.05)
    return layer


def check_random(cfg: MoEConfig, seed: int, shape=(2, 12, 8)) -> tuple:
    layer = random_layer(cfg, seed, dim=shape[-1])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(50 + seed))
    with torch.no_grad():
        res = layer(x)
        plan = plan_dispatch(layer.router(x.reshape(-1, shape[-1])), cfg)
    ref = ref_moe(x, state_dict64(layer), cfg)
    d = ref.dispatch
    T, K = d.expert.shape
    C = cfg.capacity(T)
    assert C == d.capacity == ref_capacity_of(cfg, T) == plan.capacity
    # the plan, per assignment
    kept_A = (plan.slot_A[plan.inverse_A] >= 0).view(T, K)
    assert torch.equal(kept_A, d.kept)
    expert_TK = plan.expert_idx_A[plan.inverse_A].view(T, K)
    assert torch.equal(expert_TK[d.kept], d.expert[d.kept])
    torch.testing.assert_close(plan.weight_A[plan.inverse_A].view(T, K).double(), d.weight, rtol=1e-5, atol=1e-6)
    # slots: kept rows of an expert occupy distinct slots in [0, C)
    for e in range(cfg.n_experts):
        slots = plan.slot_A[(plan.expert_idx_A == e) & (plan.slot_A >= 0)]
        assert sorted(slots.tolist()) == list(range(len(slots)))
        assert len(slots) <= C
    # the layer
    torch.testing.assert_close(res.out.double(), ref.out, rtol=1e-4, atol=2e-5)
    assert torch.equal(res.stats.tokens_per_expert.double(), d.tokens_per_expert)
    assert torch.equal(res.stats.routed_per_expert.double(), d.routed_per_expert)
    assert res.stats.tokens_per_expert.max().item() <= C
    assert res.stats.dropped_frac.item() == pytest.approx(d.dropped_frac, abs=1e-6)
    return res, ref


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("drop", ["position", "probs"])
def test_capacity_matches_reference_random(drop, overflow, backend, seed):
    cf = (0.75, 1.0, 1.25)[seed]  # C = 5, 6, 8 for 24 tokens x 2 / 8 experts
    cfg = MoEConfig(n_experts=8, top_k=2, expert_ffn_dim=8, capacity_factor=cf, drop_policy=drop,
                    overflow_policy=overflow, backend=backend)
    res, ref = check_random(cfg, seed)
    if cf < 1:  # non-vacuous: something overflowed
        d = ref.dispatch
        if overflow == "drop":
            assert d.dropped_frac > 0
        else:
            assert (d.kept & (d.expert != ref.routing.topk_idx)).any(), "nothing was rerouted"


CASES = {
    "deepseek-groups-bias-reroute-probs": dict(score_func="sigmoid", n_groups=4, topk_groups=2, expert_bias=True,
                                                routed_scaling_factor=2.5, top_k=3, capacity_factor=0.7,
                                                drop_policy="probs", overflow_policy="reroute"),
    "switch-top1": dict(top_k=1, capacity_factor=1.0, norm_topk_prob=True),
    "switch-top1-reroute": dict(top_k=1, capacity_factor=0.6, overflow_policy="reroute"),
    "mixtral-shared-gelu": dict(softmax_after_topk=True, capacity_factor=0.8, n_shared_experts=1,
                                shared_expert_gate=True, activation="gelu", overflow_policy="reroute"),
    "top4-reroute": dict(top_k=4, capacity_factor=0.6, overflow_policy="reroute", drop_policy="probs"),
    "huge-capacity": dict(capacity_factor=8.0, overflow_policy="reroute"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_capacity_variants_match_reference(case, backend):
    cfg = MoEConfig(n_experts=8, expert_ffn_dim=8, backend=backend, **{"top_k": 2, **CASES[case]})
    check_random(cfg, 7, shape=(3, 10, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_capacity_equals_dropless(backend):
    base = dict(n_experts=8, top_k=2, expert_ffn_dim=8, backend=backend)
    dropless = random_layer(MoEConfig(**base), 3)
    capped = random_layer(MoEConfig(**base, capacity_factor=4.0), 3)  # C = T*k/2 >= any expert's load
    x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = dropless(x), capped(x)
    torch.testing.assert_close(a.out, b.out, rtol=1e-5, atol=1e-6)
    assert b.stats.dropped_frac.item() == 0.0
