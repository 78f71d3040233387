"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts).

Legend: T tokens, D dim, E experts, K top-k, A = T*K rows.

Usable on its own as a drop-in FFN:

    layer = MoE(dim=512, config=MoEConfig(n_experts=8, top_k=2, expert_ffn_dim=1408))
    res = layer(x)   # res.out has x's shape; res.aux_loss, res.z_loss, res.stats
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.layer.dispatch import DispatchPlan, combine, gather_rows, plan_dispatch
from moekit.layer.experts import MLP, Experts
from moekit.layer.ffn import compute_dtype
from moekit.layer.kernels import compiled_layer
from moekit.layer.kernels.decode import ROUTED_DECODE
from moekit.layer.losses import expert_counts, router_z_loss, seq_aux_loss, switch_aux_loss
from moekit.layer.router import Router, RouteSpec, RoutingResult


@dataclass
class MoEStats:
    """Per-layer routing statistics of one forward, as tensors (no host sync in forward)."""

    tokens_per_expert: Tensor  # [E] rows each expert processed (after capacity)
    routed_per_expert: Tensor  # [E] assignments the router made (before capacity): the load
    load_imbalance: Tensor  # max / mean of routed_per_expert (1 = perfectly balanced)
    dropped_frac: Tensor  # fraction of assignments dropped by capacity
    router_entropy: Tensor  # mean per-token entropy of the routing distribution (nats)
    dead_experts: Tensor  # experts that received no assignment
    lb_loss: Tensor  # the unweighted Switch balance loss (1 = uniform), for logging


@dataclass
class MoEOutput:
    out: Tensor
    aux_loss: Tensor | None  # weighted balance losses (Switch + sequence-level), ready to add; None if aux=False
    z_loss: Tensor | None  # weighted router z-loss; None if aux=False
    stats: MoEStats | None  # None if aux=False


