"""Which MoE configuration learns fastest per token against the same dense-active twin?

Trains one dense model and several MoE variants of the same active width on the same data, seed and
schedule (the compare_quality.py shape: byte-level, d=192, 4 layers), each in a fresh process, and reports
per variant the final validation loss, the tokens it needed to reach the dense model's final loss, and
training tokens/s against dense. A variant is written ``e<E>k<K>f<F>[s<S>][-aux[C]][-br<R>][-sig][-rlr<X>]``:
E routed experts of width F, top-K, an optional shared expert of width S; balancing by the Switch loss with
coefficient C (default 0.01) instead of the aux-loss-free bias, or the bias with update rate R (default 1e-3);
sigmoid router scores (DeepSeek-V3) instead of softmax; router learning-rate scale X. A trailing ``-total``
trains that shape's dense twin with the same TOTAL parameters instead (the usual upper bound on what an MoE
model of that size learns per token). All MoE variants must have the same active FFN width (K*F + S); the dense
model is the first variant's dense-active twin.

    python benchmarks/moe_search.py --tokens 2e6 --variants e8k2f256,e16k2f256,e32k2f256,e16k4f128
    python benchmarks/moe_search.py --tokens 2e6 --variants e8k2f256-total

Prints a table and writes benchmarks/results/moe_search.json; a later search with the same budget, seed and
corpus adds its variants to that file and reuses its dense run. tokens/s is only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compare_quality import budget_train_config, corpus_specs, probe_model  # noqa: E402  (same directory)

from moekit.cli import _tune_allocator  # noqa: E402
from moekit.compare.runner import _run_isolated, crossover_tokens  # noqa: E402
from moekit.config import ModelConfig, MoEConfig  # noqa: E402
from moekit.model.costs import dense_twin  # noqa: E402

VARIANT = re.compile(r"e(\d+)k(\d+)f(\d+)(?:s(\d+))?(?:-aux([0-9.e-]*))?(?:-br([0-9.e-]+))?(-sig)?"
                     r"(?:-rlr([0-9.]+))?(-total)?$")


def variant_config(spec: str) -> tuple[ModelConfig, float]:
    """(model config, router lr scale) for a variant string such as ``e16k4f128s128``."""
    m = VARIANT.match(spec)
    if not m:
        raise ValueError(f"--variants: cannot parse {spec!r} "
                         "(expected e<E>k<K>f<F>[s<S>][-aux[C]][-br<R>][-sig][-rlr<X>][-total])")
    e, k, f = int(m[1]), int(m[2]), int(m[3])
    shared, aux = int(m[4] or 0), m[5] is not None
    aux_coef = float(m[5] or 0.01) if aux else 0.0
    rate, sigmoid, rlr = float(m[6] or 1e-3), bool(m[7]), float(m[8] or 1.0)
    moe = MoEConfig(n_experts=e, top_k=k, expert_ffn_dim=f, aux_loss_coef=aux_coef, expert_bias=not aux,
                    bias_update_rate=rate, score_func="sigmoid" if sigmoid else "softmax",
                    n_shared_experts=1 if shared else 0, shared_expert_ffn_dim=shared or None)
    cfg = probe_model(moe, f"search-{spec}")
    if m[9]:  # the dense twin with the MoE shape's total parameter count
        return dataclasses.replace(dense_twin(cfg, "total"), name=f"search-{spec}"), rlr
    return cfg, rlr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=2e6, help="training tokens per model (default 2M)")
    p.add_argument("--variants", default="e8k2f256,e16k2f256,e32k2f256,e16k4f128")
    p.add_argument("--corpus", default="stdlib", choices=["stdlib", "wikitext2"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    _tune_allocator([sys.executable, *sys.argv])

    variants = [variant_config(v) for v in args.variants.split(",")]
    # the MoE shape of every variant (a -total variant's own shape) fixes the active width
    moes = [(variant_config(name.removesuffix("-total"))[0], name) for name in args.variants.split(",")]
    dense = dense_twin(moes[0][0], "active")
    for cfg, name in moes:
        # the router's parameters count as active too, so widths differ by a few units; 2% is one active size
        if abs(dense_twin(cfg, "active").ffn_dim - dense.ffn_dim) > 0.02 * dense.ffn_dim:
            raise ValueError(f"--variants: {name} has dense-active width {dense_twin(cfg, 'active').ffn_dim}, "
                             f"the first variant {dense.ffn_dim}; compare variants of one active width")
    tc = budget_train_config(args.tokens, args.batch_size, args.seq_len, args.lr, args.seed)
    specs = corpus_specs()
    if args.corpus not in specs:
        raise SystemExit(f"--corpus: {args.corpus} is not available (WikiText-2 needs ../shared/data)")
    spec = specs[args.corpus]
    spec.load(progress=True)  # tokenize once; the children find the cache
    out = Path(args.out)
    runs = out / "runs" / f"search-{args.corpus}-s{args.seed}"
    results: dict = {"train_config": dataclasses.asdict(tc), "corpus": args.corpus, "models": {}}
    previous = out / "moe_search.json"
    if previous.is_file():  # same budget, seed and corpus: keep the earlier variants and the dense run
        old = json.loads(previous.read_text())
        if old.get("train_config") == results["train_config"] and old.get("corpus") == args.corpus:
            results["models"] = old["models"]

    def run(label: str, cfg: ModelConfig, rlr: float) -> dict:
        t = dataclasses.replace(tc, router_lr_scale=rlr)
        r = _run_isolated((label, cfg.to_dict(), dataclasses.asdict(t), dataclasses.asdict(spec),
                           str(runs / label), False))
        keep = ("total_params", "active_params", "final_val_loss", "tokens_trained", "train_tokens_per_s", "curve",
                "peak_memory_bytes")
        results["models"][label] = {k: r[k] for k in keep}
        out.mkdir(parents=True, exist_ok=True)
        (out / "moe_search.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"{label:24} loss {r['final_val_loss']:.4f}  {r['train_tokens_per_s']:7.0f} tok/s", flush=True)
        return results["models"][label]

    d = results["models"].get("dense") or run("dense", dense, 1.0)
    rows = []
    for (cfg, rlr), name in zip(variants, args.variants.split(",")):
        r = run(name, cfg, rlr)
        need = crossover_tokens(r["curve"], d["final_val_loss"])
        r["tokens_to_dense_final"] = need
        r["token_fraction"] = need / d["tokens_trained"] if need else None
        r["tokens_per_s_ratio"] = r["train_tokens_per_s"] / d["train_tokens_per_s"]
        rows.append((name, r))
    (out / "moe_search.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'model':24} {'total':>9} {'active':>9} {'val loss':>9} {'tok/s vs dense':>15} {'tokens to dense':>16}")
    print(f"{'dense':24} {d['total_params']:9,} {d['active_params']:9,} {d['final_val_loss']:9.4f} {1.0:15.2f}")
    for name, r in rows:
        frac = f"{r['token_fraction']:.0%}" if r["token_fraction"] else "not reached"
        print(f"{name:24} {r['total_params']:9,} {r['active_params']:9,} {r['final_val_loss']:9.4f} "
              f"{r['tokens_per_s_ratio']:15.2f} {frac:>16}")
    print(f"\nwrote {out / 'moe_search.json'}")


if __name__ == "__main__":
    main()
