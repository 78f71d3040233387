"""Expert shift: how far a modified model's routing moved from a reference's on the same tokens.

Legend: T tokens, E experts (of the reference), K top-k (the reference's), J experts of the other model.

Compressing, pruning or fine-tuning an MoE model changes the experts its routers pick, and that shift costs
quality on its own (EAC-MoE, ACL 2025, measures it on Mixtral as large as the quantization error itself). Per MoE
layer, over the tokens both models saw:

  changed_any    share of tokens where at least one of the reference's top-k experts is no longer chosen
  changed_half   ... where at least half of them (ceil(K / 2)) are not
  changed_all    ... where none of them is
  top1_agreement share of tokens whose best expert is the same
  kl             mean KL(p_ref || p_other) between the routing distributions (nats)
  load_ref_E / load_other_E   each expert's share of the assignments; load_tv = their total-variation distance

A pruned model numbers its experts 0..J-1; ``expert_map`` (other's expert j is the reference's expert
``expert_map[j]``, from the pruned checkpoint's ``pruning.json``) puts them back in the reference's numbering. Its
routing distribution then covers only the kept experts, so the KL is taken against the reference's distribution
restricted to them and renormalised (finite, and 0 when the kept experts are routed as before).

Everything here is counts (``ShiftCounts``): batches add up exactly, and ``result()`` divides once.

Imports: torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerShift:
    """One MoE layer's shift (see the module docstring)."""

    layer: str
    tokens: int
    changed_any: float
    changed_half: float
    changed_all: float
    top1_agreement: float
    kl: float
    load_ref: list[float]
    load_other: list[float]
    load_tv: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ShiftCounts:
    """Sums over tokens for one layer; ``+`` adds batches; ``result`` gives the shares."""

    tokens: int
    changed_any: int
    changed_half: int
    changed_all: int
    top1_same: int
    kl_sum: float
    load_ref_E: Tensor  # float64 assignment counts
    load_other_E: Tensor

    def __add__(self, other: ShiftCounts) -> ShiftCounts:
        return ShiftCounts(self.tokens + other.tokens, self.changed_any + other.changed_any,
                           self.changed_half + other.changed_half, self.changed_all + other.changed_all,
                           self.top1_same + other.top1_same, self.kl_sum + other.kl_sum,
                           self.load_ref_E + other.load_ref_E, self.load_other_E + other.load_other_E)

    def result(self, layer: str = "") -> LayerShift:
        T = max(1, self.tokens)
        ref_E = self.load_ref_E / self.load_ref_E.sum().clamp_min(1)
        other_E = self.load_other_E / self.load_other_E.sum().clamp_min(1)
        return LayerShift(layer, self.tokens, self.changed_any / T, self.changed_half / T, self.changed_all / T,
                          self.top1_same / T, self.kl_sum / T, ref_E.tolist(), other_E.tolist(),
                          float(0.5 * (ref_E - other_E).abs().sum()))


def _check(name: str, idx_TK: Tensor, probs_TE: Tensor) -> None:
    if idx_TK.dim() != 2 or probs_TE.dim() != 2 or idx_TK.shape[0] != probs_TE.shape[0]:
        raise ValueError(f"{name}: expected topk_idx [T, K] and probs [T, E] over the same T tokens, got "
                         f"{list(idx_TK.shape)} and {list(probs_TE.shape)}")


@torch.no_grad()
def shift_counts(ref_idx_TK: Tensor, ref_probs_TE: Tensor, other_idx_TJ: Tensor, other_probs_TJ: Tensor,
                 expert_map: Tensor | list[int] | None = None) -> ShiftCounts:
    """The counts of one batch: the reference's chosen experts (best first) and routing distribution against the
    other model's on the same tokens. ``expert_map``: see the module docstring (None: the same numbering)."""
    _check("reference", ref_idx_TK, ref_probs_TE)
    _check("other", other_idx_TJ, other_probs_TJ)
    T, K = ref_idx_TK.shape
    E = ref_probs_TE.shape[1]
    if other_idx_TJ.shape[0] != T:
        raise ValueError(f"other: routes {other_idx_TJ.shape[0]} tokens, the reference {T}")
    p_ref_TE = ref_probs_TE.double()
    p_oth = other_probs_TJ.double()
    if expert_map is None:
        if other_probs_TJ.shape[1] != E:
            raise ValueError(f"other: has {other_probs_TJ.shape[1]} experts, the reference {E}; pass expert_map "
                             "(a pruned model's pruning.json) to compare them")
        oth_idx_TK = other_idx_TJ
        p_oth_TE = p_oth
        p_cmp_TE = p_ref_TE
    else:
        map_J = torch.as_tensor(expert_map, dtype=torch.long)
        J = p_oth.shape[1]
        if map_J.numel() != J or map_J.unique().numel() != J or int(map_J.min()) < 0 or int(map_J.max()) >= E:
            raise ValueError(f"expert_map: must name {J} distinct experts of the reference's {E}, got "
                             f"{map_J.tolist()}")
        oth_idx_TK = map_J[other_idx_TJ]
        p_oth_TE = p_oth.new_zeros(T, E).index_copy_(1, map_J, p_oth)
        # the reference's distribution over the kept experts only (the other model cannot route elsewhere)
        kept_E = torch.zeros(E, dtype=torch.bool)
        kept_E[map_J] = True
        p_cmp_TE = p_ref_TE * kept_E
        p_cmp_TE = p_cmp_TE / p_cmp_TE.sum(-1, keepdim=True).clamp_min(1e-300)
    # how many of the reference's K experts the other model still chose, per token
    kept_T = (ref_idx_TK[:, :, None] == oth_idx_TK[:, None, :]).any(-1).sum(-1)
    lost_T = K - kept_T
    # KL(p || q) with 0 log 0 = 0; q is floored so a token the other model never routes somewhere stays finite
    log_ratio_TE = p_cmp_TE.clamp_min(1e-300).log() - p_oth_TE.clamp_min(1e-30).log()
    kl_T = torch.where(p_cmp_TE > 0, p_cmp_TE * log_ratio_TE, torch.zeros_like(p_cmp_TE)).sum(-1)
    return ShiftCounts(
        tokens=T,
        changed_any=int((lost_T >= 1).sum()),
        changed_half=int((lost_T >= math.ceil(K / 2)).sum()),
        changed_all=int((lost_T == K).sum()),
        top1_same=int((ref_idx_TK[:, 0] == oth_idx_TK[:, 0]).sum()),
        kl_sum=float(kl_T.clamp_min(0).sum()),
        load_ref_E=torch.bincount(ref_idx_TK.reshape(-1), minlength=E).double(),
        load_other_E=torch.bincount(oth_idx_TK.reshape(-1), minlength=E).double(),
    )


def layer_shift(ref_idx_TK: Tensor, ref_probs_TE: Tensor, other_idx_TJ: Tensor, other_probs_TJ: Tensor,
                expert_map: Tensor | list[int] | None = None, layer: str = "") -> LayerShift:
    """``shift_counts(...).result()``: one layer's shift from one batch of routings."""
    return shift_counts(ref_idx_TK, ref_probs_TE, other_idx_TJ, other_probs_TJ, expert_map).result(layer)
