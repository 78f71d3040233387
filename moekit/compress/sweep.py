"""``moekit compress SRC --sweep 8,4,3,2.5,2 --out DIR``: one model compressed at several budgets, uniform against
mixed allocation, with what each bit saved and cost — a report a user reads in a minute.

For every budget: ``compress`` with one width for every expert (uniform) and with per-expert widths (mixed, over
``seeds`` calibration samples); the effective bits, the expert bytes, the validation perplexity before and after
(with ``calib``) and the batch-1 decode tokens/s of the compressed checkpoint (``decode_step``, the same prompt and
token count for each; the source model is timed before and after the sweep and its mean is the baseline). DIR gets
``results.json``, ``report.md`` (host, date, command, one table) and, with matplotlib, ``sweep.png`` (perplexity,
memory and decode speed against effective bits, uniform against mixed) and ``widths.png`` (each mixed run's width per
layer and expert, seed 0). DIR is built beside its final path and renamed into place: a failed sweep leaves nothing.

Imports: ``moekit.compress``, ``moekit.formats``, ``moekit.model``, ``moekit.host``, ``moekit.plotting``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moekit import host
from moekit.compress.checkpoint import load_compressed
from moekit.compress.runner import compress


def parse_budgets(text: str) -> list[float]:
    """``"8,4,3,2.5"`` -> [8.0, 4.0, 3.0, 2.5] (a clear error naming the bad item)."""
    out = []
    for item in text.split(","):
        try:
            b = float(item)
        except ValueError:
            raise ValueError(f"--sweep: {item!r} is not a number of bits (expected e.g. 8,4,3,2.5,2)") from None
        if not b > 0:
            raise ValueError(f"--sweep: {item!r} is not a positive number of bits")
        out.append(b)
    if not out:
        raise ValueError("--sweep: no budgets given (expected e.g. 8,4,3,2.5,2)")
    return out


@torch.no_grad()
def decode_tokens_per_s(model, tokens: int = 16, prompt: int = 16, seed: int = 0) -> float:
    """Batch-1 decode tokens/s after a ``prompt``-token prompt (random ids; two warm-up steps)."""
    from moekit.model.decode import decode_step
    from moekit.model.generate import prefill
    from moekit.model.transformer import KVCache

    cfg = model.config
    prompt = max(1, min(prompt, cfg.max_seq_len - tokens - 3))
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(seed))
    cache = KVCache(cfg, 1, max_len=prompt + tokens + 3)
    prefill(model.eval(), ids, cache)
    nxt = ids[:, -1:]
    for _ in range(2):
        decode_step(model, nxt, cache)
    t0 = time.perf_counter()
    for _ in range(tokens):
        decode_step(model, nxt, cache)
    return tokens / (time.perf_counter() - t0)


def _expert_widths(widths: dict[str, Any]) -> list[list[int]]:
    """The per-expert widths of each MoE layer's routed experts, in layer order."""
    return [list(w) for path, w in sorted(widths.items(), key=lambda kv: _layer_key(kv[0]))
            if isinstance(w, list) and path.endswith(".experts")]


def _layer_key(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def sweep(src: str | os.PathLike[str], out: str | os.PathLike[str], budgets: list[float], method: str = "rtn",
          group_size: int | None = 128, calib: str | None = None, seeds: int = 1, decode_tokens: int = 16,
          plots: bool = True, progress: bool = True, command: str | None = None, **compress_args) -> dict[str, Any]:
    """Compress ``src`` at each of ``budgets`` (uniform, and mixed over ``seeds`` seeds), measure, and write the
    report into ``out`` (which must not exist). Returns the results dictionary written to ``results.json``."""
    from moekit.formats.load import from_pretrained

    out = Path(out)
    if out.exists():
        raise ValueError(f"--out: {out} exists; give a new directory for the sweep report")
    if seeds < 1:
        raise ValueError(f"seeds: {seeds}; at least 1")
    if plots:
        from moekit.plotting import require_matplotlib

        require_matplotlib()
    plan = [(b, False, 0) for b in budgets] + [(b, True, s) for b in budgets for s in range(seeds)]
    source = from_pretrained(src, dtype="stored").eval()
    base_before = decode_tokens_per_s(source, decode_tokens)
    runs = []
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        bar = tqdm(plan, desc="compress sweep", unit="run", disable=not progress, dynamic_ncols=True)
        for i, (bits, mixed, seed) in enumerate(bar):
            bar.set_postfix(bits=bits, allocation="mixed" if mixed else "uniform")
            dst = work / f"run{i}"
            res = compress(src, dst, bits, method=method, group_size=group_size, calib=calib, mixed=mixed,
                           seed=seed, progress=False, **compress_args)
            tps = decode_tokens_per_s(load_compressed(dst, tokenizer=False), decode_tokens)
            shutil.rmtree(dst)  # the report keeps the numbers, not every checkpoint
            runs.append({"bits": bits, "allocation": "mixed" if mixed else "uniform", "seed": seed,
                         "effective_bits": res.effective_bits, "weight_bytes_before": res.weight_bytes_before,
                         "weight_bytes_after": res.weight_bytes_after, "compression": res.compression,
                         "perplexity_before": res.perplexity_before, "perplexity_after": res.perplexity_after,
                         "decode_tokens_per_s": tps, "expert_widths": _expert_widths(res.widths),
                         "seconds": res.seconds})
        base_after = decode_tokens_per_s(source, decode_tokens)
        base = (base_before + base_after) / 2
        for r in runs:
            r["decode_vs_source"] = r["decode_tokens_per_s"] / base
        results = {"source": str(src), "method": method, "group_size": group_size, "calib": calib, "seeds": seeds,
                   "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command, "host": host.probe_host().to_dict(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "source_decode_tokens_per_s": [base_before, base_after], "runs": runs}
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (work / "report.md").write_text(report_markdown(results))
        if plots:
            write_plots(results, work)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if progress:
        print(f"wrote {out}/report.md, results.json" + (", sweep.png, widths.png" if plots else ""), file=sys.stderr)
    return results


def _summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (budget, allocation): mixed runs averaged over their seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["bits"], r["allocation"]), []).append(r)
    rows = []
    for (bits, alloc), rs in groups.items():
        ppl = [r["perplexity_after"] for r in rs if r["perplexity_after"] is not None]
        rows.append({"bits": bits, "allocation": alloc, "n": len(rs),
                     "effective_bits": statistics.mean(r["effective_bits"] for r in rs),
                     "weight_bytes_after": statistics.mean(r["weight_bytes_after"] for r in rs),
                     "compression": statistics.mean(r["compression"] for r in rs),
                     "perplexity_before": rs[0]["perplexity_before"],
                     "perplexity_after": statistics.mean(ppl) if ppl else None,
                     "perplexity_spread": (max(ppl) - min(ppl)) if len(ppl) > 1 else None,
                     "decode_vs_source": statistics.mean(r["decode_vs_source"] for r in rs)})
    return sorted(rows, key=lambda r: (-r["bits"], r["allocation"]))


