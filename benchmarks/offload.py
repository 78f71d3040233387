#!/usr/bin/env python3
"""Expert offloading against the memory budget: "offloading destroys latency", measured.

A trained moekit checkpoint (real routing: a random model's router spreads tokens evenly and nothing repeats) is
run with its routed experts resident, and with them on disk under budgets of ``--budgets`` x the routed experts'
bytes (100%, 50%, 25%, 12.5%: slots per layer = that share of E), in three modes:

    prefetch  LRU pool + the next layer's router guessing its experts, read on a background thread (the default)
    lru       LRU pool, experts read when the layer asks for them
    naive     nothing kept between calls: every call reads all its experts (on-demand loading, the baseline)

Each configuration runs in its own spawned process (its peak resident memory is its own; the page cache of the
checkpoint's files is dropped first, so expert reads come from the disk, as they would for a model larger than
RAM). In each: a warm-up round (compiles the kernels), then ``--rounds`` rounds, each a different ``--prompt-tokens``
window of real text (Python's standard library source, the corpus ``moekit train`` uses by default) prefilled, then
``--new-tokens`` greedy decode steps at batch 1. Reported: decode and prefill tokens/s (medians), each as a
fraction of the resident model's; the pool's hit rate (prefetched experts' first uses and experts kept from earlier
tokens), the misses per decoded token (reads on the critical path), the prefetch's guess recall per layer, bytes
read per token, and peak RSS above the interpreter's against the resident weights plus the pool.

    moekit train --preset small --dim 384 --n-layers 6 --expert-ffn-dim 1024 --set n_heads=6 --set head_dim=64 \\
        --set n_kv_heads=6 --set moe.aux_loss_coef=0.01 --set moe.bias_update_rate=0.01 --steps 250 \\
        --batch-size 8 --seq-len 128 --dtype fp32 --out runs/offload-model
    python3 benchmarks/offload.py --checkpoint runs/offload-model

(That model's routed experts: 6 layers x 8 experts x 4.5 MiB = 216 MiB in fp32, larger than the L3 cache.) Prints a
table, writes ``benchmarks/results/offload.json`` and, with matplotlib, a plot of tokens/s against the budget next
to it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import textwrap
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "offload.json"
MODES = ("prefetch", "lru", "naive")
COUNTS = ("hits", "misses", "prefetched", "prefetch_hits", "bytes_read")  # offload_stats' counters


def _rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompts(n: int, length: int) -> list[bytes]:
    """n windows of ``length`` bytes of stdlib source, from different files (each prompt routes differently)."""
    files = sorted(p for p in Path(textwrap.__file__).parent.glob("*.py") if p.stat().st_size > 4 * length)
    out = []
    for p in files[:: max(1, len(files) // n)][:n]:
        data = p.read_bytes()
        out.append(data[len(data) // 3: len(data) // 3 + length])
    return out


def _drop_page_cache(directory: Path) -> None:
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_one(job: dict) -> dict:
    """One configuration in this (fresh) process: load, warm up, time ``rounds`` prefill + decode rounds."""
    import torch

    from moekit.formats.load import from_pretrained
    from moekit.formats.paths import resolve_checkpoint
    from moekit.formats.tokenizer import ByteTokenizer
    from moekit.model.decode import decode_step
    from moekit.model.generate import prefill
    from moekit.model.transformer import KVCache
    from moekit.offload import OffloadedExperts, load_offloaded, offload_stats, reset_offload_stats

    base_rss = _rss_mib()
    directory = resolve_checkpoint(job["checkpoint"])
    _drop_page_cache(directory)
    if job["mode"] == "resident":
        model = from_pretrained(directory, dtype="fp32", tokenizer=False)
    else:
        model = load_offloaded(directory, job["budget_gb"], dtype="fp32", tokenizer=False,
                               prefetch=job["mode"] == "prefetch", cache="none" if job["mode"] == "naive" else "lru")
    model.eval()
    tok = ByteTokenizer()
    prompts = [torch.tensor([tok.encode(p.decode("utf-8", "replace"))[:job["prompt_tokens"]]])
               for p in _prompts(job["rounds"] + 1, job["prompt_tokens"] * 2)]
    cfg = model.config
    new = job["new_tokens"]

    offloaded = job["mode"] != "resident"
    decode_counts = dict.fromkeys(COUNTS, 0)  # the pool's counters over the timed decode steps only

    def one_round(ids) -> tuple[float, float]:
        cache = KVCache(cfg, 1, max_len=ids.shape[1] + new, dtype=torch.float32)
        with torch.inference_mode():
            t0 = time.perf_counter()
            nxt = prefill(model, ids, cache).argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            before = offload_stats(model) if offloaded else None
            for _ in range(new - 1):
                nxt = decode_step(model, nxt, cache)[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
        if offloaded:
            after = offload_stats(model)
            for k in COUNTS:
                decode_counts[k] += after[k] - before[k]
        return ids.shape[1] / (t1 - t0), (new - 1) / (t2 - t1)

    one_round(prompts[0])  # (compiles the decode kernels; the pool's state after it is a warm server's)
    reset_offload_stats(model)
    decode_counts.update(dict.fromkeys(COUNTS, 0))
    timed = [one_round(ids) for ids in prompts[1:]]
    stats = offload_stats(model) if offloaded else None
    resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pool_bytes = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, OffloadedExperts)
                     for b in m.buffers())
    decode_tokens = job["rounds"] * (new - 1)
    if stats:
        stats["decode"] = {**decode_counts, "hit_rate": decode_counts["hits"] / max(
            decode_counts["hits"] + decode_counts["misses"], 1)}
    return {**{k: job[k] for k in ("mode", "fraction", "budget_gb")},
            "slots": stats["slots_per_layer"] if stats else cfg.moe.n_experts,
            "prefill_tokens_per_s": statistics.median(p for p, _ in timed),
            "decode_tokens_per_s": statistics.median(d for _, d in timed),
            "offload": stats,
            "misses_per_decode_token": None if stats is None else decode_counts["misses"] / decode_tokens,
            "bytes_read_per_decode_token": None if stats is None else decode_counts["bytes_read"] / decode_tokens,
            "rss_peak_mib": _rss_mib(), "rss_base_mib": base_rss, "rss_model_mib": _rss_mib() - base_rss,
            "resident_weights_mib": resident_bytes / 2**20, "pool_mib": pool_bytes / 2**20 if stats else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a trained moekit checkpoint (see the module docstring)")
    p.add_argument("--budgets", default="1,0.5,0.25,0.125", help="fractions of the routed experts' bytes")
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()

    import torch

    from moekit.config import ModelConfig
    from moekit.formats.checkpoint import atomic_write_text, build_empty, read_config_json
    from moekit.formats.paths import resolve_checkpoint
    from moekit.host import probe_host
    from moekit.offload.load import expert_bytes as bytes_of_one

    directory = resolve_checkpoint(args.checkpoint)
    cfg = ModelConfig.from_dict(read_config_json(directory))
    if cfg.moe is None:
        sys.exit(f"{directory}: not a MoE model")
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        sys.exit(f"--modes: {bad} not in {MODES}")
    E = cfg.moe.n_experts
    layers = build_empty(cfg).moe_layers
    moe_layers, expert_bytes = len(layers), bytes_of_one(layers[0].experts, torch.float32)
    routed_gb = E * moe_layers * expert_bytes / 2**30
    jobs = [{"mode": "resident", "fraction": 1.0, "budget_gb": None}]
    for frac in (float(x) for x in args.budgets.split(",")):
        slots = max(1, round(frac * E))
        jobs += [{"mode": m, "fraction": frac, "budget_gb": slots * moe_layers * expert_bytes / 2**30 * 1.0001}
                 for m in modes]
    common = {"checkpoint": str(directory), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "rounds": args.rounds}
    ctx = mp.get_context("spawn")
    rows = []
    for i, job in enumerate(jobs):
        print(f"[{i + 1}/{len(jobs)}] {job['mode']} at {job['fraction']:.1%} ...", flush=True)
        with ctx.Pool(1) as pool:  # (a fresh process each: its own peak RSS, no pool or cache left from the last)
            rows.append(pool.apply(run_one, ({**job, **common},)))
    res = rows[0]
    for r in rows:
        r["decode_vs_resident"] = r["decode_tokens_per_s"] / res["decode_tokens_per_s"]
        r["prefill_vs_resident"] = r["prefill_tokens_per_s"] / res["prefill_tokens_per_s"]
    naive = {r["fraction"]: r["decode_tokens_per_s"] for r in rows if r["mode"] == "naive"}
    for r in rows:
        if r["mode"] != "resident" and r["fraction"] in naive:
            r["decode_vs_naive"] = r["decode_tokens_per_s"] / naive[r["fraction"]]
    overhead = res["rss_model_mib"] - res["resident_weights_mib"]  # activations, KV cache, kernels: any model's
    for r in rows:
        if r["mode"] != "resident":
            r["rss_bound_mib"] = r["resident_weights_mib"] + r["pool_mib"] + max(overhead, 0.0)

    host = probe_host()
    print(f"\n{host.cpu_model} ({host.kind}), {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{directory}: {moe_layers} MoE layers x {E} experts, {routed_gb * 1024:.0f} MiB of routed experts (fp32); "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, greedy, medians of {args.rounds}")
    print(f"{'mode':9} {'budget':>7} {'slots':>5} {'decode':>8} {'x res':>6} {'x naive':>7} {'prefill':>8} "
          f"{'x res':>6} {'hit':>6} {'miss/tok':>8} {'recall':>7} {'RSS MiB':>8} {'bound':>7}")
    for r in rows:
        o = r["offload"] or {}
        rec = [g["recall"] for g in o.get("guess_per_layer") or [] if g]
        hit = (o.get("decode") or {}).get("hit_rate", float("nan"))
        print(f"{r['mode']:9} {r['fraction']:7.1%} {r['slots']:5d} {r['decode_tokens_per_s']:8.1f} "
              f"{r['decode_vs_resident']:6.2f} {r.get('decode_vs_naive', float('nan')):7.2f} "
              f"{r['prefill_tokens_per_s']:8.0f} {r['prefill_vs_resident']:6.2f} "
              f"{hit:6.1%} {r['misses_per_decode_token'] if o else float('nan'):8.2f} "
              f"{statistics.mean(rec) if rec else float('nan'):7.2f} {r['rss_model_mib']:8.0f} "
              f"{r.get('rss_bound_mib', float('nan')):7.0f}")
    result = {"host": host.to_dict(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "threads": torch.get_num_threads(), "checkpoint": str(directory), "routed_expert_mib": routed_gb * 1024,
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.no_plot:
        _plot(rows, args.out.with_suffix(".png"))


def _plot(rows: list[dict], path: Path) -> None:
    from moekit.plotting import require_matplotlib

    try:
        plt = require_matplotlib()
    except ImportError as e:
        print(f"no plot: {e}")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    res = rows[0]
    for ax, key, label in ((axes[0], "decode_tokens_per_s", "decode tokens/s (batch 1)"),
                           (axes[1], "prefill_tokens_per_s", "prefill tokens/s")):
        for mode, style in zip(MODES, ("-o", "--s", ":^")):
            rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["fraction"])
            if rs:
                ax.plot([100 * r["fraction"] for r in rs], [r[key] for r in rs], style, label=mode)
        ax.axhline(res[key], color="k", lw=0.8, label="resident")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("expert memory budget (% of the routed experts' bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
