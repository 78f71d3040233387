"""Quality at a fixed budget: MoE against its dense-active twin (``moekit compare`` at benchmark scale).

Runs ``compare`` on the built-in standard-library corpus and, when ``../shared/data`` is present, on
WikiText-2 (train on the validation split, validate on the test split). Records per model the
validation curve, the final loss and training tokens/s, and the tokens the MoE model needed to reach
the dense-active model's final loss (the report also shows where the curves cross).

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
from moekit.compare import compare  # noqa: E402
from moekit.config import ModelConfig, MoEConfig  # noqa: E402
from moekit.train import DataSpec, TrainConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def moe_config(n_experts: int, top_k: int, expert_ffn_dim: int, expert_bias: bool) -> ModelConfig:
    """The probe's shape: byte-level, d=192, 4 layers; dense-active twin width follows from the costs."""
    return ModelConfig(vocab_size=256, dim=192, n_layers=4, n_heads=6, ffn_dim=512, max_seq_len=256,
                       moe=MoEConfig(n_experts=n_experts, top_k=top_k, expert_ffn_dim=expert_ffn_dim,
                                     aux_loss_coef=0.0 if expert_bias else 0.01, expert_bias=expert_bias,
                                     bias_update_rate=1e-3),
                       name=f"q-e{n_experts}k{top_k}f{expert_ffn_dim}{'-bias' if expert_bias else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=6e6, help="training tokens per model (default 6M)")
    p.add_argument("--corpora", default="stdlib,wikitext2", help="comma-separated: stdlib, wikitext2")
    p.add_argument("--n-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn-dim", type=int, default=256)
    p.add_argument("--aux-loss", action="store_true",
                   help="balance with the Switch loss (coef 0.01) instead of the aux-loss-free bias rule")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    _tune_allocator([sys.executable, *sys.argv])

    tokens_per_step = args.batch_size * args.seq_len
    steps = max(10, int(args.tokens // tokens_per_step))
    tc = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     warmup_steps=min(100, steps // 10), eval_every=max(1, steps // 20), eval_batches=16,
                     log_every=max(1, steps // 50))
    specs = {"stdlib": DataSpec(corpus="stdlib")}
    if (SHARED / "wikitext2-valid.txt").is_file():
        specs["wikitext2"] = DataSpec(corpus=str(SHARED / "wikitext2-valid.txt"),
                                      val_path=str(SHARED / "wikitext2-test.txt"))
    out = Path(args.out)
    summary = {}
    for corpus in args.corpora.split(","):
        if corpus not in specs:
            print(f"skipping {corpus}: not available")
            continue
        cfg = moe_config(args.n_experts, args.top_k, args.expert_ffn_dim, not args.aux_loss)
        res = compare(cfg, tc, specs[corpus], name=f"{cfg.name}-{corpus}", runs_dir=out / "runs")
        moe, dense = res["models"]["moe"], res["models"]["dense_active"]
        need = res["moe_tokens_to_dense_active_final_loss"]
        summary[corpus] = {
            "config": cfg.name, "train_config": dataclasses.asdict(tc),
            "moe_final_val_loss": moe["final_val_loss"], "dense_final_val_loss": dense["final_val_loss"],
            "moe_tokens_per_s": moe["train_tokens_per_s"], "dense_tokens_per_s": dense["train_tokens_per_s"],
            "tokens_per_s_ratio": moe["train_tokens_per_s"] / dense["train_tokens_per_s"],
            "moe_tokens_to_dense_final": need,
            "token_fraction": need / dense["tokens_trained"] if need else None,
            "crossover": res["crossover"],
            "moe_curve": moe["curve"], "dense_curve": dense["curve"],
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'corpus':10} {'MoE loss':>9} {'dense loss':>10} {'tok/s ratio':>11} {'tokens to dense final':>22}")
    for corpus, s in summary.items():
        frac = f"{s['token_fraction']:.0%}" if s["token_fraction"] else "not reached"
        print(f"{corpus:10} {s['moe_final_val_loss']:9.4f} {s['dense_final_val_loss']:10.4f} "
              f"{s['tokens_per_s_ratio']:11.2f} {frac:>22}")
    print(f"\nwrote {out / 'compare_quality.json'}")


if __name__ == "__main__":
    main()
