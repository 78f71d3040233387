"""The dispatcher: turns routing decisions into a plan of contiguous per-expert rows.

Legend: T tokens, K top-k, A = T*K assignments (token, expert pairs), E experts, C capacity.

Every (token, expert) assignment becomes one row. Rows are sorted by expert with a STABLE sort, so
each expert's rows form one contiguous slice and, within an expert, rows keep their priority order
(token order, or router weight for ``drop_policy="probs"``). The experts then run on slices, and the
combine step puts rows back in (token, k) order with ``inverse_A``.

Capacity (``capacity_factor`` set): an expert keeps its first C rows in priority order; the others
are dropped: their combine weight is 0, so the token keeps its residual and its other experts
(Megatron-Core and DeepSpeed do the same). With ``overflow_policy="reroute"`` a dropped
assignment goes to the token's next-best expert (by router choice score) that still has room,
weighted as the router would have weighted that expert.

Dropless mode needs no host sync here; capacity mode keeps static shapes (rows = T*K);
rerouting syncs once per round to stop early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.layer.kernels.rows import Combine, GatherRows, combine_forward
from moekit.layer.router import RoutingResult


@dataclass
class DispatchPlan:
    """Rows sorted by expert. Consumed by the experts and by combine."""

    token_idx_A: Tensor  # token of each sorted row
    expert_idx_A: Tensor  # expert of each sorted row (non-decreasing)
    weight_A: Tensor  # fp32 combine weight of each sorted row (0 for a dropped row)
    inverse_A: Tensor  # sorted row of flat assignment t*K + k
    rows_per_expert_E: Tensor  # int64 rows of each expert in the sorted order (kept + dropped)
    kept_per_expert_E: Tensor  # fp32 rows each expert actually processes
    routed_per_expert_E: Tensor  # fp32 assignments before capacity (the observed router load)
    slot_A: Tensor | None  # capacity mode: position of each row within its expert's C slots (-1 dropped)
    capacity: int | None
    n_tokens: int
    top_k: int

    @property
    def dropped_frac(self) -> Tensor:
        return 1.0 - self.kept_per_expert_E.sum() / (self.n_tokens * self.top_k)


def plan_dispatch(routing: RoutingResult, cfg: MoEConfig) -> DispatchPlan:
    topk_idx_TK = routing.topk_idx_TK
    T, K = topk_idx_TK.shape
    E = cfg.n_experts
    device = topk_idx_TK.device
    expert_A = topk_idx_TK.reshape(-1)
    weight_A = routing.topk_weight_TK.reshape(-1)
    routed_E = count_per_expert(expert_A, E).float()

    if cfg.capacity_factor is None:
        order_A = torch.argsort(expert_A, stable=True)
        return _plan(order_A, expert_A, weight_A, None, None, routed_E, T, K, E)

    C = cfg.capacity(T)
    keep_A = _within_capacity(expert_A, _priority(weight_A, cfg), torch.full((E,), C, device=device), E)
    if cfg.overflow_policy == "reroute":
        expert_A, weight_A, keep_A = _reroute(routing, cfg, expert_A, weight_A, keep_A, C)
    weight_A = torch.where(keep_A, weight_A, torch.zeros_like(weight_A))
    priority_A = _priority(weight_A, cfg)
    order_A = priority_A[torch.argsort(expert_A[priority_A], stable=True)]
    return _plan(order_A, expert_A, weight_A, keep_A, C, routed_E, T, K, E)


def count_per_expert(expert_A: Tensor, E: int, keep_A: Tensor | None = None) -> Tensor:
    """int64 [E]: assignments per expert (only the kept ones when ``keep_A`` is given). A scatter-add, not
    ``bincount`` or a boolean mask, so the output shape never depends on the data (torch.compile traces it
    without a graph break)."""
    ones_A = torch.ones_like(expert_A) if keep_A is None else keep_A.to(expert_A.dtype)
    return torch.zeros(E, dtype=expert_A.dtype, device=expert_A.device).scatter_add_(0, expert_A, ones_A)


def _priority(weight_A: Tensor, cfg: MoEConfig) -> Tensor:
    """Assignments in the order they claim capacity: token order, or highest router weight first."""
    if cfg.drop_policy == "probs":
        return torch.argsort(weight_A, descending=True, stable=True)
    return torch.arange(weight_A.numel(), device=weight_A.device)


def _within_capacity(expert_A: Tensor, priority_A: Tensor, room_E: Tensor, E: int) -> Tensor:
    """keep_A: the assignment is among the first room_E[e] of its expert in priority order."""
    order_A = priority_A[torch.argsort(expert_A[priority_A], stable=True)]
    sorted_expert_A = expert_A[order_A]
    counts_E = count_per_expert(expert_A, E)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    pos_sorted_A = torch.arange(expert_A.numel(), device=expert_A.device) - start_E[sorted_expert_A]
    keep_sorted_A = pos_sorted_A < room_E[sorted_expert_A]
    keep_A = torch.empty_like(keep_sorted_A)
    keep_A[order_A] = keep_sorted_A
    return keep_A


def _reroute(routing: RoutingResult, cfg: MoEConfig, expert_A: Tensor, weight_A: Tensor, keep_A: Tensor,
             C: int) -> tuple[Tensor, Tensor, Tensor]:
    """Send dropped assignments to each token's next-best expert with room ("backup expert").

    Each round, a dropped assignment proposes the best expert its token does not use yet and that is
    not full; experts accept proposals in priority order up to their remaining room. An expert that
    rejects is full, so every round fills an expert or settles every proposal: at most E rounds.
    """
    T, K = routing.topk_idx_TK.shape
    E = cfg.n_experts
    expert_A, weight_A, keep_A = expert_A.clone(), weight_A.clone(), keep_A.clone()
    t_A = torch.arange(T * K, device=expert_A.device) // K
    for _ in range(E - K):
        dropped_A = ~keep_A
        if not bool(dropped_A.any()):  # host sync: only in reroute mode
            break
        load_E = count_per_expert(expert_A, E, keep_A)
        full_E = load_E >= C
        used_TE = torch.zeros(T, E, dtype=torch.bool, device=expert_A.device)
        used_TE[t_A, expert_A] = True  # experts a token already holds (kept or dropped)
        blocked_TE = used_TE | full_E[None, :]
        choice_TE = routing.choice_TE.masked_fill(blocked_TE, float("-inf"))
        # the r-th dropped assignment of a token proposes the token's r-th best free expert
        dropped_TK = dropped_A.view(T, K)
        rank_TK = (torch.cumsum(dropped_TK.long(), dim=1) - 1).clamp_min(0)
        cand_TK = choice_TE.topk(K, dim=-1).indices.gather(1, rank_TK)
        valid_TK = choice_TE.gather(1, cand_TK) > float("-inf")
        propose_A = dropped_A & valid_TK.view(-1)
        if not bool(propose_A.any()):
            break
        cand_A = cand_TK.reshape(-1)
        cand_weight_A = routing.scores_TE[t_A, cand_A] * routing.weight_scale_T[t_A]
        # proposals compete for the remaining room; non-proposals are parked on a virtual expert E
        room_E1 = torch.cat([(C - load_E).clamp_min(0), load_E.new_zeros(1)])
        who_A = torch.where(propose_A, cand_A, torch.full_like(cand_A, E))
        accept_A = _within_capacity(who_A, _priority(torch.where(propose_A, cand_weight_A, 0.0), cfg), room_E1, E + 1)
        accept_A &= propose_A
        expert_A = torch.where(accept_A, cand_A, expert_A)
        weight_A = torch.where(accept_A, cand_weight_A, weight_A)
        keep_A = keep_A | accept_A
        # a rejected proposal means its expert filled up; it is excluded next round via full_E
    return expert_A, weight_A, keep_A


def _plan(order_A: Tensor, expert_A: Tensor, weight_A: Tensor, keep_A: Tensor | None, C: int | None,
          routed_E: Tensor, T: int, K: int, E: int) -> DispatchPlan:
    A = T * K
    inverse_A = torch.empty_like(order_A)
    inverse_A[order_A] = torch.arange(A, device=order_A.device)
    sorted_expert_A = expert_A[order_A]
    rows_E = count_per_expert(expert_A, E)
    if keep_A is None:
        kept_E = rows_E.float()
        slot_A = None
    else:
        kept_sorted_A = keep_A[order_A]
        kept_counts_E = count_per_expert(expert_A, E, keep_A)
        kept_E = kept_counts_E.float()
        # a kept row's slot is its rank among the kept rows of its expert
        kept_start_E = torch.cumsum(kept_counts_E, 0) - kept_counts_E
        rank_A = torch.cumsum(kept_sorted_A.long(), 0) - 1 - kept_start_E[sorted_expert_A]
        slot_A = torch.where(kept_sorted_A, rank_A, torch.full_like(rank_A, -1))
    return DispatchPlan(
        token_idx_A=order_A // K,
        expert_idx_A=sorted_expert_A,
        weight_A=weight_A[order_A],
        inverse_A=inverse_A,
        rows_per_expert_E=rows_E,
        kept_per_expert_E=kept_E,
        routed_per_expert_E=routed_E,
        slot_A=slot_A,
        capacity=C,
        n_tokens=T,
        top_k=K,
    )


def gather_rows(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """The experts' input: row a of the result is x_TD[plan.token_idx_A[a]]."""
    if torch.is_grad_enabled() and x_TD.requires_grad:
        return GatherRows.apply(x_TD, plan.token_idx_A, plan.inverse_A, plan.top_k)
    return x_TD.index_select(0, plan.token_idx_A)


def combine(y_AD: Tensor, plan: DispatchPlan) -> Tensor:
    """Put rows back in (token, k) order and take the weighted sum over k: out_t = sum_k w_tk y_tk."""
    if torch.is_grad_enabled() and (y_AD.requires_grad or plan.weight_A.requires_grad):
        return Combine.apply(y_AD, plan.weight_A, plan.token_idx_A, plan.inverse_A, plan.n_tokens, plan.top_k)
    return combine_forward(y_AD, plan.weight_A, plan.inverse_A, plan.n_tokens, plan.top_k)
