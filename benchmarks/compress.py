#!/usr/bin/env python3
"""Compressed models against the bf16 model they came from, side by side in one process.

Part ``decode`` (random weights, no data needed): batch-1 decode tokens/s of the bf16 model and of the same model
with its experts packed at 8, 4 and 2 bits (RTN, group 128 / 64; attention, router, norms and embeddings stay
bf16), at a memory-bound shape (issue 16: d=1024, E=16 experts of width 2048, top-2: one layer's experts are 201 MB
in bf16, far past the L3 cache). Every variant runs through ``moekit.model.decode.decode_step``; rounds are
interleaved and the median ratio to bf16 is reported, with the bytes of weights one token reads over the host's
streaming read bandwidth (``moekit.host.read_bandwidth``).

Part ``quality`` (a trained moekit run or checkpoint and its corpus): ``moekit.compress.compress`` at each width,
uniform against the per-expert (mixed) allocation, RTN against GPTQ (and HQQ), over calibration seeds; validation
perplexity before/after, effective bits and expert bytes.

    python3 benchmarks/compress.py --part decode
    python3 benchmarks/compress.py --part quality --checkpoint runs/small/moe --calib stdlib

Prints a table per part and writes ``benchmarks/results/compress.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moekit.compress.modules import QuantizedExperts, quantize_model_
from moekit.compress.quantize import QuantSpec, quantize_rtn
from moekit.config import ModelConfig, MoEConfig
from moekit.host import probe_host, read_bandwidth
from moekit.layer.moe import MoE
from moekit.model.decode import decode_step, fast_path_applies
from moekit.model.generate import prefill
from moekit.model.transformer import KVCache, Transformer

DECODE_VARIANTS = {"bf16": None, "int8 g128": QuantSpec(8, 128, True), "int4 g128": QuantSpec(4, 128),
                   "int2 g64": QuantSpec(2, 64)}


def _pack_experts(model: Transformer, spec: QuantSpec) -> Transformer:
    q = copy.deepcopy(model)
    new = {}
    for name, m in q.named_modules():
        if isinstance(m, MoE):
            ex = m.experts
            new[f"{name}.experts"] = QuantizedExperts(ex, [spec.bits] * ex.n_experts, {spec.bits: (
                quantize_rtn(ex.w_in.detach(), spec), quantize_rtn(ex.w_out.detach(), spec))})
    return quantize_model_(q, new)


def _bytes_per_token(model: Transformer) -> int:
    """Weights one decode token reads: everything but the embedding table (one row) and the unchosen experts."""
    cfg = model.config
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("tok_emb") or "rope" in name:
            continue
        nbytes = t.numel() * t.element_size()
        if ".experts." in name:
            nbytes = nbytes * cfg.moe.top_k // cfg.moe.n_experts
        total += nbytes
    return total


def decode_part(args) -> dict:
    cfg = ModelConfig(vocab_size=8192, dim=1024, n_layers=args.layers, n_heads=16, n_kv_heads=4, head_dim=64,
                      ffn_dim=4096, max_seq_len=512, qk_norm=True, tie_embeddings=False,
                      moe=MoEConfig(n_experts=16, top_k=2, expert_ffn_dim=2048, aux_loss_coef=0.0))
    torch.manual_seed(0)
    base = Transformer(cfg).bfloat16().eval()
    models = {k: base if spec is None else _pack_experts(base, spec) for k, spec in DECODE_VARIANTS.items()}
    bw = read_bandwidth()
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    rates: dict[str, list[float]] = {k: [] for k in models}
    ok = {}
    for r in range(args.rounds):
        for k, m in models.items():
            cache = KVCache(cfg, 1, max_len=32 + args.tokens + 8)
            with torch.no_grad():
                prefill(m, prompt, cache)
                ids = prompt[:, -1:]
                ok[k] = fast_path_applies(m, ids, cache)
                for _ in range(3):  # warm-up (the first round also builds the kernels)
                    decode_step(m, ids, cache)
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    decode_step(m, ids, cache)
                rates[k].append(args.tokens / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    rows = []
    for k, v in rates.items():
        ratios = [a / b for a, b in zip(v, rates["bf16"])]
        nbytes = _bytes_per_token(models[k])
        tps = statistics.median(v)
        rows.append({"variant": k, "tokens_per_s": tps, "ratio_to_bf16": statistics.median(ratios),
                     "bytes_per_token": nbytes, "gb_per_s": nbytes * tps / 1e9, "bandwidth_frac": nbytes * tps / bw,
                     "fast_path": ok[k]})
    print(f"\ndecode, batch 1 (d={cfg.dim}, {cfg.n_layers} layers, E={cfg.moe.n_experts} x {cfg.moe.expert_ffn_dim}, "
          f"top-{cfg.moe.top_k}); read bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'variant':<11} {'tok/s':>8} {'x bf16':>7} {'MB/token':>9} {'GB/s':>6} {'of bw':>6}")
    for row in rows:
        print(f"{row['variant']:<11} {row['tokens_per_s']:8.1f} {row['ratio_to_bf16']:7.2f} "
              f"{row['bytes_per_token'] / 1e6:9.1f} {row['gb_per_s']:6.1f} {row['bandwidth_frac']:6.0%}")
    return {"config": cfg.to_dict(), "read_bandwidth_bytes_per_s": bw, "rounds": args.rounds, "tokens": args.tokens,
            "rows": rows, "per_round_tokens_per_s": rates}


def quality_part(args) -> dict:
    from moekit.compress.runner import compress

    if not args.checkpoint or not args.calib:
        raise SystemExit("--part quality needs --checkpoint (a trained moekit run) and --calib (its corpus)")
    runs = []
    plan = [(b, m, mixed, s) for b in args.bits for m in args.methods for mixed in (False, True)
            for s in (range(args.seeds) if mixed else range(1))
            if not (mixed and float(b).is_integer() and b >= 8)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (bits, method, mixed, seed) in enumerate(plan):
            res = compress(args.checkpoint, Path(tmp) / f"c{i}", bits, method=method, group_size=args.group_size,
                           calib=args.calib, mixed=mixed, seed=seed, progress=False)
            row = {"bits": bits, "method": method, "allocation": "mixed" if mixed else "uniform", "seed": seed,
                   "effective_bits": res.effective_bits, "compression": res.compression,
                   "ppl_before": res.perplexity_before, "ppl_after": res.perplexity_after,
                   "ppl_change": res.perplexity_after / res.perplexity_before - 1, "seconds": res.seconds}
            runs.append(row)
            print(f"[{i + 1}/{len(plan)}] {bits} bits {method} {row['allocation']} seed {seed}: eff "
                  f"{row['effective_bits']:.2f} bits, {row['compression']:.2f}x smaller, ppl {row['ppl_before']:.3f}"
                  f" -> {row['ppl_after']:.3f} ({row['ppl_change']:+.1%})", flush=True)
    print(f"\n{'bits':>5} {'method':<6} {'alloc':<8} {'eff bits':>8} {'x smaller':>9} {'ppl':>8} {'change':>7}")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["bits"], r["method"], r["allocation"]), []).append(r)
    for (bits, method, alloc), rs in groups.items():
        ppl = statistics.mean(r["ppl_after"] for r in rs)
        print(f"{bits:>5} {method:<6} {alloc:<8} {rs[0]['effective_bits']:8.2f} {rs[0]['compression']:9.2f} "
              f"{ppl:8.3f} {ppl / rs[0]['ppl_before'] - 1:+7.1%}" + (f"  (mean of {len(rs)} seeds)" if len(rs) > 1 else ""))
    return {"checkpoint": str(args.checkpoint), "calib": args.calib, "group_size": args.group_size, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["decode", "quality"], default="decode")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=24, help="timed decode steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--checkpoint", help="quality: a trained moekit run or checkpoint")
    p.add_argument("--calib", help="quality: the corpus (calibration and validation split)")
    p.add_argument("--bits", type=float, nargs="+", default=[8, 4, 3, 2.5])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seeds", type=int, default=3, help="quality: calibration seeds for the mixed allocation")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "compress.json"))
    args = p.parse_args()
    result = {"host": probe_host().to_dict(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "threads": torch.get_num_threads()}
    result[args.part] = decode_part(args) if args.part == "decode" else quality_part(args)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**old, **result}, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
