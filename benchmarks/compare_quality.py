"""Quality at a fixed budget: MoE against its dense-active twin (``moekit compare`` at benchmark scale).

Runs ``compare`` on the built-in standard-library corpus and, when ``../shared/data`` is present, on
WikiText-2 (train on the validation split, validate on the test split). Records per model the
validation curve, the final loss and training tokens/s, and the tokens the MoE model needed to reach
the dense-active model's final loss, measured two ways:

* on the curve: where the full-budget MoE run's validation curve first reaches the dense final loss. With a
  cosine schedule this is pessimistic: the MoE point is mid-schedule (high learning rate, not annealed) while
  the dense final loss is annealed.
* budget-matched (``--budget-fractions``): the MoE model trained again with a fraction of the budget and its
  own full schedule; the budget at which its final loss equals the dense final loss is interpolated between
  the fractions run (and the full run). This is what "training the MoE model on fewer tokens" means.

    python benchmarks/compare_quality.py                     # ~30 min per corpus on 2 CPU cores
    python benchmarks/compare_quality.py --tokens 1e6 --corpora stdlib   # a quick look

Prints a table and writes benchmarks/results/compare_quality.json (runs under benchmarks/results/runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.cli import _tune_allocator  # noqa: E402
from moekit.compare.runner import _run_isolated, compare  # noqa: E402
from moekit.config import ModelConfig, MoEConfig  # noqa: E402
from moekit.train.trainer import DataSpec, TrainConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def probe_model(moe: MoEConfig, name: str) -> ModelConfig:
    """The probe's shape: byte-level, d=192, 4 layers; the dense-active twin's width follows from the costs."""
    return ModelConfig(vocab_size=256, dim=192, n_layers=4, n_heads=6, ffn_dim=512, max_seq_len=256, moe=moe,
                       name=name)


def moe_config(n_experts: int, top_k: int, expert_ffn_dim: int, expert_bias: bool,
               bias_rate: float = 1e-3) -> ModelConfig:
    bias = f"-bias{bias_rate:g}" if expert_bias else ""
    return probe_model(MoEConfig(n_experts=n_experts, top_k=top_k, expert_ffn_dim=expert_ffn_dim,
                                 aux_loss_coef=0.0 if expert_bias else 0.01, expert_bias=expert_bias,
                                 bias_update_rate=bias_rate),
                       f"q-e{n_experts}k{top_k}f{expert_ffn_dim}{bias}")


def budget_train_config(tokens: float, batch_size: int, seq_len: int, lr: float, seed: int = 0) -> TrainConfig:
    """Warmup (10% up to 100 steps) + cosine over the token budget, 20 validation points."""
    steps = max(10, int(tokens // (batch_size * seq_len)))
    return TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                       warmup_steps=min(100, steps // 10), eval_every=max(1, steps // 20), eval_batches=16,
                       log_every=max(1, steps // 50))


def corpus_specs() -> dict[str, DataSpec]:
    """The built-in corpus, and WikiText-2 (train on valid, validate on test) when ../shared/data has it."""
    specs = {"stdlib": DataSpec(corpus="stdlib")}
    if (SHARED / "wikitext2-valid.txt").is_file():
        specs["wikitext2"] = DataSpec(corpus=str(SHARED / "wikitext2-valid.txt"),
                                      val_path=str(SHARED / "wikitext2-test.txt"))
    return specs


def budget_matched(cfg: ModelConfig, tc: TrainConfig, spec: DataSpec, runs: Path, fractions: list[float],
                   moe_full: dict, dense_final: float) -> dict:
    """Train the MoE model on fractions of the budget (each with its own warmup + cosine schedule) and
    interpolate the budget at which its final validation loss equals the dense model's."""
    points = []  # (tokens, final loss), the full run included
    runs_out = []
    for f in sorted(set(fractions)):
        steps = max(10, round(tc.steps * f))
        t = dataclasses.replace(tc, steps=steps, warmup_steps=min(tc.warmup_steps, steps // 10),
                                eval_every=max(1, steps // 10))
        r = _run_isolated(("moe", cfg.to_dict(), dataclasses.asdict(t), dataclasses.asdict(spec),
                           str(runs / f"moe-budget-{f:g}"), False))
        runs_out.append({"fraction": f, "tokens": r["tokens_trained"], "final_val_loss": r["final_val_loss"]})
        points.append((r["tokens_trained"], r["final_val_loss"]))
    points.append((moe_full["tokens_trained"], moe_full["final_val_loss"]))
    points.sort()
    need = None
    for (t0, l0), (t1, l1) in zip([(0, float("inf"))] + points, points):
        if l1 <= dense_final:
            need = t1 if l0 == float("inf") else t0 + (t1 - t0) * (l0 - dense_final) / max(1e-12, l0 - l1)
            break
    full = moe_full["tokens_trained"]
    return {"runs": runs_out, "tokens_to_dense_final": need, "token_fraction": need / full if need else None,
            "note": "interpolated between MoE runs of different budgets, each with its own schedule"
            + ("; below the smallest budget run: at most that budget" if need == points[0][0] else "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=6e6, help="training tokens per model (default 6M)")
    p.add_argument("--corpora", default="stdlib,wikitext2", help="comma-separated: stdlib, wikitext2")
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn-dim", type=int, default=256)
    p.add_argument("--aux-loss", action="store_true",
                   help="balance with the Switch loss (coef 0.01) instead of the aux-loss-free bias rule")
    p.add_argument("--bias-rate", type=float, default=1e-3,
                   help="update rate of the aux-loss-free balancing bias (default 1e-3, DeepSeek-V3's)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--budget-fractions", default="0.7",
                   help="comma-separated fractions of the budget at which to train the MoE model again with its "
                        "own schedule (budget-matched tokens to the dense final loss); empty: skip")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    _tune_allocator([sys.executable, *sys.argv])

    tc = budget_train_config(args.tokens, args.batch_size, args.seq_len, args.lr)
    specs = corpus_specs()
    out = Path(args.out)
    summary = {}
    for corpus in args.corpora.split(","):
        if corpus not in specs:
            print(f"skipping {corpus}: not available")
            continue
        cfg = moe_config(args.n_experts, args.top_k, args.expert_ffn_dim, not args.aux_loss, args.bias_rate)
        res = compare(cfg, tc, specs[corpus], name=f"{cfg.name}-{corpus}", runs_dir=out / "runs")
        moe, dense = res["models"]["moe"], res["models"]["dense_active"]
        need = res["moe_tokens_to_dense_active_final_loss"]
        budget = budget_matched(cfg, tc, specs[corpus], out / "runs" / f"{cfg.name}-{corpus}",
                                [float(f) for f in args.budget_fractions.split(",") if f],
                                moe, dense["final_val_loss"])
        summary[corpus] = {
            "config": cfg.name, "train_config": dataclasses.asdict(tc),
            "moe_final_val_loss": moe["final_val_loss"], "dense_final_val_loss": dense["final_val_loss"],
            "moe_tokens_per_s": moe["train_tokens_per_s"], "dense_tokens_per_s": dense["train_tokens_per_s"],
            "tokens_per_s_ratio": moe["train_tokens_per_s"] / dense["train_tokens_per_s"],
            "moe_tokens_to_dense_final": need,
            "token_fraction": need / dense["tokens_trained"] if need else None,
            "crossover": res["crossover"],
            "budget_matched": budget,
            "moe_curve": moe["curve"], "dense_curve": dense["curve"],
        }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare_quality.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}  # runs of other corpora are kept
    merged.update(summary)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"\n{'corpus':10} {'MoE loss':>9} {'dense loss':>10} {'tok/s ratio':>11} {'on the curve':>13} "
          f"{'budget-matched':>15}")
    for corpus, s in summary.items():
        frac = f"{s['token_fraction']:.0%}" if s["token_fraction"] else "not reached"
        bm = s["budget_matched"]["token_fraction"]
        bm = "-" if not s["budget_matched"]["runs"] else f"{bm:.0%}" if bm else "not reached"
        print(f"{corpus:10} {s['moe_final_val_loss']:9.4f} {s['dense_final_val_loss']:10.4f} "
              f"{s['tokens_per_s_ratio']:11.2f} {frac:>13} {bm:>15}")
        for r in s["budget_matched"]["runs"]:
            print(f"{'':10} MoE trained on {r['fraction']:.0%} of the tokens (own schedule): {r['final_val_loss']:.4f}")
    print(f"\nwrote {out / 'compare_quality.json'}")


if __name__ == "__main__":
    main()
