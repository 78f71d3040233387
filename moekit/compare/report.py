"""The ``compare`` report: report.md (table, who wins which axis, plots inlined) and its PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.model.costs import format_bytes, format_count, format_flops
from moekit.plotting import require_matplotlib

LABELS = {"moe": "MoE", "dense_active": "dense (same active params)", "dense_total": "dense (same total params)"}

# (key, row title, formatter, which direction wins: "low", "high" or None for descriptive rows)
AXES: list[tuple[str, str, Any, str | None]] = [
    ("total_params", "total parameters", format_count, "low"),
    ("active_params", "active parameters / token", format_count, None),
    ("flops_per_token", "forward FLOPs / token", format_flops, "low"),
    ("weight_bytes_bf16", "weight memory (bf16)", format_bytes, "low"),
    ("kv_cache_bytes_per_token_bf16", "KV cache / token (bf16)", format_bytes, "low"),
    ("tokens_trained", "tokens trained", format_count, None),
    ("final_val_loss", "final validation loss (nats/token)", lambda v: f"{v:.4f}", "low"),
    ("train_seconds", "training wall-clock (s)", lambda v: f"{v:.1f}", "low"),
    ("train_tokens_per_s", "training tokens/s (after the first step)", lambda v: f"{v:,.0f}", "high"),
    ("train_first_step_seconds", "first training step (s: compilation, warm-up)", lambda v: f"{v:.1f}", "low"),
    ("decode_ms_per_token", "decode latency, batch 1 (ms/token)", lambda v: f"{v:.2f}", "low"),
    ("prefill_tokens_per_s", "batched prefill (tokens/s)", lambda v: f"{v:,.0f}", "high"),
    ("peak_memory_bytes", "peak memory", format_bytes, "low"),
]


TIE = 0.02  # relative differences under 2% are reported as ties: below this machine's run-to-run noise


def _verdicts(models: dict[str, dict[str, Any]]) -> list[str]:
    """One plain sentence per axis: who wins and by how much (dense wins are stated just the same)."""
    if "moe" not in models:
        return []
    moe = models["moe"]
    lines = []
    for other_key in [k for k in models if k != "moe"]:
        other = models[other_key]
        lines += ["", f"MoE against {LABELS[other_key]}:", ""]
        for key, title, fmt, better in AXES:
            a, b = moe.get(key), other.get(key)
            if better is None or a is None or b is None:
                continue
            if key == "final_val_loss":
                if abs(a - b) < 0.005:
                    lines.append(f"- **{title}**: a tie ({fmt(a)} vs {fmt(b)}).")
                    continue
            elif max(a, b) == 0 or abs(a - b) / max(abs(a), abs(b)) < TIE:
                lines.append(f"- **{title}**: about equal, within {TIE:.0%} ({fmt(a)} vs {fmt(b)}).")
                continue
            moe_wins = (a < b) if better == "low" else (a > b)
            win, lose = (a, b) if moe_wins else (b, a)
            who = "MoE" if moe_wins else LABELS[other_key]
            if key == "final_val_loss":
                detail = f"{fmt(win)} vs {fmt(lose)}, {abs(a - b):.4f} nats lower"
            else:
                ratio = lose / win if better == "low" else win / lose
                detail = f"{fmt(win)} vs {fmt(lose)}, {ratio:.2f}x"
            lines.append(f"- **{title}**: {who} wins ({detail}).")
    return lines


def _dtype_line(results: dict[str, Any]) -> str:
    """The compute dtype, how it was chosen, and the host it was chosen for (older results have no host)."""
    dtype = results.get("dtype", results["train_config"].get("dtype", "?"))
    how = " (auto)" if results.get("dtype_requested") == "auto" else ""
    h = results.get("host")
    if not h:
        return f"dtype {dtype}{how}"
    bf16 = "native bf16" if h.get("native_bf16") else "no native bf16"
    return f"dtype {dtype}{how}; host {h['cpu_model']}, {h['kind']} (ATen {h['cpu_capability']}, {bf16})"


def write_report(results: dict[str, Any], out: Path, plots: bool = True) -> Path:
    models: dict[str, dict[str, Any]] = results["models"]
    names = list(models)
    if plots:
        write_plots(results, out)
    lines = [f"# moekit compare: {results['name']}", ""]
    tc = results["train_config"]
    lines += [
        f"Data: `{results['data']['corpus']}` ({results['data']['tokenizer']} tokenizer, vocab "
        f"{results['tokenizer_vocab_size']}); {tc['steps']} steps of {tc['batch_size']}x{tc['seq_len']} tokens"
        f" x{tc['grad_accum']} accumulation; lr {tc['lr']}; seed {tc['seed']}; device {results['device']}, "
        f"{results['threads']} threads, torch {results['torch']}; {_dtype_line(results)}. "
        + ("Every model was trained and measured in its own fresh process, on the same data order."
           if results.get("isolated") else "All models were trained in one process, on the same data order."),
        "",
        "| axis | " + " | ".join(LABELS.get(n, n) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, title, fmt, _ in AXES:
        cells = [fmt(models[n][key]) if models[n].get(key) is not None else "n/a" for n in names]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if "moe" in models and models["moe"].get("imbalance_curve"):
        last = models["moe"]["imbalance_curve"][-1]["load_imbalance"]
        lines.append("| MoE load imbalance at the end (max/mean, per layer) | "
                     + ", ".join(f"{v:.2f}" for v in last) + " |" + " |" * (len(names) - 1))
    peak_kind = models[names[0]].get("peak_memory_kind", "")
    lines += ["", f"Peak memory is the {peak_kind} of the process that trained and measured the model"
              + (f" (the bare process held {format_bytes(models[names[0]]['baseline_memory_bytes'])} before"
                 " the model was built)." if models[names[0]].get("baseline_memory_bytes") else "."), ""]
    lines += ["## Who wins what"] + _verdicts(models)
    cross = results.get("crossover")
    need = results.get("moe_tokens_to_dense_active_final_loss")
    dense_tokens = models.get("dense_active", {}).get("tokens_trained")
    lines.append("")
    if need is not None and dense_tokens:
        lines.append(f"- The MoE model reached the dense-active model's final validation loss after "
                     f"{format_count(need)} tokens, {need / dense_tokens:.0%} of the dense model's "
                     f"{format_count(dense_tokens)}.")
    else:
        lines.append("- The MoE model did not reach the dense-active model's final validation loss within the budget.")
    if cross:
        who = "the MoE model overtakes" if cross["direction"] == "moe_overtakes" else "the dense model overtakes"
        n = cross.get("n_crossings", 1)
        lines.append(f"- Crossover: {who} at about {format_count(cross['tokens'])} tokens and stays ahead to the end"
                     + (f" (the curves crossed {n} times; this is the last)." if n > 1 else "."))
    else:
        pairs = [(a["val_loss"], b["val_loss"]) for a, b in
                 zip(models.get("moe", {}).get("curve", []), models.get("dense_active", {}).get("curve", []))]
        if pairs and all(a < b for a, b in pairs):
            lines.append("- The validation curves do not cross: the MoE model is ahead at every validation point.")
        elif pairs and all(a > b for a, b in pairs):
            lines.append("- The validation curves do not cross: the dense-active model is ahead at every validation "
                         "point.")
        else:
            lines.append("- The validation curves do not cross within the budget.")
    if plots:
        lines += ["", "## Plots", "",
                  "![validation loss vs tokens](loss_vs_tokens.png)",
                  "![validation loss vs training FLOPs](loss_vs_flops.png)",
                  "![validation loss vs wall-clock](loss_vs_time.png)"]
        if "moe" in models and models["moe"].get("expert_load"):
            lines += ["![expert load heatmap](expert_load.png)", "![load imbalance over training](load_imbalance.png)"]
    lines += ["", "Raw numbers: `results.json`; training logs: `<model>/metrics.jsonl`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    plt = require_matplotlib()
    models = results["models"]
    written = []
    for fname, xkey, xlabel in [("loss_vs_tokens.png", "tokens", "training tokens"),
                                ("loss_vs_flops.png", "flops", "training FLOPs"),
                                ("loss_vs_time.png", "train_seconds", "training wall-clock (s)")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, m in models.items():
            xs = [p["tokens"] * m["train_flops_per_token"] if xkey == "flops" else p[xkey] for p in m["curve"]]
            ax.plot(xs, [p["val_loss"] for p in m["curve"]], marker="o", ms=3, label=LABELS.get(label, label))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)
    moe = models.get("moe")
    if moe and moe.get("expert_load"):
        load = moe["expert_load"]
        fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * len(load)))
        im = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title("share of routed assignments over training")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        curve = moe["imbalance_curve"]
        for layer in range(len(curve[0]["load_imbalance"]) if curve else 0):
            ax.plot([p["tokens"] for p in curve], [p["load_imbalance"][layer] for p in curve], label=f"layer {layer}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("load imbalance (max/mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "load_imbalance.png", dpi=110)
        plt.close(fig)
        written += [out / "expert_load.png", out / "load_imbalance.png"]
    return written
