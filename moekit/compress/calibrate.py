"""The calibration pass: run a model on calibration text and keep, for every MoE layer, its input rows and the
router's real decisions on them (and, when asked, the input rows of every dense projection).

Legend: T calibration tokens, D dim, E experts, K top-k, N rows of one expert, B batch, S sequence.

Forward pre-hooks on the MoE layers record the layer's input x [T, D] (the normed hidden state) and route it with
the layer's own router (eval mode: no training noise), which is exactly the routing the layer's forward then
uses, so each expert is later calibrated on the tokens the model really sends it (GPTQ's per-expert Hessians,
the allocator's measured errors). Rows are kept in fp32 on the CPU up to ``max_tokens`` per layer: inputs, not
Hessians, are kept, since E Hessians of [D, D] outweigh T rows of D for any T < E D. Routing statistics per expert:
``frequency_E`` (share of tokens that pick it) and ``weight_E`` (summed combine weight).

Imports: ``moekit.layer``, ``moekit.model``, ``moekit.train.data``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moekit.layer.experts import MLP
from moekit.layer.moe import MoE
from moekit.model.transformer import Transformer


@dataclass
class MoECalibration:
    """One MoE layer's calibration rows: inputs x [T, D], chosen experts and combine weights [T, K]."""

    x_TD: Tensor
    topk_idx_TK: Tensor
    topk_weight_TK: Tensor
    n_experts: int

    def __post_init__(self) -> None:
        T = self.x_TD.shape[0]
        if self.topk_idx_TK.shape[0] != T or self.topk_weight_TK.shape != self.topk_idx_TK.shape:
            raise ValueError(f"calibration: x has {T} rows but the routing is {list(self.topk_idx_TK.shape)} / "
                             f"{list(self.topk_weight_TK.shape)}")

    @property
    def tokens(self) -> int:
        return self.x_TD.shape[0]

    @property
    def counts_E(self) -> Tensor:
        """Tokens routed to each expert."""
        return torch.bincount(self.topk_idx_TK.reshape(-1), minlength=self.n_experts)

    @property
    def frequency_E(self) -> Tensor:
        """Share of the tokens that pick each expert (sums to K)."""
        return self.counts_E.double() / max(1, self.tokens)

    @property
    def weight_E(self) -> Tensor:
        """Summed combine weight each expert received."""
        w = torch.zeros(self.n_experts, dtype=torch.float64)
        return w.index_add_(0, self.topk_idx_TK.reshape(-1), self.topk_weight_TK.reshape(-1).double())

    def routed(self, e: int, all_tokens: bool = False) -> tuple[Tensor, Tensor]:
        """(x [N, D], combine weight [N]) of the tokens routed to expert ``e``; ``all_tokens``: every token, with
        weight 0 where e was not chosen (GPTQ's ``calibrate_all_experts`` reads x only)."""
        hit_TK = self.topk_idx_TK == e
        w_T = (self.topk_weight_TK * hit_TK).sum(-1)
        if all_tokens:
            return self.x_TD, w_T
        rows = hit_TK.any(-1).nonzero().squeeze(-1)
        return self.x_TD[rows], w_T[rows]


@dataclass
class Calibration:
    """Every MoE layer's rows (by module path, e.g. ``layers.1.ffn``) and, when collected, the input rows of the
    dense modules (``layers.0.attn.wq``, ``layers.0.ffn`` for a dense FFN, ``layers.1.ffn.shared``)."""

    moe: dict[str, MoECalibration] = field(default_factory=dict)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    tokens: int = 0


class _Recorder:
    """Forward pre-hooks that append each watched module's input rows until ``max_tokens``."""

    def __init__(self, model: Transformer, max_tokens: int, dense: bool):
        self.max_tokens = max_tokens
        self.x: dict[str, list[Tensor]] = {}
        self.idx: dict[str, list[Tensor]] = {}
        self.w: dict[str, list[Tensor]] = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, MoE):
                self.handles.append(m.register_forward_pre_hook(self._moe_hook(name)))
            elif dense and (isinstance(m, MLP) or (isinstance(m, nn.Linear) and ".attn." in f".{name}")):
                self.handles.append(m.register_forward_pre_hook(self._dense_hook(name)))

    def _room(self, name: str) -> int:
        return self.max_tokens - sum(t.shape[0] for t in self.x.get(name, []))

    def _moe_hook(self, name: str):
        def hook(module: MoE, args: tuple) -> None:
            room = self._room(name)
            if room <= 0:
                return
            x_TD = args[0].reshape(-1, module.dim)[:room].detach()
            routing = module.router(x_TD)
            self.x.setdefault(name, []).append(x_TD.float().cpu())
            self.idx.setdefault(name, []).append(routing.topk_idx_TK.cpu())
            self.w.setdefault(name, []).append(routing.topk_weight_TK.float().cpu())
        return hook

    def _dense_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            room = self._room(name)
            if room > 0:
                x = args[0]
                self.x.setdefault(name, []).append(x.reshape(-1, x.shape[-1])[:room].detach().float().cpu())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def calibrate(model: Transformer, batches: Iterable[Tensor], max_tokens: int = 8192, dense: bool = False,
              progress: bool = True, total: int | None = None) -> Calibration:
    """Run ``model`` (eval mode) on token batches ids [B, S] and return the rows its MoE layers (and, with
    ``dense``, its attention projections and dense FFNs) saw, at most ``max_tokens`` per module."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
    was_training = model.training
    model.eval()
    rec = _Recorder(model, max_tokens, dense)
    device = next(model.parameters()).device
    seen = 0
    bar = tqdm(batches, total=total, desc="calibrating", unit="batch",
               disable=not progress or not sys.stderr.isatty())
    try:
        for ids_BS in bar:
            model(ids_BS.to(device), aux=False)
            seen += ids_BS.numel()
    finally:
        rec.remove()
        bar.close()
        model.train(was_training)
    cal = Calibration(tokens=seen)
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    for name, parts in rec.x.items():
        if name in moes:
            cal.moe[name] = MoECalibration(torch.cat(parts), torch.cat(rec.idx[name]), torch.cat(rec.w[name]),
                                           moes[name].config.n_experts)
        else:
            cal.inputs[name] = torch.cat(parts)
    return cal


def corpus_batches(model: Transformer, corpus: str | os.PathLike[str], n_sequences: int = 32,
                   seq_len: int | None = None, batch_size: int = 8, seed: int = 0, split: str = "train",
                   cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Iterator[Tensor]:
    """``n_sequences`` random windows (seeded) of a corpus's ``split``, tokenized with the model's tokenizer (the
    byte tokenizer when it has none), as ids [B, S] batches. ``corpus``: anything ``moekit.train.corpora`` takes."""
    from moekit.train.data import prepare_data

    tok = getattr(model, "tokenizer", None) or "byte"
    data, _ = prepare_data(corpus=corpus, tokenizer=tok, cache_dir=cache_dir, progress=progress)
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    left = n_sequences
    while left > 0:
        x, _ = data.get_batch(split, min(batch_size, left), seq_len, gen)
        left -= x.shape[0]
        yield x
