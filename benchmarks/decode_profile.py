#!/usr/bin/env python3
"""Where a decode token's time goes: torch.profiler over moekit's decode step (``moekit.model.decode``) at the
Qwen3-MoE shape of issue 25 (d=1024, 12 layers, 16/4 heads of 64, 32 experts of 512, top-4, vocab 32000), random
weights, batch 1, after a 64-token prompt; the eager forward (the reference path) beside it for the "before".

    python3 benchmarks/decode_profile.py                      # bf16 weights (fp32 activations), 20 tokens
    python3 benchmarks/decode_profile.py --dtype fp32 --layers 4

Prints, per path, ms/token (timed without the profiler) and the operators by self time per token, and writes
``benchmarks/results/decode_profile.json``. The time outside any operator (Python between the calls) is the
difference between the timed ms/token and the operators' sum.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moekit.config import ModelConfig, MoEConfig
from moekit.host import probe_host
from moekit.model.decode import decode_step
from moekit.model.generate import prefill
from moekit.model.transformer import KVCache, Transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--tokens", type=int, default=20, help="profiled decode steps")
    p.add_argument("--rows", type=int, default=12, help="operators listed per path")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_profile.json"))
    args = p.parse_args()
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = ModelConfig(vocab_size=32000, dim=1024, n_layers=args.layers, n_heads=16, n_kv_heads=4, head_dim=64,
                      ffn_dim=3072, max_seq_len=1024, qk_norm=True, tie_embeddings=False,
                      moe=MoEConfig(n_experts=32, top_k=4, expert_ffn_dim=512, aux_loss_coef=0.0))
    torch.manual_seed(0)
    model = Transformer(cfg).to(dt).eval()
    paths = {"decode_step": lambda ids, c: decode_step(model, ids, c),
             "eager forward": lambda ids, c: model(ids, cache=c, aux=False).logits}
    result = {"host": probe_host().to_dict(), "dtype": args.dtype, "layers": args.layers, "paths": {}}
    for name, step in paths.items():
        cache = KVCache(cfg, 1, max_len=64 + 3 * args.tokens + 8, dtype=dt)
        with torch.no_grad():
            prefill(model, torch.randint(0, 32000, (1, 64)), cache)
            ids = torch.tensor([[3]])
            for _ in range(3):
                step(ids, cache)  # compiles the kernels once
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                step(ids, cache)
            ms = (time.perf_counter() - t0) / args.tokens * 1e3
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.tokens):
                    step(ids, cache)
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        ops = [{"name": e.key[:70], "ms_per_token": e.self_cpu_time_total / 1e3 / args.tokens,
                "calls_per_token": e.count / args.tokens} for e in rows]
        covered = sum(o["ms_per_token"] for o in ops)
        result["paths"][name] = {"ms_per_token": ms, "operators_ms_per_token": covered, "operators": ops[:40]}
        print(f"\n{name}: {ms:.2f} ms/token timed ({1000 / ms:.1f} tokens/s); operators {covered:.2f} ms "
              f"(under the profiler)")
        print(f"  {'operator':70s} {'ms/token':>9s} {'calls':>6s}")
        for o in ops[:args.rows]:
            print(f"  {o['name']:70s} {o['ms_per_token']:9.3f} {o['calls_per_token']:6.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