def report_markdown(results: dict[str, Any]) -> str:
    h = results["host"]
    lines = [f"# Compression sweep: {results['source']}", "",
             f"{results['created']}; host {h.get('cpu_model')} ({h.get('kind')}, {h.get('cpu_count')} CPUs), torch "
             f"{results['torch']}, {results['threads']} threads; method {results['method']}, group size "
             f"{results['group_size'] or 'row'}, calibration {results['calib'] or 'none (weight-space error)'}; mixed "
             f"runs averaged over {results['seeds']} seed(s).", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    base = statistics.mean(results["source_decode_tokens_per_s"])
    lines += [f"Source decode: {base:.1f} tokens/s (batch 1, `decode_step`).", "",
              "| budget (bits) | allocation | effective bits | expert MB (x smaller) | perplexity (change) | decode x source |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in _summary(results):
        if r["perplexity_after"] is None:
            ppl = "not measured (no --calib)"
        else:
            ppl = f"{r['perplexity_after']:.3f} ({r['perplexity_after'] / r['perplexity_before'] - 1:+.1%})"
            if r["perplexity_spread"] is not None:
                ppl += f", spread {r['perplexity_spread']:.3f}"
        lines.append(f"| {r['bits']:g} | {r['allocation']} | {r['effective_bits']:.2f} | "
                     f"{r['weight_bytes_after'] / 1e6:.2f} ({r['compression']:.2f}x) | {ppl} | "
                     f"{r['decode_vs_source']:.2f} |")
    first = results["runs"][0]
    if first["perplexity_before"] is not None:
        lines += ["", f"Source perplexity: {first['perplexity_before']:.3f}."]
    lines += ["", "Expert MB: the quantized weights' codes, scales and zeros (before: "
              f"{first['weight_bytes_before'] / 1e6:.2f} MB in the stored dtype). Raw numbers: `results.json`.", ""]
    return "\n".join(lines)


def write_plots(results: dict[str, Any], directory: Path) -> None:
    from moekit.plotting import require_matplotlib

    plt = require_matplotlib()
    rows = _summary(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for alloc, marker in (("uniform", "o"), ("mixed", "s")):
        rs = sorted((r for r in rows if r["allocation"] == alloc), key=lambda r: r["effective_bits"])
        x = [r["effective_bits"] for r in rs]
        if all(r["perplexity_after"] is not None for r in rs):
            axes[0].plot(x, [r["perplexity_after"] for r in rs], marker=marker, label=alloc)
        axes[1].plot(x, [r["weight_bytes_after"] / 1e6 for r in rs], marker=marker, label=alloc)
        axes[2].plot(x, [r["decode_vs_source"] for r in rs], marker=marker, label=alloc)
    if rows and rows[0]["perplexity_before"] is not None:
        axes[0].axhline(rows[0]["perplexity_before"], color="gray", ls="--", label="source")
    for ax, label in zip(axes, ("validation perplexity", "expert weights (MB)", "decode tokens/s, x source")):
        ax.set_xlabel("effective bits per weight")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results['source']}: {results['method']}, group {results['group_size'] or 'row'}")
    fig.tight_layout()
    fig.savefig(directory / "sweep.png", dpi=120)
    plt.close(fig)
    mixed = [r for r in results["runs"] if r["allocation"] == "mixed" and r["seed"] == 0 and r["expert_widths"]]
    if mixed:
        fig, axes = plt.subplots(1, len(mixed), figsize=(2.8 * len(mixed) + 1, 3), squeeze=False,
                                 constrained_layout=True)
        for i, (ax, r) in enumerate(zip(axes[0], mixed)):
            layers, experts = len(r["expert_widths"]), len(r["expert_widths"][0])
            im = ax.imshow(r["expert_widths"], aspect="auto", cmap="viridis", vmin=2, vmax=8)
            ax.set_title(f"budget {r['bits']:g} (eff {r['effective_bits']:.2f})", fontsize=9)
            ax.set_xticks(range(0, experts, max(1, experts // 8)))
            ax.set_yticks(range(layers))
            ax.set_xlabel("expert")
            if i == 0:
                ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=axes[0].tolist(), label="bits", ticks=[2, 3, 4, 8])
        fig.savefig(directory / "widths.png", dpi=120)
        plt.close(fig)
