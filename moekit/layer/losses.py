"""Load-balancing and router losses, returned explicitly (no module-level collectors).

Legend: T tokens, B sequences, S tokens per sequence, E experts, K top-k.

Reduction scope (what each loss averages over):
  * ``switch_aux_loss``: the tokens of ONE forward call of one MoE layer (the micro-batch). Under
    gradient accumulation each micro-batch gets its own loss, averaged like the LM loss.
  * ``seq_aux_loss``: each sequence separately, then the mean over sequences (DeepSeek-V3 eq. 17-20).
  * ``router_z_loss``: mean over the tokens of the micro-batch (ST-MoE eq. 5).
All three are normalised so that perfectly uniform routing gives 1 for the balance losses.
The coefficients are applied by the MoE layer (``MoEConfig.*_coef``), not here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_counts(topk_idx_TK: Tensor, n_experts: int) -> Tensor:
    """Assignments per expert, fp32, without a host sync."""
    counts_E = torch.zeros(n_experts, device=topk_idx_TK.device, dtype=torch.float32)
    idx_A = topk_idx_TK.reshape(-1)
    return counts_E.scatter_add_(0, idx_A, torch.ones_like(idx_A, dtype=torch.float32))


def switch_aux_loss(probs_TE: Tensor, topk_idx_TK: Tensor) -> Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e (Switch Transformer eq. 4-6).

    f_e: fraction of the T*K assignments routed to e (not differentiable); P_e: mean router
    probability of e. Uniform routing gives 1.
    """
    T, K = topk_idx_TK.shape
    E = probs_TE.shape[-1]
    P_E = _at_least_fp32(probs_TE).mean(0)
    f_E = expert_counts(topk_idx_TK, E).to(P_E.dtype) / (T * K)  # exact counts; divide in P's precision
    return E * (f_E * P_E).sum()


def seq_aux_loss(probs_BSE: Tensor, topk_idx_BSK: Tensor) -> Tensor:
    """Sequence-wise balance loss (DeepSeek-V3 eq. 17-20): the Switch loss per sequence, averaged."""
    B, S, K = topk_idx_BSK.shape
    E = probs_BSE.shape[-1]
    counts_BE = torch.zeros(B, E, device=probs_BSE.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, topk_idx_BSK.reshape(B, S * K), torch.ones(B, S * K, device=probs_BSE.device))
    P_BE = _at_least_fp32(probs_BSE).mean(1)
    f_BE = counts_BE.to(P_BE.dtype) / (S * K)
    return (E * (f_BE * P_BE).sum(-1)).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss mean_t (logsumexp_e logits_te)^2 (ST-MoE, Zoph et al. 2022, eq. 5)."""
    return torch.logsumexp(_at_least_fp32(logits_TE), dim=-1).square().mean()


def _at_least_fp32(t: Tensor) -> Tensor:
    """Upcast bf16/fp16 to fp32; keep float64 (a float64 layer must stay float64 for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
