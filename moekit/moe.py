"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts).

Legend: T tokens, D dim, E experts, K top-k, A = T*K rows.

Usable on its own as a drop-in FFN:

    layer = MoE(dim=512, config=MoEConfig(n_experts=8, top_k=2, expert_ffn_dim=1408))
    res = layer(x)   # res.out has x's shape; res.aux_loss, res.z_loss, res.stats
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.compiled import InductorFn, accumulate_dtype, kernels_turned_off
from moekit.config import MoEConfig
from moekit.dispatch import DispatchPlan, gather_rows, plan_dispatch
from moekit.experts import MLP, Experts, compute_dtype, experts_decode, select_backend
from moekit.losses import expert_counts, router_z_loss, seq_aux_loss, switch_aux_loss
from moekit.router import Router, RouteSpec, RoutingResult, route, router_logits

log = logging.getLogger("moekit")


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

    def forward(self, x: Tensor, aux: bool = True) -> MoEOutput:
        """``aux=False`` (inference: generation, serving) skips the balancing losses and routing statistics,
        ~30 small ops per layer that cost as much as the experts' work for one token; ``aux_loss``,
        ``z_loss`` and ``stats`` are then None (as transformers' ``output_router_logits=False``)."""
        if not aux and self.training and torch.is_grad_enabled():
            raise ValueError("aux=False: training needs the balancing losses and routing statistics "
                             "(call model.eval() or run under torch.no_grad() for inference)")
        if not torch.compiler.is_compiling():
            if self.experts.backend == "compiled":
                return _compiled_forward()(self, x, aux)
            if self._auto_compiles(x):
                res = _AUTO_COMPILE.forward(self, x, aux)
                if res is not None:
                    return res
        return self._forward(x, aux)

    def _auto_compiles(self, x: Tensor) -> bool:
        """backend="auto" trains through the compiled layer (``_AutoCompile``) where the loop would run: CPU
        training calls (grad enabled, module in training mode) of at least ``_AutoCompile.min_flops``, one
        process (no expert parallelism)."""
        if (self.experts.backend != "auto" or self.dispatcher is not None or not self.training
                or not torch.is_grad_enabled()):
            return False
        rows = x.numel() // self.dim * self.config.top_k
        return _AUTO_COMPILE.applies(x.device, compute_dtype(x), self.dim, self.experts.ffn_dim, rows)

    def _forward(self, x: Tensor, aux: bool = True) -> MoEOutput:
        x_TD = x.reshape(-1, self.dim)
        decode = (self.dispatcher is None and self.config.capacity_factor is None
                  and self.experts.decode_eligible(x_TD, self.config.top_k))
        if decode and not aux and not self.router.noisy:                # generation: route + experts, one kernel
            out_TD = self._routed_decode(x_TD)
            if out_TD is not None:
                return MoEOutput(self._add_shared(out_TD.to(x.dtype), x_TD).view(x.shape), None, None, None)
        routing = self.router(x_TD)                                     # route
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
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD.to(out_TD.dtype)
        return out_TD

    def _routed_decode(self, x_TD: Tensor) -> Tensor | None:
        """The router and the experts on a few tokens in one compiled call (``_ROUTED_DECODE``), or None
        where it cannot run (then the router and ``_decode`` run separately)."""
        r, ex = self.router, self.experts
        return _ROUTED_DECODE(
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


def _route_and_decode(x_TD: Tensor, router_w_ED: Tensor, router_b_E: Tensor | None, expert_bias_E: Tensor | None,
                      w_in_EID: Tensor, w_out_EDF: Tensor, b_in_EI: Tensor | None, b_out_ED: Tensor | None,
                      spec: RouteSpec, dtype: torch.dtype, activation: str, limit: float, alpha: float) -> Tensor:
    """Route (``Router`` without training noise) and run the chosen experts (``experts.experts_decode``)
    for a few tokens: the same values as the two run separately; compiled, one call per MoE layer."""
    routing = route(router_logits(x_TD, router_w_ED, router_b_E), spec, expert_bias_E)
    return experts_decode(x_TD.to(dtype), routing.topk_idx_TK, routing.topk_weight_TK, w_in_EID, w_out_EDF,
                          b_in_EI, b_out_ED, activation, limit, alpha)


# one call per MoE layer and generated token: torch.compile's own per-call cost would be as large as the router
_ROUTED_DECODE = InductorFn(_route_and_decode, "routed decode kernel")


@dataclass
class _DroplessCounts:
    """The part of a ``DispatchPlan`` that ``routing_stats`` reads, for the plan-free decode path."""

    routed_per_expert_E: Tensor
    kept_per_expert_E: Tensor
    dropped_frac: Tensor


class _AutoCompile:
    """backend="auto" on the CPU: training calls run the layer through torch.compile (the "compiled" backend:
    the experts as one opaque op, inductor fusing the router, dispatch plan, gather, combine and statistics
    around it). Measured on preset small (d=192, E=8, F=256, bf16 autocast, AMD EPYC without AMX), training
    tokens/s against the dense twin, interleaved in one process: 0.90-0.93 compiled against 0.87-0.90 eager in
    five of six runs of one session, 0.85-0.88 against 0.84-0.87 in another (benchmarks/RESULTS.md, "What changed",
    item 9, and the targets); the first training step pays the compilation (5-6 s with inductor's on-disk cache
    warm, ~16 s cold). Inference (eval, generation) keeps the eager paths and the decode kernel, and calls below
    ``min_flops`` (the tests' toy layers) stay eager: compiling costs more than they run. If compilation fails (no
    C++ compiler, an unsupported op) it warns once and every layer trains eagerly from then on;
    ``MOEKIT_KERNELS=eager`` keeps training eager from the start."""

    min_flops = 1e9  # SwiGLU FLOPs of the call (6 * rows * dim * ffn): preset small's training calls are 2.4e9

    def __init__(self) -> None:
        self.enabled = not kernels_turned_off()
        self.announced = False

    def applies(self, device: torch.device, dtype: torch.dtype, dim: int, ffn_dim: int, rows: int) -> bool:
        """Does a training call of ``rows`` expert rows (tokens x top-k) in ``dtype`` run compiled?"""
        return (self.enabled and device.type == "cpu" and 6.0 * rows * dim * ffn_dim >= self.min_flops
                and select_backend("auto", device, dtype, widths=(dim, ffn_dim), rows=rows) == "loop")

    def forward(self, layer: MoE, x: Tensor, aux: bool) -> MoEOutput | None:
        if not self.announced:
            self.announced = True
            log.info("MoE layers: training through torch.compile; the first step compiles (~10 s; "
                     "MOEKIT_KERNELS=eager trains the eager layer)")
        try:
            return _compiled_forward()(layer, x, aux)
        except Exception as e:  # noqa: BLE001 (any failure to compile: the eager layer from now on)
            first = str(e).splitlines()[0] if str(e) else ""
            log.warning("MoE layer: torch.compile failed (%s: %s); training with the eager layer "
                        "(MOEKIT_KERNELS=eager skips the attempt)", type(e).__name__, first)
            self.enabled = False
            return None


_AUTO_COMPILE = _AutoCompile()


@functools.cache
def _compiled_forward():
    """backend="compiled": ``MoE._forward`` through torch.compile, one compiled function for every layer (the
    parameters are graph inputs). The experts are an opaque custom op there (``moekit.experts``), so the
    graph depends on the token count only, never on the per-expert row counts: it compiles once for the
    first T and once more, with a dynamic T, if T changes; routing changes never recompile."""
    return torch.compile(MoE._forward)


def combine(y_AD: Tensor, plan: DispatchPlan) -> Tensor:
    """Put rows back in (token, k) order and take the weighted sum over k: out_t = sum_k w_tk y_tk."""
    if torch.is_grad_enabled() and (y_AD.requires_grad or plan.weight_A.requires_grad):
        return _Combine.apply(y_AD, plan.weight_A, plan.token_idx_A, plan.inverse_A, plan.n_tokens, plan.top_k)
    return _combine_forward(y_AD, plan.weight_A, plan.inverse_A, plan.n_tokens, plan.top_k)


def _combine_kernel(y_AD: Tensor, weight_A: Tensor, inverse_A: Tensor, K: int) -> Tensor:
    """out_t = sum_k w_tk y_tk, gathered through inverse_A and accumulated in fp32 (float64 for float64).
    The K terms are written as K - 1 adds, not a sum over a K dim: inductor vectorises a reduction over a
    dim of 8 along that dim, gathering from K rows per lane (*ad hoc*, T=4096, K=8, D=512 bf16: 32.6 ms,
    against the adds' vectors along D; benchmarks/RESULTS.md "What changed", item 10)."""
    idx_TK = inverse_A.view(-1, K)
    acc = accumulate_dtype(y_AD, weight_A)

    def term_TD(k: int) -> Tensor:
        rows_T = idx_TK[:, k]
        return y_AD[rows_T].to(acc) * weight_A[rows_T].to(acc).unsqueeze(-1)

    out_TD = term_TD(0)
    for k in range(1, K):
        out_TD = out_TD + term_TD(k)
    return out_TD.to(y_AD.dtype)


def _combine_backward_kernel(g_TD: Tensor, y_AD: Tensor, weight_A: Tensor,
                             token_idx_A: Tensor) -> tuple[Tensor, Tensor]:
    """dy_a = w_a g_t(a) and dw_a = <y_a, g_t(a)>, from one gather of g, accumulated in fp32."""
    acc = accumulate_dtype(g_TD, y_AD, weight_A)
    g_AD = g_TD[token_idx_A].to(acc)
    dw_A = (y_AD.to(acc) * g_AD).sum(-1).to(weight_A.dtype)
    return (g_AD * weight_A.to(acc).unsqueeze(-1)).to(y_AD.dtype), dw_A


# The gather, products and sum of combine, and of its backward, as one pass each: eagerly they are 4-5 passes
# over [T*K, D] (*ad hoc*, preset small's shapes in bf16: forward 306 -> 107 us, backward 840 -> 174 us per
# layer; +0.5 to +3.9 points of training tokens/s against the dense twin in interleaved runs, benchmarks/RESULTS.md
# "What changed", item 7). Any failure to build: the eager ops below, as before.
_COMBINE = InductorFn(_combine_kernel, "combine kernel")
_COMBINE_BACKWARD = InductorFn(_combine_backward_kernel, "combine backward kernel")


def _combine_forward(y_AD: Tensor, weight_A: Tensor, inverse_A: Tensor, T: int, K: int) -> Tensor:
    if y_AD.device.type == "cpu" and y_AD.shape[0]:
        out_TD = _COMBINE((y_AD.detach(), weight_A.detach(), inverse_A), (K,))
        if out_TD is not None:
            return out_TD
    return _weighted_sum(y_AD.index_select(0, inverse_A).view(T, K, -1), weight_A[inverse_A].view(T, K))


def _weighted_sum(y_TKD: Tensor, w_TK: Tensor) -> Tensor:
    """sum_k w_tk y_tk as K multiply-adds in y's dtype (a [T, 1, K] x [T, K, D] bmm costs more on the CPU)."""
    w_TK = w_TK.to(y_TKD.dtype)
    out_TD = y_TKD[:, 0] * w_TK[:, :1]
    for k in range(1, y_TKD.shape[1]):
        out_TD.addcmul_(y_TKD[:, k], w_TK[:, k:k + 1])
    return out_TD


class _Combine(torch.autograd.Function):
    """``combine`` with a backward that stays in sorted-row order: dy_a = w_a g_t(a) and dw_a = <y_a, g_t(a)>
    from one gather of g, instead of autograd's [T, K, D] temporaries and zero-filled ``index_put_``."""

    @staticmethod
    def forward(ctx, y_AD, weight_A, token_idx_A, inverse_A, T, K):
        ctx.save_for_backward(y_AD, weight_A, token_idx_A)
        return _combine_forward(y_AD, weight_A, inverse_A, T, K)

    @staticmethod
    def backward(ctx, g_TD):
        y_AD, weight_A, token_idx_A = ctx.saved_tensors
        if all(ctx.needs_input_grad[:2]) and g_TD.device.type == "cpu" and y_AD.shape[0]:
            grads = _COMBINE_BACKWARD((g_TD, y_AD.detach(), weight_A.detach(), token_idx_A))
            if grads is not None:
                return grads[0], grads[1], None, None, None, None
        g_AD = g_TD.to(y_AD.dtype).index_select(0, token_idx_A)
        dw_A = None
        if ctx.needs_input_grad[1]:
            # products and sum in y's dtype (the sum accumulates in fp32); an fp32 upcast of [A, D] costs more
            dw_A = (y_AD * g_AD).sum(-1).to(weight_A.dtype)
        dy_AD = g_AD.mul_(weight_A.to(g_AD.dtype).unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return dy_AD, dw_A, None, None, None, None


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