class MoE(nn.Module):
    def __init__(self, dim: int, config: MoEConfig, router: Router | None = None):
        super().__init__()
        if config.expert_ffn_dim is None:
            raise ValueError("expert_ffn_dim: must be set for a standalone MoE layer")
        self.dim, self.config = dim, config
        # a router passed in is shared with other layers (Omni-router); it is then also a submodule here
        self.router = router if router is not None else Router(dim, config)
        act = dict(swiglu_limit=config.swiglu_limit, swiglu_alpha=config.swiglu_alpha)
        self.experts = Experts(config.n_experts, dim, config.expert_ffn_dim, config.activation, config.backend,
                               bias=config.ffn_bias, **act)
        self.shared = MLP(dim, config.shared_ffn_dim, config.activation, **act) if config.n_shared_experts else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if config.shared_expert_gate else None
        # moekit.parallel.AllToAllDispatcher once shard_model spreads the experts over processes
        self.dispatcher = None
        # [E] int64 running count of the router's assignments, set by a caller that watches inference (moekit.serve:
        # expert load over served tokens); None counts nothing. Added on the device, never read in forward.
        self.load_counter_E: Tensor | None = None

    def forward(self, x: Tensor, aux: bool = True) -> MoEOutput:
        """``aux=False`` (inference: generation, serving) skips the balancing losses and routing statistics,
        ~30 small ops per layer that cost as much as the experts' work for one token; ``aux_loss``,
        ``z_loss`` and ``stats`` are then None (as transformers' ``output_router_logits=False``)."""
        if not aux and self.training and torch.is_grad_enabled():
            raise ValueError("aux=False: training needs the balancing losses and routing statistics "
                             "(call model.eval() or run under torch.no_grad() for inference)")
        if not torch.compiler.is_compiling():
            if self.experts.backend == "compiled":
                return compiled_layer.compiled(MoE._forward)(self, x, aux)
            if self._auto_compiles(x):
                res = compiled_layer.AUTO_COMPILE.forward(self, x, aux)
                if res is not None:
                    return res
        return self._forward(x, aux)

    def _auto_compiles(self, x: Tensor) -> bool:
        """backend="auto" trains through the compiled layer (``compiled_layer.py``) where the loop would run: CPU
        training calls (grad enabled, module in training mode) of at least ``_AutoCompile.min_flops``, one
        process (no expert parallelism)."""
        if (self.experts.backend != "auto" or self.dispatcher is not None or not self.training
                or not torch.is_grad_enabled()):
            return False
        rows = x.numel() // self.dim * self.config.top_k
        return compiled_layer.AUTO_COMPILE.applies(x.device, compute_dtype(x), self.dim, self.experts.ffn_dim, rows)

    def _forward(self, x: Tensor, aux: bool = True) -> MoEOutput:
        x_TD = x.reshape(-1, self.dim)
        decode = (self.dispatcher is None and self.config.capacity_factor is None
                  and self.experts.decode_eligible(x_TD, self.config.top_k))
        if decode and not aux and not self.router.noisy and self.experts.routed_decode:  # generation: one kernel
            res = self._routed_decode(x_TD)
            if res is not None:
                out_TD, topk_idx_TK = res
                self._count_load(topk_idx_TK)
                return MoEOutput(self._add_shared(out_TD.to(x.dtype), x_TD).view(x.shape), None, None, None)
        routing = self.router(x_TD)                                     # route
        self._count_load(routing.topk_idx_TK)
        if decode:
            return self._decode(x, x_TD, routing, aux)
        plan = plan_dispatch(routing, self.config)                      # dispatch: sort rows by expert
        x_AD = gather_rows(self.experts.cast_input(x_TD), plan)         # cast before the copy (K x smaller)
        if self.dispatcher is None:
            y_AD = self.experts(x_AD, plan)                             # experts on contiguous slices
        else:
            y_AD = self.dispatcher(x_AD, plan, self.experts)            # ... on the ranks holding them
        out_TD = self._add_shared(combine(y_AD, plan).to(x.dtype), x_TD)  # weighted sum back per token
        if not aux:
            return MoEOutput(out_TD.view(x.shape), None, None, None)
        aux_loss, z_loss, lb_loss = self._losses(routing, x.shape)
        return MoEOutput(out_TD.view(x.shape), aux_loss, z_loss, routing_stats(routing, plan, lb_loss))

    def _add_shared(self, out_TD: Tensor, x_TD: Tensor) -> Tensor:
        if self.shared is not None:                                     # always-on shared experts
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                # (the weight in x's dtype: the decode step keeps fp32 activations beside 16-bit weights; a [1, D] copy)
                gate_T1 = F.linear(x_TD, self.shared_gate.weight.to(x_TD.dtype))
                shared_TD = torch.sigmoid(gate_T1) * shared_TD
            out_TD = out_TD + shared_TD.to(out_TD.dtype)
        return out_TD

    def _count_load(self, topk_idx_TK: Tensor) -> None:
        if self.load_counter_E is not None:  # (inference that watches the expert load: moekit.serve)
            idx_A = topk_idx_TK.reshape(-1)
            self.load_counter_E.index_add_(0, idx_A, torch.ones_like(idx_A))

    def _routed_decode(self, x_TD: Tensor) -> tuple[Tensor, Tensor] | None:
        """The router and the experts on a few tokens in one compiled call (``ROUTED_DECODE``): the output and the
        chosen experts, or None where it cannot run (then the router and ``_decode`` run separately)."""
        r, ex = self.router, self.experts
        return ROUTED_DECODE(
            (x_TD.detach(), r.weight.detach(), None if r.bias is None else r.bias.detach(), r.expert_bias,
             *ex.decode_weights()),
            (RouteSpec.of(self.config), compute_dtype(x_TD), ex.activation, ex.limit, ex.alpha))

    def _decode(self, x: Tensor, x_TD: Tensor, routing: RoutingResult, aux: bool) -> MoEOutput:
        """Inference on a few tokens (generation), dropless: no dispatch plan, no sort, no gathers (the
        same values as ``_forward``; tests/test_perf_paths.py)."""
        out_TD = self.experts.decode(x_TD, routing.topk_idx_TK, routing.topk_weight_TK).to(x.dtype)
        out = self._add_shared(out_TD, x_TD).view(x.shape)
        if not aux:
            return MoEOutput(out, None, None, None)
        aux_loss, z_loss, lb_loss = self._losses(routing, x.shape)
        routed_E = expert_counts(routing.topk_idx_TK, self.config.n_experts)
        stats = routing_stats(routing, _DroplessCounts(routed_E, routed_E, routed_E.new_zeros(())), lb_loss)
        return MoEOutput(out, aux_loss, z_loss, stats)

    def _losses(self, routing: RoutingResult, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.config
        balance = switch_aux_loss if self.dispatcher is None else self.dispatcher.switch_aux_loss  # global f_e
        # with a zero coefficient the loss is only logged: no backward through it (its gradient is zero)
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.aux_loss_coef != 0):
            lb_loss = balance(routing.probs_TE, routing.topk_idx_TK)
        aux_loss = cfg.aux_loss_coef * lb_loss
        if cfg.seq_aux_loss_coef > 0:
            # sequences are the leading dims of a (B, S, D) input; anything else is one sequence
            B = shape[0] if len(shape) == 3 else 1
            E, K = cfg.n_experts, cfg.top_k
            aux_loss = aux_loss + cfg.seq_aux_loss_coef * seq_aux_loss(
                routing.probs_TE.view(B, -1, E), routing.topk_idx_TK.view(B, -1, K))
        z_loss = cfg.z_loss_coef * router_z_loss(routing.logits_TE) if cfg.z_loss_coef > 0 else lb_loss.new_zeros(())
        return aux_loss, z_loss, lb_loss.detach()


@dataclass
class _DroplessCounts:
    """The part of a ``DispatchPlan`` that ``routing_stats`` reads, for the plan-free decode path."""

    routed_per_expert_E: Tensor
    kept_per_expert_E: Tensor
    dropped_frac: Tensor


@torch.no_grad()
def routing_stats(routing: RoutingResult, plan: DispatchPlan, lb_loss: Tensor) -> MoEStats:
    routed_E = plan.routed_per_expert_E
    p_TE = routing.probs_TE
    entropy = -(p_TE * p_TE.clamp_min(1e-20).log()).sum(-1).mean()
    return MoEStats(
        tokens_per_expert=plan.kept_per_expert_E,
        routed_per_expert=routed_E,
        load_imbalance=routed_E.max() / routed_E.mean().clamp_min(1e-20),
        dropped_frac=plan.dropped_frac,
        router_entropy=entropy,
        dead_experts=(routed_E == 0).sum(),
        lb_loss=lb_loss,
    )
