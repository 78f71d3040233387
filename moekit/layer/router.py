"""The router: token -> (top-k experts, combine weights).

Legend: T tokens, D dim, E experts, K top-k, G expert groups.

One class with independent options (the behaviour matrix of Megatron-Core's
``topk_routing_with_score_function``):

  scores   softmax(logits) or sigmoid(logits)                       -> scores_TE
  choice   scores + expert_bias (selection only, DeepSeek-V3 §2.1.2)  -> choice_TE
           group-limited: keep the best ``topk_groups`` of ``n_groups`` groups (DeepSeek-V2 §2.1.2, V3)
  select   topk(choice, K)                                           -> topk_idx_TK
  weights  scores[topk] (or softmax over the chosen logits, Mixtral),
           optionally renormalised to sum 1, times routed_scaling_factor -> topk_weight_TK

All router math runs in fp32 (float64 in a float64 model) whatever the model dtype (autocast is disabled
here): bf16 routers flip expert choices on near-ties (vLLM PR #58076) and are a known train/infer mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig


@dataclass
class RoutingResult:
    """What the router decided for T tokens; plain tensors, consumed by the dispatcher.

    ``weight_scale_T`` lets a later stage (capacity rerouting) weight any other expert the way the
    router weighted the chosen ones: ``weight(t, e) = scores_TE[t, e] * weight_scale_T[t]``.
    """

    topk_idx_TK: Tensor  # int64, experts chosen per token, best first
    topk_weight_TK: Tensor  # fp32 combine weights
    logits_TE: Tensor  # fp32 raw router logits (for the z-loss)
    scores_TE: Tensor  # fp32 softmax probabilities or sigmoid scores
    choice_TE: Tensor  # fp32 selection scores: scores + bias, -inf outside the chosen groups
    weight_scale_T: Tensor  # fp32, see above
    softmax_scores: bool = True  # scores_TE are softmax probabilities (else sigmoid scores)

    @property
    def probs_TE(self) -> Tensor:
        """Per-token distribution over experts used by the balancing losses.

        Softmax scores already sum to 1; sigmoid scores are normalised per token, as in the
        DeepSeek-V3 sequence-wise balance loss (DeepSeek-V3 report, eq. 18).
        """
        s = self.scores_TE
        return s if self.softmax_scores else s / s.sum(-1, keepdim=True).clamp_min(1e-20)


class RouteSpec(NamedTuple):
    """The ``MoEConfig`` fields ``route`` reads, hashable: the constants of a compiled decode step."""

    top_k: int
    score_func: str
    n_groups: int
    topk_groups: int
    group_score: str
    softmax_after_topk: bool
    norm_topk_prob: bool
    routed_scaling_factor: float

    @classmethod
    def of(cls, cfg: MoEConfig) -> RouteSpec:
        return cls(*(getattr(cfg, f) for f in cls._fields))


class Router(nn.Module):
    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        E = config.n_experts
        self.weight = nn.Parameter(torch.empty(E, dim))
        self.bias = nn.Parameter(torch.zeros(E)) if config.router_bias else None
        # Selection-only balancing bias: a buffer (not trained by autograd), always fp32.
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _apply(self, fn, recurse=True):  # keep the balancing bias in fp32 under .to(bf16)
        eb = self.expert_bias
        super()._apply(fn, recurse)
        if eb is not None and self.expert_bias.dtype != torch.float32:
            # restore the exact fp32 values (a round trip through bf16 would erase small bias updates)
            self.expert_bias = eb.float().to(self.expert_bias.device)
        return self

    def forward(self, x_TD: Tensor) -> RoutingResult:
        cfg = self.config
        with torch.autocast(x_TD.device.type, enabled=False):
            dtype = torch.promote_types(x_TD.dtype, torch.float32)  # fp32, or float64 for a float64 model
            x_TD = x_TD.to(dtype)
            if self.training and cfg.input_jitter_eps > 0:
                # multiplicative jitter on the router input (Switch Transformer §2.4)
                eps = cfg.input_jitter_eps
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
            logits_TE = router_logits(x_TD, self.weight, self.bias)
            if self.training and cfg.logit_noise_std > 0:
                # noisy top-k gating (Shazeer et al. 2017, eq. 4), fixed noise scale
                logits_TE = logits_TE + torch.randn_like(logits_TE) * cfg.logit_noise_std
            return route(logits_TE, cfg, self.expert_bias)

    @property
    def noisy(self) -> bool:
        """Does this forward add training noise (input jitter, logit noise)?"""
        return self.training and (self.config.input_jitter_eps > 0 or self.config.logit_noise_std > 0)

    @torch.no_grad()
    def update_bias(self, load_E: Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_e += rate * sign(mean load - load_e).

        Called outside autograd after the optimizer step with the assignments each expert received
        (summed over the micro-batches of the step). Overloaded experts become less likely to be
        chosen; the combine weights never see the bias.
        """
        if self.expert_bias is None:
            raise ValueError("expert_bias: this router has no selection bias (set MoEConfig.expert_bias=True)")
        load_E = load_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)


