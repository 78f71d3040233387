#!/usr/bin/env python3
"""Micro-measurements behind the execution choices of the MoE layer (moekit/layer/ and its kernels/).

    python3 benchmarks/micro.py            # all
    python3 benchmarks/micro.py --quick    # fewer rounds
    python3 benchmarks/micro.py --only gemm_shapes,gemv

Writes ``benchmarks/results/micro.json``. Same method as benchmarks/moe_layer.py: variants interleaved
round by round in one process, medians of per-round ratios to the first variant of each table.

  gemm_shapes  bf16 GEMMs are oneDNN primitives compiled per exact shape: an expert's changing row count
               vs a fixed one, and the bulk (multiple of 32 rows) + tail split (``_ROW_BLOCK``)
  row_gather   the backward of x_TD[token_idx_A]: autograd's index_put_ into zeros vs a gather of the K
               rows of each token and a sum (``dispatch._GatherRows``) vs index_add_
  combine      sum_k w_tk y_tk: bmm vs K multiply-adds (``moekit.layer.kernels.rows._weighted_sum``)
  gemv         decode: one token through a [2816, 512] weight, fp32 vs bf16, linear vs mv, 1 and 2 threads
  expert_split the 8 expert up-projections of T=4096 (bf16): each GEMM split over the two cores vs the
               experts side by side on two single-threaded workers (``moekit.layer.kernels.threads``), and the
               equal-FLOP dense up-projection
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layer import interleaved, load_now, machine, write_results  # noqa: E402

from moekit.cli import _tune_allocator  # noqa: E402


def table(name: str, fns: dict, rounds: int, unit_scale: float = 1e3, unit: str = "ms", per_call: int = 1) -> dict:
    times = interleaved(fns, rounds, warmup=2)
    base = next(iter(fns))
    res = {"median": {k: statistics.median(v) / per_call for k, v in times.items()},
           "ratio": {k: statistics.median(a / b for a, b in zip(times[k], times[base])) for k in times}}
    print(f"\n{name}  (ratio = median over rounds of time / time[{base}]; load {load_now()['loadavg_1m']})")
    for k in fns:
        print(f"  {k:34s} {res['median'][k] * unit_scale:9.3f} {unit}   {res['ratio'][k]:6.3f}")
    return res


def gemm_shapes(rounds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    w = torch.randn(192, 512, dtype=torch.bfloat16)
    x = torch.randn(1500, 192, dtype=torch.bfloat16)
    out = torch.empty(1500, 512, dtype=torch.bfloat16)
    rng = random.Random(0)

    def fixed():
        for _ in range(50):
            torch.mm(x[:1024], w, out=out[:1024])

    def varying():  # a new row count every call, as an expert's in training (700..1400 rows)
        for _ in range(50):
            m = rng.randint(700, 1400)
            torch.mm(x[:m], w, out=out[:m])

    def split():
        for _ in range(50):
            m = rng.randint(700, 1400)
            bulk = m - m % 32
            torch.mm(x[:bulk], w, out=out[:bulk])
            if bulk < m:
                torch.mm(x[bulk:m], w, out=out[bulk:m])

    res = table("gemm_shapes: 50 x [n, 192] @ [192, 512] bf16, one thread, per call", {
        "fixed n=1024": fixed, "n varies (700..1400)": varying, "n varies, bulk%32 + tail": split},
        rounds, 1e6, "us", per_call=50)
    torch.set_num_threads(2)
    return res


def row_gather(rounds: int) -> dict:
    import torch

    T, K, D = 4096, 2, 512
    A = T * K
    inv = torch.randperm(A, generator=torch.Generator().manual_seed(0))
    tok = torch.argsort(inv) // K
    g = torch.randn(A, D, dtype=torch.bfloat16)

    def index_put():
        torch.zeros(T, D, dtype=g.dtype).index_put_((tok,), g, accumulate=True)

    def gather_sum():
        v = g.index_select(0, inv).view(T, K, D)
        v[:, 0] + v[:, 1]

    def index_add():
        torch.zeros(T, D, dtype=g.dtype).index_add_(0, tok, g)

    return table("row_gather: backward of x_TD[token_idx_A], T=4096, K=2, D=512, bf16", {
        "autograd (index_put_ accumulate)": index_put, "gather + sum over k": gather_sum, "index_add_": index_add},
        rounds)


def combine(rounds: int) -> dict:
    import torch

    T, K, D = 4096, 2, 512
    y = torch.randn(T, K, D, dtype=torch.bfloat16)
    w = torch.rand(T, K, dtype=torch.bfloat16)

    def bmm():
        torch.bmm(w.unsqueeze(1), y).squeeze(1)

    def madd():
        out = y[:, 0] * w[:, :1]
        out.addcmul_(y[:, 1], w[:, 1:])

    return table("combine: sum_k w_tk y_tk, T=4096, K=2, D=512, bf16", {"bmm": bmm, "K multiply-adds": madd}, rounds)


def gemv(rounds: int) -> dict:
    import torch
    import torch.nn.functional as F

    out = {}
    ws = {dt: [torch.randn(2816, 512, dtype=dt) for _ in range(8)] for dt in (torch.float32, torch.bfloat16)}
    xs = {dt: torch.randn(1, 512, dtype=dt) for dt in ws}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fns = {}
        for dt, wl in ws.items():
            n = "fp32" if dt == torch.float32 else "bf16"
            x = xs[dt]
            fns[f"{n} linear"] = lambda wl=wl, x=x: [F.linear(x, w) for w in wl]
            fns[f"{n} mv"] = lambda wl=wl, x=x: [torch.mv(w, x[0]) for w in wl]
        res = table(f"gemv: 8 weights [2816, 512] (fp32 46 MB, bf16 23 MB per sample), {threads} thread(s)",
                    fns, rounds * 3)
        for k, v in res["median"].items():
            nbytes = sum(w.nbytes for w in ws[torch.float32 if k.startswith("fp32") else torch.bfloat16])
            print(f"    {k:12s} {nbytes / v / 1e9:6.1f} GB/s")
            res.setdefault("GBps", {})[k] = nbytes / v / 1e9
        out[f"threads={threads}"] = res
    torch.set_num_threads(2)
    return out


def expert_split(rounds: int) -> dict:
    import torch

    from moekit.layer.kernels.threads import EXPERT_THREADS

    E, n, D, I = 8, 1024, 512, 2816
    x = torch.randn(E * n, D, dtype=torch.bfloat16)
    w = torch.randn(E, I, D, dtype=torch.bfloat16)
    h = torch.empty(E * n, I, dtype=torch.bfloat16)
    spans = [(e, e * n, n) for e in range(E)]

    def up(e, s, m):
        torch.mm(x[s:s + m], w[e].t(), out=h[s:s + m])

    def split_gemms():
        for span in spans:
            up(*span)

    def threads():
        EXPERT_THREADS.map(up, spans, float("inf"))

    xd = torch.randn(E * n // 2, D, dtype=torch.bfloat16)  # the equal-FLOP dense up-projection: T=4096, 2 x 2816
    wd = torch.randn(2 * I, D, dtype=torch.bfloat16)

    def dense():
        torch.nn.functional.linear(xd, wd)

    return table("expert_split: 8 expert up-projections [1024, 512] @ [512, 2816] bf16 on 2 cores", {
        "each GEMM split over 2 threads": split_gemms, "experts on 2 single-thread workers": threads,
        "dense [4096, 512] @ [512, 5632]": dense}, rounds)


SECTIONS = {"gemm_shapes": gemm_shapes, "row_gather": row_gather, "combine": combine, "gemv": gemv,
            "expert_split": expert_split}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "micro.json"))
    args = p.parse_args()
    _tune_allocator([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])
    rounds = 5 if args.quick else 15
    out = {"machine": machine(), "argv": sys.argv, "results": {}}
    for name in (args.only.split(",") if args.only else SECTIONS):
        out["results"][name] = SECTIONS[name](rounds)
    write_results(out, args.out)


if __name__ == "__main__":
    main()
