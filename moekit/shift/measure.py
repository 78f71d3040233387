"""Recording routings on real text, and the ``moekit shift REF OTHER`` verb.

Legend: T tokens, E experts, K top-k, B batch, S sequence.

``RoutingRecorder`` puts a forward pre-hook on every MoE layer: it routes the layer's input with the layer's own
router (eval mode: no training noise), which is the routing the layer's forward then uses, and keeps the chosen
experts and the routing distribution on the CPU. Both models read the same validation windows (the first
``batches`` of the corpus's validation split, in order), so token t of one is token t of the other, each model
on its own hidden states: the shift measured is the one the modified model really has on its own path.

    shift(ref, other, corpus) -> ShiftReport   per layer: changed shares, top-1 agreement, KL, load; both losses
    ShiftReport.write(out)                     shift.json, shift.md and shift.png (changed shares per layer)

Imports: ``moekit.shift.metrics``, ``moekit.layer``, ``moekit.formats``, ``moekit.train.data``, ``moekit.plotting``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from moekit.layer.moe import MoE
from moekit.shift.metrics import LayerShift, shift_counts

PRUNING_FILE = "pruning.json"  # written by moekit prune: {"kept_experts": {layer path: [reference ids]}, ...}


class RoutingRecorder:
    """``with RoutingRecorder(model) as rec:`` every forward of the model appends, per MoE layer path, the chosen
    experts [T, K] (int64) and routing distribution [T, E] (fp32) of that call to ``rec.calls[path]``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for path, m in self.model.named_modules():
            if isinstance(m, MoE):
                self.calls[path] = []
                self._handles.append(m.register_forward_pre_hook(self._hook(path)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, path: str):
        def record(moe: MoE, args: tuple) -> None:
            x_TD = args[0].detach().reshape(-1, moe.dim)
            with torch.no_grad():
                r = moe.router(x_TD)
            self.calls[path].append((r.topk_idx_TK.cpu(), r.probs_TE.float().cpu()))
        return record

    def routing(self, path: str) -> tuple[Tensor, Tensor]:
        """All recorded calls of one layer, concatenated over tokens."""
        calls = self.calls[path]
        return torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls])


@dataclass
class ShiftReport:
    """Expert shift of ``other`` against ``ref`` per MoE layer, and both models' loss on the same tokens."""

    ref: str
    other: str
    corpus: str
    tokens: int
    layers: list[LayerShift]
    ref_loss: float
    other_loss: float
    host: str = field(default_factory=lambda: platform.processor() or platform.machine())
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    command: str = ""

    def mean(self, name: str) -> float:
        """The mean of one metric over the layers."""
        return sum(getattr(s, name) for s in self.layers) / max(1, len(self.layers))

    @property
    def ref_perplexity(self) -> float:
        return math.exp(self.ref_loss)

    @property
    def other_perplexity(self) -> float:
        return math.exp(self.other_loss)

    def to_dict(self) -> dict:
        return {"ref": self.ref, "other": self.other, "corpus": self.corpus, "tokens": self.tokens,
                "ref_loss": self.ref_loss, "other_loss": self.other_loss, "ref_perplexity": self.ref_perplexity,
                "other_perplexity": self.other_perplexity, "host": self.host, "date": self.date,
                "command": self.command,
                "mean": {k: self.mean(k) for k in ("changed_any", "changed_half", "changed_all", "top1_agreement",
                                                   "kl", "load_tv")},
                "layers": [s.to_dict() for s in self.layers]}

    def table(self) -> str:
        """A markdown table, one row per layer and the mean."""
        head = ("| layer | changed: >= 1 of top-k | >= half | all | top-1 agreement | KL (nats) | load TV |\n"
                "|---|---:|---:|---:|---:|---:|---:|")
        rows = [f"| {s.layer} | {s.changed_any:.1%} | {s.changed_half:.1%} | {s.changed_all:.1%} | "
                f"{s.top1_agreement:.1%} | {s.kl:.4f} | {s.load_tv:.3f} |" for s in self.layers]
        rows.append(f"| **mean** | {self.mean('changed_any'):.1%} | {self.mean('changed_half'):.1%} | "
                    f"{self.mean('changed_all'):.1%} | {self.mean('top1_agreement'):.1%} | {self.mean('kl'):.4f} | "
                    f"{self.mean('load_tv'):.3f} |")
        return "\n".join([head, *rows])

    def markdown(self) -> str:
        return (f"# Expert shift: {self.other} against {self.ref}\n\n"
                f"{self.tokens:,} tokens of {self.corpus} (validation split); host {self.host}; {self.date}"
                + (f"; `{self.command}`" if self.command else "") + "\n\n"
                f"Perplexity: reference {self.ref_perplexity:.3f}, other {self.other_perplexity:.3f} "
                f"({self.other_perplexity / self.ref_perplexity - 1:+.2%}).\n\n{self.table()}\n")

    def write(self, out: str | os.PathLike[str], plots: bool = True) -> Path:
        """shift.json and shift.md (and shift.png) into directory ``out``, each written atomically."""
        from moekit.formats.checkpoint import atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "shift.json", json.dumps(self.to_dict(), indent=2))
        atomic_write_text(out / "shift.md", self.markdown())
        if plots:
            plot_shift(self, out / "shift.png")
        return out