def router_logits(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None) -> Tensor:
    """logits = x W^T + b in x's dtype promoted to at least fp32 (see the module docstring)."""
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    return F.linear(x_TD.to(dtype), weight_ED.to(dtype), None if bias_E is None else bias_E.to(dtype))


def route(logits_TE: Tensor, cfg: MoEConfig | RouteSpec, expert_bias_E: Tensor | None = None) -> RoutingResult:
    """Scores, group-limited top-k selection and combine weights, from fp32 logits."""
    K = cfg.top_k
    softmax = cfg.score_func == "softmax"
    scores_TE = softmax_last(logits_TE) if softmax else logits_TE.sigmoid()

    choice_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E
    if cfg.n_groups > 1:
        choice_TE = _limit_groups(choice_TE, cfg)
    topk_idx_TK = choice_TE.topk(K, dim=-1).indices

    if cfg.softmax_after_topk:
        # Mixtral's formulation: softmax over the chosen k logits (always sums to 1)
        topk_weight_TK = logits_TE.gather(-1, topk_idx_TK).softmax(-1)
        weight_scale_T = 1.0 / scores_TE.gather(-1, topk_idx_TK).sum(-1)
    else:
        topk_weight_TK = scores_TE.gather(-1, topk_idx_TK)
        if cfg.norm_topk_prob and K > 1:
            denom_T = topk_weight_TK.sum(-1) + 1e-20
            topk_weight_TK = topk_weight_TK / denom_T[:, None]
            weight_scale_T = 1.0 / denom_T
        else:
            weight_scale_T = torch.ones_like(scores_TE[:, 0])
    if cfg.routed_scaling_factor != 1.0:
        topk_weight_TK = topk_weight_TK * cfg.routed_scaling_factor
        weight_scale_T = weight_scale_T * cfg.routed_scaling_factor
    return RoutingResult(topk_idx_TK, topk_weight_TK, logits_TE, scores_TE, choice_TE, weight_scale_T, softmax)


def softmax_last(logits_TE: Tensor) -> Tensor:
    """softmax over the last dim. torch's CPU kernel vectorises along that dim, so below one vector (16 fp32
    lanes with AVX-512) it runs 3-4x slower than the same math as whole-tensor ops (*ad hoc*, [4096, 8]:
    forward 324 against 92 us, forward and backward 469 against 268 us; at 16 experts and more torch's is
    faster): 8-expert routers there take the explicit form."""
    if logits_TE.device.type != "cpu" or logits_TE.shape[-1] >= 16:
        return logits_TE.softmax(-1)
    return _SmallSoftmax.apply(logits_TE)


class _SmallSoftmax(torch.autograd.Function):
    """p = exp(l - max l) / sum exp(l - max l); backward dl = p * (g - <g, p>)."""

    @staticmethod
    def forward(ctx, logits_TE: Tensor) -> Tensor:
        e_TE = (logits_TE - logits_TE.amax(-1, keepdim=True)).exp_()
        p_TE = e_TE.div_(e_TE.sum(-1, keepdim=True))
        ctx.save_for_backward(p_TE)
        return p_TE

    @staticmethod
    def backward(ctx, g_TE: Tensor) -> Tensor:
        (p_TE,) = ctx.saved_tensors
        return p_TE * (g_TE - (g_TE * p_TE).sum(-1, keepdim=True))


def _limit_groups(choice_TE: Tensor, cfg: MoEConfig) -> Tensor:
    """Mask experts outside the best ``topk_groups`` groups with -inf.

    A group's score is the sum of its two best experts (DeepSeek-V3, HF ``noaux_tc``) or its best
    expert (DeepSeek-V2 ``group_limited_greedy``).
    """
    T, E = choice_TE.shape
    G = cfg.n_groups
    grouped_TGX = choice_TE.view(T, G, E // G)
    if cfg.group_score == "top2_sum":
        group_score_TG = grouped_TGX.topk(2, dim=-1).values.sum(-1)
    else:
        group_score_TG = grouped_TGX.amax(-1)
    top_groups_TG = group_score_TG.topk(cfg.topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
    keep_TE = keep_TG[:, :, None].expand(T, G, E // G).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))
