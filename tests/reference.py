"""Independent float64 reference implementations of moekit's router, losses, capacity and MoE layer.

Written from the documented maths, not from moekit's code: nothing here imports moekit helpers
(only ``MoEConfig`` is read, as a plain bag of options). Selection, capacity and rerouting are
explicit Python loops over tokens and assignments; ties are broken towards the LOWER expert index /
EARLIER assignment (build hand-made examples without exact ties if the core's order matters).

Import from a test module as ``from reference import ...`` (pytest puts ``tests/`` on ``sys.path``).

API (all tensors float64 on the CPU unless stated; ``cfg`` is a ``moekit.MoEConfig``):

    ref_route(x_TD, weight_ED, bias_E, expert_bias_E, cfg) -> (topk_idx_TK, topk_weight_TK, scores_TE)
    ref_routing(x_TD, weight_ED, bias_E, expert_bias_E, cfg, jitter_TD=None, noise_TE=None) -> RefRouting
    ref_switch_loss(probs_TE, topk_idx_TK) -> 0-d tensor      E * sum_e f_e P_e, f over the T*K assignments
    ref_seq_loss(probs_BSE, topk_idx_BSK) -> 0-d tensor       Switch loss per sequence, then the mean
    ref_z_loss(logits_TE) -> 0-d tensor                       mean_t logsumexp(logits_t)^2
    ref_bias_update(bias_E, load_E, rate) -> bias_E           b_e + rate * sign(mean(load) - load_e)
    ref_capacity_of(cfg, n_tokens) -> int                     ceil(cf * T * k / E) (cf read as the decimal written)
    ref_capacity(routing: RefRouting, cfg) -> RefDispatch     drop policies + reroute, see below
    ref_ffn(x_D, w_in_ID, w_out_DF, activation, b_in, b_out, limit, alpha) -> y_D   one expert / dense MLP
    ref_moe(x, state_dict, cfg, jitter_TD=None, noise_TE=None) -> RefMoEOutput   the full layer (out, losses,
                                                              routing, dispatch); draws = training noise
    ref_moe_forward(x, state_dict, cfg) -> out                just the layer output, x's shape
    state_dict64(module) -> dict                              a module's state dict as float64 CPU tensors

Semantics encoded (from moekit's docstrings / the issue):
  * router: logits = x W^T (+ b); scores = softmax or sigmoid; choice = scores + expert_bias; group-limited
    top-k keeps the best ``topk_groups`` groups scored by top2_sum / max of ``choice``; experts = top-k of
    choice. Weights come from the UNBIASED scores: ``softmax_after_topk`` -> softmax over the chosen logits;
    else scores[chosen], divided by their sum when ``norm_topk_prob`` and k > 1 (Megatron-Core: a single
    expert is never renormalised). Times ``routed_scaling_factor``. ``weight_scale[t]`` is the factor with
    weight(t, e) = scores[t, e] * weight_scale[t] for every e (used by rerouting).
  * losses use ``probs`` = the softmax probabilities, or sigmoid scores normalised per token.
  * capacity C = ceil(cf*T*k/E) (at least 1). Assignments (t, k), flat index a = t*K + k, claim their
    expert's C slots in priority order: "position" = flat order, "probs" = combine weight descending
    (ties: flat order). Unkept assignments are dropped (weight 0). "reroute": in rounds, every token's r-th
    dropped assignment (in k order) proposes the token's r-th best expert by ``choice`` among experts the
    token does not hold (kept or dropped), that were not full at the round's start, with finite choice;
    each expert accepts proposals in priority order (flat order, or proposed weight descending for
    "probs") up to its room at the round's start; an accepted assignment moves to that expert with weight
    scores[t, e] * weight_scale[t]. Rounds repeat until no proposal is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

F64 = torch.float64
NEG_INF = float("-inf")


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to("cpu", F64)


def state_dict64(module: torch.nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` as float64 CPU tensors (index tensors, if any, are left alone)."""
    return {k: (v.detach().to("cpu", F64) if v.is_floating_point() else v.detach().cpu())
            for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- router
@dataclass
class RefRouting:
    topk_idx: Tensor  # [T, K] int64, chosen experts, best choice first
    topk_weight: Tensor  # [T, K] combine weights
    logits: Tensor  # [T, E] (after jitter / noise if given)
    scores: Tensor  # [T, E] softmax probabilities or sigmoid scores
    choice: Tensor  # [T, E] scores + expert_bias, -inf outside the token's chosen groups
    weight_scale: Tensor  # [T]: weight(t, e) = scores[t, e] * weight_scale[t]
    probs: Tensor  # [T, E] per-token distribution for the balancing losses


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    ex = [math.exp(a - m) for a in v]
    s = sum(ex)
    return [a / s for a in ex]


def _sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a)) if a >= 0 else math.exp(a) / (1.0 + math.exp(a))


