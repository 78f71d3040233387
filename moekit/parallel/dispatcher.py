"""The all-to-all dispatcher: an MoE layer's rows exchanged with the ranks holding their experts.

See the package docstring (``moekit/parallel/__init__.py``) for the design.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.layer.dispatch import DispatchPlan
from moekit.layer.experts import Experts
from moekit.layer.losses import expert_counts, switch_aux_loss
from moekit.parallel.context import ParallelContext, check_expert_parallel


# ---------------------------------------------------------------------------------------------- dispatcher
class CommMeter:
    """Host-side counters of one dispatcher since the last reset (no device sync to update them)."""

    def __init__(self) -> None:
        self.kept_E: Tensor | None = None  # rows each global expert processed, summed over forwards
        self.reset()

    def reset(self) -> None:
        self.bytes = 0  # bytes sent to OTHER ranks (the local chunk is a copy, not communication)
        self.seconds = 0.0
        self.calls = 0
        if self.kept_E is not None:
            self.kept_E = torch.zeros_like(self.kept_E)

    def record(self, rows_sent_to_others: int, row_bytes: int, seconds: float) -> None:
        self.bytes += rows_sent_to_others * row_bytes
        self.seconds += seconds
        self.calls += 1

    @contextmanager
    def timed(self):
        """Count the time of the small collectives (counts, capacities, balance-loss counts) too."""
        t0 = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - t0


@dataclass
class ExpertRows:
    """The part of a ``DispatchPlan`` the experts read, for rows received from other ranks."""

    rows_per_expert_E: Tensor  # int64 [L]
    expert_idx_A: Tensor  # local expert of each row (non-decreasing)
    slot_A: Tensor | None = None  # capacity mode: slot within the expert's rows
    capacity: int | None = None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd: the backward is the same exchange with the splits swapped
    (Megatron-Core's ``_AllToAll``)."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group, rank: int,
                meter: CommMeter) -> Tensor:
        ctx.args = (in_splits, out_splits, group, rank, meter)
        return _all_to_all(x, out_splits, in_splits, group, rank, meter)

    @staticmethod
    def backward(ctx, grad: Tensor):
        in_splits, out_splits, group, rank, meter = ctx.args
        return _all_to_all(grad, in_splits, out_splits, group, rank, meter), None, None, None, None, None


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group, rank: int, meter: CommMeter) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    meter.record(sum(in_splits) - in_splits[rank], math.prod(x.shape[1:]) * x.element_size(),
                 time.perf_counter() - t0)
    return out


class AllToAllDispatcher:
    """Runs the experts of a ``DispatchPlan`` on the ranks that hold them (see the module docstring).

    Attached to ``MoE.dispatcher`` by ``shard_model``; not a submodule (no state in the checkpoint).
    """

    def __init__(self, ctx: ParallelContext, n_experts: int):
        self.ctx = ctx
        self.R, self.L = ctx.ep, check_expert_parallel(n_experts, ctx.ep)
        self.meter = CommMeter()

    def __deepcopy__(self, memo):  # process groups cannot be copied; a copied model shares the layout
        return self

    def __call__(self, x_AD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        with torch.no_grad():
            kept_E = plan.kept_per_expert_E.detach().float()
            self.meter.kept_E = kept_E.clone() if self.meter.kept_E is None else self.meter.kept_E + kept_E
        if self.R == 1:
            return experts(x_AD, plan)
        if plan.capacity is None:
            return self._dropless(x_AD, plan, experts)
        return self._capacity(x_AD, plan, experts)

    def _dropless(self, x_AD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        R, L, ctx = self.R, self.L, self.ctx
        send_RL = plan.rows_per_expert_E.view(R, L)
        recv_RL = torch.empty_like(send_RL)
        with self.meter.timed():
            dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=ctx.ep_group)  # counts first
            host = torch.cat([send_RL.sum(1), recv_RL.reshape(-1)]).tolist()  # the one host sync
        in_splits, recv = host[:R], [host[R + s * L:R + (s + 1) * L] for s in range(R)]
        out_splits = [sum(row) for row in recv]
        x_ND = _AllToAll.apply(x_AD, out_splits, in_splits, ctx.ep_group, ctx.ep_rank, self.meter)
        if sum(out_splits) == 0:
            # nothing to compute here, but the return exchange (and its backward) must still run on this
            # rank, connected to the graph, or the other ranks would wait for it (Megatron-LM #1877)
            y_ND = x_ND.clone()
        else:
            y_ND = self._run_local(x_ND, recv, recv_RL.sum(0), experts)
        return _AllToAll.apply(y_ND, in_splits, out_splits, ctx.ep_group, ctx.ep_rank, self.meter)

    def _capacity(self, x_AD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        R, L, ctx = self.R, self.L, self.ctx
        E, C, D = R * L, plan.capacity, x_AD.shape[-1]
        caps = [torch.zeros(1, dtype=torch.int64) for _ in range(R)]
        with self.meter.timed():
            dist.all_gather(caps, torch.tensor([C]), group=ctx.cpu_ep_group)  # host ints: no device sync
        caps = [int(c) for c in caps]
        # static [E * C] send buffer; dropped rows (slot -1) land on a trash row past the end
        dest_A = torch.where(plan.slot_A >= 0, plan.expert_idx_A * C + plan.slot_A, E * C)
        buf_XD = x_AD.new_zeros(E * C + 1, D).index_copy(0, dest_A, x_AD)[: E * C]
        in_splits, out_splits = [L * C] * R, [L * c for c in caps]
        x_ND = _AllToAll.apply(buf_XD, out_splits, in_splits, ctx.ep_group, ctx.ep_rank, self.meter)
        cap = sum(caps)  # every local expert gets exactly this many rows (empty slots are zeros)
        rows_L = torch.full((L,), cap, dtype=torch.int64, device=x_AD.device)
        y_ND = self._run_local(x_ND, [[c] * L for c in caps], rows_L, experts, capacity=cap)
        y_XD = _AllToAll.apply(y_ND, in_splits, out_splits, ctx.ep_group, ctx.ep_rank, self.meter)
        return torch.cat([y_XD, y_XD.new_zeros(1, D)])[dest_A]

    def _run_local(self, x_ND: Tensor, recv: list[list[int]], rows_L: Tensor, experts: Experts,
                   capacity: int | None = None) -> Tensor:
        """Run the local experts on received rows. They arrive in blocks of (source rank, local expert)
        with ``recv[s][e]`` rows (host ints); the experts need (expert, source). Regrouping the blocks
        with host sizes needs no index tensors and no device sync."""
        R, L, N = self.R, self.L, x_ND.shape[0]
        if L > 1:
            blocks = x_ND.split([n for row in recv for n in row])
            x_ND = torch.cat([blocks[s * L + e] for e in range(L) for s in range(R)])
        expert_N = torch.arange(L, device=x_ND.device).repeat_interleave(rows_L, output_size=N)
        slot_N = None if capacity is None else torch.arange(N, device=x_ND.device) % capacity
        y_ND = experts(x_ND, ExpertRows(rows_L, expert_N, slot_N, capacity))
        if L > 1:  # back to (source, expert) blocks for the return exchange
            blocks = y_ND.split([recv[s][e] for e in range(L) for s in range(R)])
            y_ND = torch.cat([blocks[e * R + s] for s in range(R) for e in range(L)])
        return y_ND

    def switch_aux_loss(self, probs_TE: Tensor, topk_idx_TK: Tensor) -> Tensor:
        """The Switch balance loss E * sum_e f_e P_e of the GLOBAL batch, as this rank's share.

        f_E (assignment fractions, not differentiable) comes from one all-reduce of the counts over all
        W ranks; P_E is this rank's probability mass / global tokens * W, so the mean over ranks of the
        returned values is exactly the global loss, also for unequal or empty local batches. Without
        gradients (evaluation) it is the local loss: no collective (with ep = 1 a rank may evaluate alone).
        """
        T, K = topk_idx_TK.shape
        if not torch.is_grad_enabled() or self.ctx.world_size == 1:
            return switch_aux_loss(probs_TE, topk_idx_TK)
        E = probs_TE.shape[-1]
        counts = torch.cat([expert_counts(topk_idx_TK, E), probs_TE.new_full((1,), T, dtype=torch.float32)])
        with self.meter.timed():
            dist.all_reduce(counts, group=self.ctx.world_group)
        T_global = counts[E].clamp_min(1.0)
        f_E = counts[:E] / (T_global * K)
        P_E = probs_TE.float().sum(0) * (self.ctx.world_size / T_global)
        return E * (f_E * P_E).sum()


