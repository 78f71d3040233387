"""Static expert pruning: drop the experts a model's routers rarely pick (``moekit prune SRC DST``).

Legend: E experts before, N kept per layer, K top-k, D dim.

"Not All Experts are Equal" (Lu et al., ACL 2024) removes whole experts per layer; the simplest rule, and the one
here, keeps the N experts each layer routes most tokens to on calibration text (ties broken by the summed routing
probability, then by expert id). ``rule="random"`` keeps N random experts per layer: the baseline a rule must beat.

    count      each MoE layer's assignments per expert on ``calib_sequences`` seeded windows of the corpus
    choose     the N kept experts of every layer (frequency, or random)
    cut        the experts' stacked weights [E, ...] and the router's rows (weight [E, D], bias, selection bias)
               keep the chosen indices, in their original order; the config's ``moe.n_experts`` becomes N
    measure    validation loss before and after, and the routing shift of the pruned model (moekit.shift)
    write      DST (atomically): a plain moekit checkpoint, plus ``pruning.json`` naming the kept experts

The pruned router picks its top-k among the kept experts. Experts that were never routed leave every output as
it was when the combine weights are renormalised over the chosen k (``norm_topk_prob``, the default, or Mixtral's
softmax after top-k) or the scores are sigmoids; a softmax router without renormalisation redistributes the
removed experts' (small) probability over the kept ones. One expert count holds for every layer (one
``MoEConfig``), so the pruned checkpoint loads, trains, converts to Hugging Face and goes through ``moekit costs``
like any other. Group-limited routers (DeepSeek's ``n_groups``) and one router shared by all layers are refused:
pruning would break their groups or give one router several expert sets.

Imports: ``moekit.compress.calibrate``, ``moekit.shift``, ``moekit.formats``, ``moekit.layer``, ``moekit.model``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import corpus_batches
from moekit.layer.moe import MoE
from moekit.shift.measure import PRUNING_FILE, compare_routings, record, validation_batches

RULES = ("frequency", "random")


@dataclass
class PruneResult:
    """What ``prune`` kept and measured."""

    dst: str
    rule: str
    experts_before: int
    experts_after: int
    kept_experts: dict[str, list[int]]  # MoE layer path -> the source's ids of the kept experts, ascending
    frequency: dict[str, list[float]]  # MoE layer path -> each source expert's share of the assignments
    params_before: int
    params_after: int
    active_params: int
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    shift: dict[str, dict[str, Any]] = field(default_factory=dict)  # per layer (moekit.shift.LayerShift)
    seconds: float = 0.0

    @property
    def perplexity_before(self) -> float | None:
        return None if self.val_loss_before is None else math.exp(self.val_loss_before)

    @property
    def perplexity_after(self) -> float | None:
        return None if self.val_loss_after is None else math.exp(self.val_loss_after)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity_before": self.perplexity_before, "perplexity_after": self.perplexity_after}


def experts_to_keep(n_experts: int, top_k: int, experts_per_layer: int | None = None,
                    drop_frac: float | None = None) -> int:
    """N, the experts kept per layer, from exactly one of ``experts_per_layer`` and ``drop_frac``; checked."""
    if (experts_per_layer is None) == (drop_frac is None):
        raise ValueError("prune: give exactly one of experts_per_layer (--experts-per-layer N) and drop_frac "
                         "(--drop-frac F)")
    if drop_frac is not None:
        if not (isinstance(drop_frac, (int, float)) and 0 <= drop_frac < 1):
            raise ValueError(f"drop_frac: must be in [0, 1), got {drop_frac!r}")
        n = n_experts - round(drop_frac * n_experts)
        what = f"drop_frac={drop_frac:g} of {n_experts} experts leaves {n}"
    else:
        n = experts_per_layer
        what = f"experts_per_layer={n}"
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}: a layer needs at least one expert (pruning all experts of a layer is not possible)")
    if n > n_experts:
        raise ValueError(f"experts_per_layer: {n} exceeds the model's {n_experts} experts per layer")
    if n < top_k:
        raise ValueError(f"{what}, fewer experts than top_k={top_k}: each token must still find {top_k} experts "
                         "(lower moe.top_k first, or keep more experts)")
    return n


def choose_experts(counts_E: Tensor, probs_E: Tensor, n_keep: int, rule: str = "frequency",
                   generator: torch.Generator | None = None) -> list[int]:
    """The kept experts of one layer, ascending: the ``n_keep`` most routed (ties: summed probability, then id), or
    ``n_keep`` random ones."""
    if rule not in RULES:
        raise ValueError(f"rule: unknown value {rule!r}; expected one of {', '.join(RULES)}")
    E = counts_E.numel()
    if rule == "random":
        return sorted(torch.randperm(E, generator=generator)[:n_keep].tolist())
    c, p = counts_E.tolist(), probs_E.tolist()
    return sorted(sorted(range(E), key=lambda e: (-c[e], -p[e], e))[:n_keep])


@torch.no_grad()
def prune_model(model: nn.Module, kept: dict[str, list[int]]) -> nn.Module:
    """A new model with only the ``kept`` experts of every MoE layer (the same count in each); ``model`` is left
    as it was. The tokenizer and Hugging Face token ids travel along."""
    from moekit.formats.checkpoint import build_empty, load_into

    cfg = model.config
    moes = {p: m for p, m in model.named_modules() if isinstance(m, MoE)}
    if set(kept) != set(moes):
        raise ValueError(f"kept: names {sorted(kept)}, the model's MoE layers are {sorted(moes)}")
    sizes = {len(v) for v in kept.values()}
    if len(sizes) != 1:
        raise ValueError(f"kept: every MoE layer must keep the same number of experts, got {sorted(sizes)}")
    n = sizes.pop()
    state = dict(model.state_dict())
    for path, moe in moes.items():
        E = moe.config.n_experts
        idx = torch.tensor(kept[path], dtype=torch.long)
        if idx.unique().numel() != n or int(idx.min()) < 0 or int(idx.max()) >= E:
            raise ValueError(f"kept[{path!r}]: must be {n} distinct expert ids in [0, {E}), got {kept[path]}")
        for key in list(state):
            if key.startswith((f"{path}.experts.", f"{path}.router.")) and state[key].shape[:1] == (E,):
                state[key] = state[key].index_select(0, idx).clone()
    new_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, n_experts=n))
    pruned = load_into(build_empty(new_cfg), state, "pruned model")
    for attr in ("tokenizer", "hf_token_ids"):
        if hasattr(model, attr):
            setattr(pruned, attr, getattr(model, attr))
    return pruned.train(model.training)


def _check_prunable(model: nn.Module, src: Any) -> None:
    from moekit.compress.modules import QuantizedExperts

    moe_cfg = model.config.moe
    if moe_cfg is None or not model.moe_layers:
        raise ValueError(f"{src}: the model has no MoE layers, so there are no experts to prune")
    if any(isinstance(m, QuantizedExperts) for m in model.modules()):
        raise ValueError(f"{src}: a compressed checkpoint; prune the uncompressed model, then compress the result")
    if moe_cfg.n_groups > 1:
        raise ValueError(f"{src}: moe.n_groups={moe_cfg.n_groups}: group-limited routing needs whole groups; pruning "
                         "experts out of them is not supported")
    if moe_cfg.shared_router:
        raise ValueError(f"{src}: moe.shared_router: one router serves every layer, so experts cannot be pruned "
                         "per layer")


def prune(src: str | os.PathLike[str], dst: str | os.PathLike[str], experts_per_layer: int | None = None,
          drop_frac: float | None = None, rule: str = "frequency", calib: str | os.PathLike[str] = "stdlib",
          calib_sequences: int = 32, calib_seq_len: int | None = None, eval_batches: int = 8, seed: int = 0,
          cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> PruneResult:
    """Prune checkpoint ``src`` to N experts per MoE layer and write the result to ``dst`` (the function behind
    ``moekit prune``); see the module docstring."""
    from moekit.formats.checkpoint import save_pretrained
    from moekit.formats.load import from_pretrained
    from moekit.model.costs import costs

    t0 = time.perf_counter()
    if rule not in RULES:
        raise ValueError(f"rule: unknown value {rule!r}; expected one of {', '.join(RULES)}")
    model = from_pretrained(src, dtype="stored")
    _check_prunable(model, src)
    E, K = model.config.moe.n_experts, model.config.moe.top_k
    n = experts_to_keep(E, K, experts_per_layer, drop_frac)
    progress = progress and sys.stderr.isatty()
    model.eval()
    rec, _ = record(model, ((x, None) for x in corpus_batches(model, calib, calib_sequences, calib_seq_len, seed=seed,
                                                           cache_dir=cache_dir, progress=progress)),
                    "counting routes", progress)
    gen = torch.Generator().manual_seed(seed)
    kept, freq = {}, {}
    for path in rec.calls:
        idx_TK, probs_TE = rec.routing(path)
        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
        freq[path] = (counts_E.double() / max(1, idx_TK.numel())).tolist()
        kept[path] = choose_experts(counts_E, probs_TE.double().sum(0), n, rule, gen)
    pruned = prune_model(model, kept)
    val = validation_batches(model, calib, eval_batches, cache_dir=cache_dir)
    rec_ref, before = record(model, val, "evaluating", progress)
    rec_new, after = record(pruned, val, "evaluating", progress)
    shift = {s.layer: s.to_dict() for s in compare_routings(rec_ref, rec_new, kept)}
    c0, c1 = costs(model.config), costs(pruned.config)
    result = PruneResult(str(dst), rule, E, n, kept, freq, c0.total_params, c1.total_params, c1.active_params,
                         before, after, shift)
    record_json = {"source": str(src), "rule": rule, "seed": seed, "calib": str(calib),
                   "experts_before": E, "experts_after": n, "kept_experts": kept, "frequency": freq,
                   "val_loss_before": before, "val_loss_after": after}
    save_pretrained(pruned, dst, extra_files={PRUNING_FILE: json.dumps(record_json, indent=2)})
    result.seconds = time.perf_counter() - t0
    return result