def _best(values: list[float], candidates, n: int) -> list[int]:
    """The n candidates with the largest values, best first; ties -> lower index."""
    return sorted(candidates, key=lambda i: (-values[i], i))[:n]


def ref_routing(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None, expert_bias_E: Tensor | None, cfg,
                jitter_TD: Tensor | None = None, noise_TE: Tensor | None = None) -> RefRouting:
    """The router on T tokens in float64. ``jitter_TD`` multiplies x and ``noise_TE`` is added to the logits
    (pass the draws to check training-mode noise; None = eval mode)."""
    x = _f64(x_TD)
    if jitter_TD is not None:
        x = x * _f64(jitter_TD)
    W = _f64(weight_ED)
    logits = x @ W.T
    if bias_E is not None:
        logits = logits + _f64(bias_E)
    if noise_TE is not None:
        logits = logits + _f64(noise_TE)
    T, E = logits.shape
    K, G = cfg.top_k, cfg.n_groups
    softmax = cfg.score_func == "softmax"
    eb = [0.0] * E if expert_bias_E is None else _f64(expert_bias_E).tolist()
    L = logits.tolist()
    idx_rows, w_rows, s_rows, c_rows, scale_rows, p_rows = [], [], [], [], [], []
    for t in range(T):
        lt = L[t]
        s = _softmax(lt) if softmax else [_sigmoid(a) for a in lt]
        c = [s[e] + eb[e] for e in range(E)]
        if G > 1:
            m = E // G
            gscore = []
            for g in range(G):
                vals = sorted(c[g * m:(g + 1) * m], reverse=True)
                gscore.append(vals[0] + vals[1] if cfg.group_score == "top2_sum" else vals[0])
            keep_groups = set(_best(gscore, range(G), cfg.topk_groups))
            c = [c[e] if e // m in keep_groups else NEG_INF for e in range(E)]
        idx = _best(c, range(E), K)
        if cfg.softmax_after_topk:
            w = _softmax([lt[e] for e in idx])
            scale = 1.0 / sum(s[e] for e in idx)
        else:
            w = [s[e] for e in idx]
            scale = 1.0
            if cfg.norm_topk_prob and K > 1:
                tot = sum(w)
                w = [a / tot for a in w]
                scale = 1.0 / tot
        w = [a * cfg.routed_scaling_factor for a in w]
        scale *= cfg.routed_scaling_factor
        tot_s = sum(s)
        idx_rows.append(idx)
        w_rows.append(w)
        s_rows.append(s)
        c_rows.append(c)
        scale_rows.append(scale)
        p_rows.append(s if softmax else [a / tot_s for a in s])
    mk = lambda rows: torch.tensor(rows, dtype=F64).reshape(T, -1)  # noqa: E731
    return RefRouting(
        topk_idx=torch.tensor(idx_rows, dtype=torch.int64).reshape(T, K),
        topk_weight=mk(w_rows), logits=logits, scores=mk(s_rows), choice=mk(c_rows),
        weight_scale=torch.tensor(scale_rows, dtype=F64), probs=mk(p_rows))


def ref_route(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None, expert_bias_E: Tensor | None,
              cfg) -> tuple[Tensor, Tensor, Tensor]:
    """(topk_idx [T, K] int64, topk_weight [T, K] f64, scores [T, E] f64) of the eval-mode router."""
    r = ref_routing(x_TD, weight_ED, bias_E, expert_bias_E, cfg)
    return r.topk_idx, r.topk_weight, r.scores


# ---------------------------------------------------------------------------------------------- losses
def ref_switch_loss(probs_TE: Tensor, topk_idx_TK: Tensor) -> Tensor:
    """E * sum_e f_e * P_e; f_e = share of the T*K assignments on e, P_e = mean prob of e."""
    p = _f64(probs_TE).tolist()
    idx = topk_idx_TK.tolist()
    T, E, K = len(p), len(p[0]), len(idx[0])
    counts = [0] * E
    for row in idx:
        for e in row:
            counts[e] += 1
    total = 0.0
    for e in range(E):
        f = counts[e] / (T * K)
        P = sum(p[t][e] for t in range(T)) / T
        total += f * P
    return torch.tensor(E * total, dtype=F64)


def ref_seq_loss(probs_BSE: Tensor, topk_idx_BSK: Tensor) -> Tensor:
    """The Switch loss of each sequence separately, then the mean over sequences."""
    B = probs_BSE.shape[0]
    return torch.stack([ref_switch_loss(probs_BSE[b], topk_idx_BSK[b]) for b in range(B)]).mean()


def ref_z_loss(logits_TE: Tensor) -> Tensor:
    """mean over tokens of logsumexp(logits_t)^2."""
    vals = []
    for row in _f64(logits_TE).tolist():
        m = max(row)
        lse = m + math.log(sum(math.exp(a - m) for a in row))
        vals.append(lse * lse)
    return torch.tensor(sum(vals) / len(vals), dtype=F64)


def ref_bias_update(bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """Aux-loss-free balancing: b_e += rate * sign(mean load - load_e) (0 where load_e == mean)."""
    b, load = _f64(bias_E).tolist(), _f64(load_E).tolist()
    mean = sum(load) / len(load)
    out = [bi + rate * ((mean > li) - (mean < li)) for bi, li in zip(b, load, strict=True)]
    return torch.tensor(out, dtype=F64)


# ---------------------------------------------------------------------------------------------- capacity
def ref_capacity_of(cfg, n_tokens: int) -> int:
    """ceil(capacity_factor * T * top_k / n_experts), at least 1, in exact arithmetic on the decimal
    the user wrote (1.1 means 11/10, not the nearest double)."""
    cf = Fraction(repr(cfg.capacity_factor))
    return max(1, math.ceil(cf * n_tokens * cfg.top_k / cfg.n_experts))


@dataclass
class RefDispatch:
    expert: Tensor  # [T, K] int64 expert of each assignment after rerouting
    weight: Tensor  # [T, K] f64 combine weight (0 for a dropped assignment)
    kept: Tensor  # [T, K] bool
    capacity: int | None
    tokens_per_expert: Tensor  # [E] f64 assignments each expert processes (after capacity / reroute)
    routed_per_expert: Tensor  # [E] f64 assignments the router made (before capacity)
    dropped_frac: float


def ref_capacity(routing: RefRouting, cfg) -> RefDispatch:
    """Apply capacity (cfg.capacity_factor; None = dropless), the drop policy and the overflow policy."""
    T, K = routing.topk_idx.shape
    E = routing.scores.shape[1]
    A = T * K
    expert = routing.topk_idx.reshape(-1).tolist()
    weight = _f64(routing.topk_weight).reshape(-1).tolist()
    routed = [0.0] * E
    for e in expert:
        routed[e] += 1
    if cfg.capacity_factor is None:
        kept = [True] * A
        C = None
    else:
        C = ref_capacity_of(cfg, T)
        by_probs = cfg.drop_policy == "probs"
        order = sorted(range(A), key=lambda a: (-weight[a], a)) if by_probs else list(range(A))
        load = [0] * E
        kept = [False] * A
        for a in order:
            if load[expert[a]] < C:
                load[expert[a]] += 1
                kept[a] = True
        if cfg.overflow_policy == "reroute":
            scores, choice = routing.scores.tolist(), routing.choice.tolist()
            scale = routing.weight_scale.tolist()
            while True:
                full = [load[e] >= C for e in range(E)]
                proposal: dict[int, int] = {}
                for t in range(T):
                    mine = range(t * K, (t + 1) * K)
                    dropped = [a for a in mine if not kept[a]]
                    if not dropped:
                        continue
                    used = {expert[a] for a in mine}
                    free = [e for e in range(E) if e not in used and not full[e] and choice[t][e] > NEG_INF]
                    free = _best(choice[t], free, len(free))
                    for r, a in enumerate(dropped):
                        if r < len(free):
                            proposal[a] = free[r]
                if not proposal:
                    break
                prop_w = {a: scores[a // K][e] * scale[a // K] for a, e in proposal.items()}
                order = sorted(proposal, key=lambda a, w=prop_w: (-w[a], a) if by_probs else a)
                room = [C - load[e] for e in range(E)]
                for a in order:
                    e = proposal[a]
                    if room[e] > 0:
                        room[e] -= 1
                        load[e] += 1
                        expert[a], weight[a], kept[a] = e, prop_w[a], True
    weight = [w if k else 0.0 for w, k in zip(weight, kept, strict=True)]
    tpe = [0.0] * E
    for e, k in zip(expert, kept, strict=True):
        tpe[e] += k
    return RefDispatch(
        expert=torch.tensor(expert, dtype=torch.int64).reshape(T, K),
        weight=torch.tensor(weight, dtype=F64).reshape(T, K),
        kept=torch.tensor(kept, dtype=torch.bool).reshape(T, K),
        capacity=C,
        tokens_per_expert=torch.tensor(tpe, dtype=F64),
        routed_per_expert=torch.tensor(routed, dtype=F64),
        dropped_frac=1.0 - sum(kept) / A,
    )


# ---------------------------------------------------------------------------------------------- layer
def ref_ffn(x_D: Tensor, w_in_ID: Tensor, w_out_DF: Tensor, activation: str, b_in_I: Tensor | None = None,
            b_out_D: Tensor | None = None, limit: float = 7.0, alpha: float = 1.702) -> Tensor:
    """w_out @ act(w_in @ x + b_in) + b_out. Gated activations split w_in's rows as [gate | up]:
    "swiglu" = silu(gate) * up; "swiglu_clamped" (gpt-oss) = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g)
    with g = min(gate, limit); "gelu" = exact (erf) gelu."""
    h = _f64(w_in_ID) @ _f64(x_D)
    if b_in_I is not None:
        h = h + _f64(b_in_I)
    if activation in ("swiglu", "swiglu_clamped"):
        n = h.shape[0] // 2
        gate, up = h[:n], h[n:]
        if activation == "swiglu":
            a = gate / (1.0 + torch.exp(-gate)) * up
        else:
            g = torch.minimum(gate, torch.tensor(limit, dtype=F64))
            u = torch.clamp(up, -limit, limit)
            a = (u + 1.0) * g / (1.0 + torch.exp(-alpha * g))
    elif activation == "gelu":
        a = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    else:
        raise ValueError(f"reference: unknown activation {activation!r}")
    y = _f64(w_out_DF) @ a
    return y if b_out_D is None else y + _f64(b_out_D)


@dataclass
class RefMoEOutput:
    out: Tensor  # x's shape
    aux_loss: Tensor  # aux_loss_coef * switch + seq_aux_loss_coef * seq (seq only when its coef > 0)
    z_loss: Tensor  # z_loss_coef * z
    lb_loss: Tensor  # unweighted switch loss
    seq_loss: Tensor  # unweighted sequence-level loss
    raw_z_loss: Tensor  # unweighted z-loss
    routing: RefRouting
    dispatch: RefDispatch


_KNOWN_KEYS = {"router.weight", "router.bias", "router.expert_bias", "experts.w_in", "experts.w_out", "experts.b_in",
               "experts.b_out", "shared.w_in", "shared.w_out", "shared.b_in", "shared.b_out", "shared_gate.weight"}


def ref_moe(x: Tensor, state_dict: dict[str, Tensor], cfg, jitter_TD: Tensor | None = None,
            noise_TE: Tensor | None = None) -> RefMoEOutput:
    """The MoE layer as a per-token loop over its kept experts (+ the gated shared expert).

    ``state_dict``: the layer's state dict (keys ``router.weight``, optional ``router.bias`` and
    ``router.expert_bias``, ``experts.w_in`` [E, I, D], ``experts.w_out`` [E, D, F], optional ``experts.b_in``
    [E, I] / ``experts.b_out`` [E, D], ``shared.w_in``, ``shared.w_out``, ``shared.b_in``, ``shared.b_out``,
    ``shared_gate.weight``; any other key raises). The activation and its swiglu_limit/alpha come from cfg.
    A (B, S, D) input is B sequences for the sequence loss; any other shape is one sequence.
    """
    unknown = set(state_dict) - _KNOWN_KEYS
    if unknown:  # a new layer feature the reference does not model must not be silently ignored
        raise ValueError(f"reference: unknown MoE state-dict keys {sorted(unknown)}")
    sd = {k: _f64(v) for k, v in state_dict.items()}
    act = dict(limit=getattr(cfg, "swiglu_limit", 7.0), alpha=getattr(cfg, "swiglu_alpha", 1.702))
    D = sd["router.weight"].shape[1]
    x_TD = _f64(x).reshape(-1, D)
    T = x_TD.shape[0]
    routing = ref_routing(x_TD, sd["router.weight"], sd.get("router.bias"), sd.get("router.expert_bias"), cfg,
                          jitter_TD, noise_TE)
    disp = ref_capacity(routing, cfg)
    out = torch.zeros(T, D, dtype=F64)
    w_in, w_out = sd["experts.w_in"], sd["experts.w_out"]
    b_in, b_out = sd.get("experts.b_in"), sd.get("experts.b_out")
    for t in range(T):
        for k in range(cfg.top_k):
            if disp.kept[t, k]:
                e = int(disp.expert[t, k])
                y = ref_ffn(x_TD[t], w_in[e], w_out[e], cfg.activation, None if b_in is None else b_in[e],
                            None if b_out is None else b_out[e], **act)
                out[t] += disp.weight[t, k] * y
        if "shared.w_in" in sd:
            s = ref_ffn(x_TD[t], sd["shared.w_in"], sd["shared.w_out"], cfg.activation, sd.get("shared.b_in"),
                        sd.get("shared.b_out"), **act)
            if "shared_gate.weight" in sd:
                s = s * torch.sigmoid(sd["shared_gate.weight"][0] @ x_TD[t])
            out[t] += s
    lb = ref_switch_loss(routing.probs, routing.topk_idx)
    B = x.shape[0] if x.dim() == 3 else 1
    E, K = routing.scores.shape[1], cfg.top_k
    seq = ref_seq_loss(routing.probs.reshape(B, -1, E), routing.topk_idx.reshape(B, -1, K))
    z = ref_z_loss(routing.logits)
    aux = cfg.aux_loss_coef * lb + (cfg.seq_aux_loss_coef * seq if cfg.seq_aux_loss_coef > 0 else 0.0)
    return RefMoEOutput(out=out.reshape(x.shape), aux_loss=torch.as_tensor(aux, dtype=F64),
                        z_loss=torch.as_tensor(cfg.z_loss_coef * z, dtype=F64), lb_loss=lb, seq_loss=seq,
                        raw_z_loss=z, routing=routing, dispatch=disp)


def ref_moe_forward(x: Tensor, state_dict: dict[str, Tensor], cfg) -> Tensor:
    """The eval-mode MoE layer output (x's shape, float64)."""
    return ref_moe(x, state_dict, cfg).out