def plot_shift(report: ShiftReport, path: Path) -> None:
    """Changed shares and 1 - top-1 agreement per layer (left), KL per layer (right)."""
    from moekit.plotting import require_matplotlib

    plt = require_matplotlib()
    x = list(range(len(report.layers)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, label in (("changed_any", ">= 1 of top-k changed"), ("changed_half", ">= half changed"),
                        ("changed_all", "all changed")):
        a.plot(x, [100 * getattr(s, name) for s in report.layers], marker="o", label=label)
    a.plot(x, [100 * (1 - s.top1_agreement) for s in report.layers], marker="x", ls="--", label="top-1 changed")
    a.set_xlabel("MoE layer")
    a.set_ylabel("% of tokens")
    a.legend(fontsize=8)
    b.bar(x, [s.kl for s in report.layers])
    b.set_xlabel("MoE layer")
    b.set_ylabel("KL(ref || other), nats")
    fig.suptitle(f"expert shift: {Path(report.other).name} vs {Path(report.ref).name} ({report.tokens:,} tokens)",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def validation_batches(model: nn.Module, corpus: str | os.PathLike[str], batches: int = 8, batch_size: int = 4,
                       seq_len: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
                       progress: bool = False) -> list[tuple[Tensor, Tensor]]:
    """The first ``batches`` (input, target) windows of the corpus's validation split, in the model's tokenizer."""
    from moekit.train.data import prepare_data

    tok = getattr(model, "tokenizer", None) or "byte"
    data, _ = prepare_data(corpus=corpus, tokenizer=tok, cache_dir=cache_dir, progress=progress)
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    out = list(data.val_batches(batch_size, seq_len, batches))
    if not out:
        raise ValueError(f"corpus: {corpus}'s validation split holds no window of {seq_len} tokens")
    return out


@torch.no_grad()
def record(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], desc: str = "routing",
           progress: bool = False) -> tuple[RoutingRecorder, float]:
    """Run the model on (input, target) batches with a recorder on; the recorder and the mean next-token loss (nats;
    NaN where every target is None)."""
    was = model.training
    model.eval()
    total = count = 0.0
    batches = list(batches)
    try:
        with RoutingRecorder(model) as rec:
            for x, y in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                if y is None:
                    model(x, aux=False)
                    continue
                total += float(model(x, y, aux=False).lm_loss) * y.numel()
                count += y.numel()
    finally:
        model.train(was)
    if not rec.calls:
        raise ValueError("the model has no MoE layers: there is no routing to compare")
    return rec, total / count if count else math.nan


def compare_routings(ref: RoutingRecorder, other: RoutingRecorder,
                     expert_maps: dict[str, list[int]] | None = None) -> list[LayerShift]:
    """Per-layer shift between two recorders that saw the same tokens."""
    missing = [p for p in ref.calls if p not in other.calls]
    if missing:
        raise ValueError(f"other: has no MoE layer {missing[0]} (its MoE layers: {', '.join(other.calls) or 'none'})")
    out = []
    for path in ref.calls:
        r_idx, r_p = ref.routing(path)
        o_idx, o_p = other.routing(path)
        emap = None if expert_maps is None else expert_maps.get(path)
        out.append(shift_counts(r_idx, r_p, o_idx, o_p, emap).result(path))
    return out


def expert_maps_of(path: str | os.PathLike[str]) -> dict[str, list[int]] | None:
    """A pruned checkpoint's kept experts per layer (its ``pruning.json``), or None for any other directory."""
    from moekit.formats.paths import resolve_checkpoint

    f = resolve_checkpoint(path) / PRUNING_FILE
    if not f.is_file():
        return None
    try:
        return {k: [int(e) for e in v] for k, v in json.loads(f.read_text())["kept_experts"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not a valid pruning record ({e})") from e


def shift(ref: str | os.PathLike[str], other: str | os.PathLike[str], corpus: str | os.PathLike[str] = "stdlib",
          batches: int = 8, batch_size: int = 4, seq_len: int | None = None,
          out: str | os.PathLike[str] | None = None, plots: bool = True, dtype: str | None = "auto",
          cache_dir: str | os.PathLike[str] | None = None, progress: bool = True, command: str = "") -> ShiftReport:
    """Expert shift of checkpoint ``other`` against checkpoint ``ref`` on the validation split of ``corpus``
    (the function behind ``moekit shift``); with ``out``, the report is written there too."""
    from moekit.formats.load import from_pretrained

    progress = progress and sys.stderr.isatty()
    ref_model = from_pretrained(ref, dtype=dtype)
    other_model = from_pretrained(other, dtype=dtype)
    if ref_model.config.vocab_size != other_model.config.vocab_size:
        raise ValueError(f"other: vocabulary of {other_model.config.vocab_size} tokens, the reference's "
                         f"{ref_model.config.vocab_size}: the two models must read the same tokens")
    data = validation_batches(ref_model, corpus, batches, batch_size, seq_len, cache_dir, progress)
    rec_ref, loss_ref = record(ref_model, data, "reference", progress)
    del ref_model
    rec_other, loss_other = record(other_model, data, "other", progress)
    layers = compare_routings(rec_ref, rec_other, expert_maps_of(other))
    report = ShiftReport(str(ref), str(other), str(corpus), sum(int(y.numel()) for _, y in data), layers,
                         loss_ref, loss_other, command=command)
    if out is not None:
        report.write(out, plots)
    return report
