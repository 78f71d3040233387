#!/usr/bin/env python3
"""The moekit MoE layer against the equal-FLOP dense FFN and transformers' Mixtral sparse MoE block.

    python3 benchmarks/moe_layer.py            # the issue's shapes (d=512, expert FFN 1408, E=8, top-2):
                                               # T = 4096 and 16384, decode T = 1, 2, 8; fp32 and bf16
    python3 benchmarks/moe_layer.py --quick    # smoke run: T = 256 and 1024, decode T = 1, 3 rounds
    python3 benchmarks/moe_layer.py --sections layer --tokens 4096 --dtypes bf16 --modes fwdbwd
    python3 benchmarks/moe_layer.py --device cuda --shape mixtral --dtypes bf16   # on a GPU (layer section):
                                               # d=4096, expert FFN 14336, E=8, top-2, T = 16384
    python3 benchmarks/moe_layer.py --device cuda --shape fine --dtypes bf16      # d=2048, FFN 768, E=128, top-8

Writes ``benchmarks/results/moe_layer.json`` (every sample) and prints the tables.

Method. Each case (T, dtype, forward or forward+backward) builds every variant once, checks that all
MoE implementations give the same output (and input gradient) as transformers' eager experts, then
times them in ONE process, interleaved round by round (the order rotates every round). The rounds cycle
through 8 different inputs (the same for all variants of a round), so the routing and every expert's row
count change from call to call as in training; 8 warm-up rounds pass through all of them first (the
steady state of a training run: per-shape caches are warm). ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is
raised so that the variants do not evict each other's compiled bf16 GEMMs (each behaves as if alone).
Reported: the median time of each variant and the MEDIAN OVER ROUNDS OF PER-ROUND RATIOS. Other
processes on a shared machine slow all variants of a round alike, so the per-round ratio is far
steadier than a ratio of medians. "forward" is an inference forward (``torch.no_grad``); "forward+backward"
is a training step of the layer: forward, ``out.backward(g)`` for a fixed random ``g``, grads set to None.

Variants:
  dense            the equal-FLOP dense work: moekit's dense SwiGLU FFN (``moekit.layer.experts.MLP``) of width
                   k x expert_ffn on the same T tokens (same GEMM FLOPs as the experts; the MoE also routes)
  moekit           ``MoE(backend="auto")``: what a user gets (the table names the backend auto picked)
  moekit-<b>       the same layer with backend b (loop, grouped, padded, compiled), and ``loop-serial``:
                   the loop backend with the expert threads off (every GEMM split over the cores instead)
  hf-<impl>        ``MixtralSparseMoeBlock`` with ``experts_implementation=impl`` (eager, grouped_mm,
                   batched_mm; grouped_mm is transformers' default), same weights; batched_mm gathers a
                   weight copy per token-expert pair and is only run where that stays under --hf-mem-gib

Sections (``--sections``): layer, decode, allocator.
  decode     T = 1, 2, 8 tokens, inference forward; the dense reference is the dense-ACTIVE FFN (width
             k x expert_ffn, the bytes of k experts), alone (its weights stay in cache) and cycled over E/k
             copies ("x4": the bytes of all experts, as the L layers of a model). Reports bytes/s on the
             bytes of the experts the
             tokens actually use, against the machine's memory bandwidth measured in the same rounds: a
             large sum/copy (DRAM) and a sum over a buffer as large as all experts' weights (the working
             set of a decode loop, which this machine's cache may hold).
  allocator  glibc's effect: the same layer steps in child processes started alternately with glibc's
             defaults and with ``moekit.cli.ALLOCATOR_ENV`` (no mmap for large blocks, no trimming),
             round by round; reports median per-round ratios.
The script re-executes itself with ``ALLOCATOR_ENV`` (``moekit.cli._tune_allocator``), as the moekit CLI
does; ``MOEKIT_NO_ALLOCATOR_TUNING=1`` keeps glibc's defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moekit.cli import ALLOCATOR_ENV, _tune_allocator  # noqa: E402  (stdlib only: imported before torch)

# (dim, expert FFN width, experts, top-k) per --shape; the CPU shape, and the GPU shapes of issue 5:
# Mixtral 8x7B's layer and a fine-grained one (Qwen3-MoE / DeepSeek-style: many narrow experts)
SHAPES = {"issue": (512, 1408, 8, 2), "mixtral": (4096, 14336, 8, 2), "fine": (2048, 768, 128, 8)}
D, FFN, E, K = SHAPES["issue"]
DEVICE = "cpu"  # --device; every tensor of a case is made there
N_INPUTS = 8  # distinct inputs (routings) a layer case cycles through
# Variants share one process, so one implementation's compiled oneDNN GEMMs (one per shape) must not
# evict another's from the default 1024-entry cache: each then behaves as if it ran alone.
BENCH_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict, rounds: int, warmup: int = 1, before_round=None) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` samples each, interleaved; order rotates per round.
    ``before_round(i)`` runs before warm-up round i < 0 and timed round i >= 0 (e.g. to change the input)."""
    for w in range(warmup):
        if before_round is not None:
            before_round(w - warmup)
        for f in fns.values():
            f()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        if before_round is not None:
            before_round(r)
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time[a] / time[b] (> 1: a is slower)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def load_now() -> dict:
    la = os.getloadavg()
    return {"loadavg_1m": round(la[0], 2), "loadavg_5m": round(la[1], 2), "cpus": os.cpu_count()}


def write_results(out: dict, path: str | Path) -> None:
    """Stamp the finish time and write a benchmark's JSON (creating its folder)."""
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from moekit.host import probe_host

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "host": probe_host().to_dict(), "gpu": gpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "allocator_env": {k: os.environ.get(k) for k in ALLOCATOR_ENV},
            "bench_env": {k: os.environ.get(k) for k in BENCH_ENV}}


# ---------------------------------------------------------------------------------------------- models
def build(dtype, hf_impls: list[str], seed: int = 0):
    """The moekit layer, the dense FFN, and transformers' block per experts implementation, same weights."""
    import torch

    from moekit.config import MoEConfig
    from moekit.layer.experts import MLP
    from moekit.layer.moe import MoE

    torch.manual_seed(seed)
    with torch.device(DEVICE):  # initialised where they run (a Mixtral-shaped layer is 1.4G parameters)
        moe = MoE(D, MoEConfig(n_experts=E, top_k=K, expert_ffn_dim=FFN)).to(dtype)
        dense = MLP(D, K * FFN).to(dtype)
    hf = {}
    if hf_impls:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        base = MixtralConfig(hidden_size=D, intermediate_size=FFN, num_local_experts=E, num_experts_per_tok=K)
        for impl in hf_impls:
            cfg = copy.deepcopy(base)  # the implementation is read from the config at every call
            cfg._experts_implementation = impl
            with torch.device(DEVICE):
                block = MixtralSparseMoeBlock(cfg).to(dtype)
            with torch.no_grad():  # Mixtral routing = moekit's default: softmax, top-k, renormalise
                block.gate.weight.copy_(moe.router.weight)
                block.experts.gate_up_proj.copy_(moe.experts.w_in)
                block.experts.down_proj.copy_(moe.experts.w_out)
            hf[impl] = block
    return moe, dense, hf


def moekit_call(moe, backend: str, aux: bool = True):
    """A call of the moekit layer with the given experts backend ("loop-serial": loop, expert threads off);
    ``aux=False``: no balancing losses or routing statistics, as generation runs it."""
    from moekit.layer.kernels.threads import EXPERT_THREADS

    real = "loop" if backend == "loop-serial" else backend

    def call(x):
        moe.experts.backend = real
        saved = EXPERT_THREADS.min_flops
        if backend == "loop-serial":
            EXPERT_THREADS.min_flops = math.inf
        try:
            return moe(x, aux=aux).out
        finally:
            EXPERT_THREADS.min_flops = saved
    return call


def hf_call(block):
    """transformers' block as a function of x (versions that also return the router logits: the output alone)."""
    def call(x):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out
    return call


def auto_backend(T: int, dtype) -> str:
    """The backend ``MoEConfig(backend="auto")`` runs for T tokens here."""
    import torch

    from moekit.layer.kernels.select import select_backend

    return select_backend("auto", torch.device(DEVICE), dtype, widths=(D, FFN), rows=T * K)


def sync() -> None:
    """Wait for the device: CUDA runs asynchronously, and a host clock must see the kernels end."""
    import torch

    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def synced(f):
    """f, then ``sync()``."""
    def g():
        f()
        sync()
    return g


def per_token_error(out, ref, keep_T=None) -> tuple[float, float]:
    """(99th percentile, max) over tokens (those where ``keep_T`` is True) of |out_t - ref_t| / |ref_t|."""
    import torch

    o, r = out.detach().float().reshape(-1, out.shape[-1]), ref.detach().float().reshape(-1, ref.shape[-1])
    err = (o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-30)
    if keep_T is not None:
        err = err[keep_T]
    return float(torch.quantile(err, 0.99)), float(err.max())


def clear_routing(moe, x, dtype):
    """[T] bool: tokens whose k-th and (k+1)-th router logits (float64) differ by more than the rounding of
    ``dtype`` can move them. Implementations that compute the router in other precisions (transformers in the
    model dtype, moekit in fp32) may pick either expert of a near-tie, so outputs are compared on the other
    tokens; with random routers and many experts (E=64+, top-8) bf16 flips a choice in a sizeable share."""
    import torch

    x_TD = x.detach().reshape(-1, x.shape[-1]).double()
    if K >= E:
        return torch.ones(x_TD.shape[0], dtype=torch.bool, device=x.device)
    logits_TE = x_TD @ moe.router.weight.detach().double().t()
    top_TK = logits_TE.topk(K + 1, dim=-1).values
    eps = 1e-5 if dtype == torch.float32 else 4e-2 * float(logits_TE.abs().mean())
    return (top_TK[:, K - 1] - top_TK[:, K]) > eps


# ---------------------------------------------------------------------------------------------- layer
def bench_layer(T: int, dtype_name: str, modes: list[str], backends: list[str], hf_impls: list[str], rounds: int,
                hf_mem_gib: float) -> list[dict]:
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    # batched_mm copies a [2F, D] + [D, F] weight slice for each of the T*K rows
    hf_run = [i for i in hf_impls
              if i != "batched_mm" or T * K * 3 * FFN * D * dtype.itemsize / 2**30 <= hf_mem_gib]
    moe, dense, hf = build(dtype, hf_run)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(1, T, D, generator=gen).to(DEVICE, dtype)
    # N_INPUTS different inputs, cycled round by round (the same for all variants of a round): the routing,
    # so every expert's row count, changes from call to call as in training. The warm-up rounds go once
    # through all of them, so the timed rounds see the steady state of a training run, where per-shape
    # caches (oneDNN's compiled bf16 GEMMs, see moekit/layer/experts.py _ROW_BLOCK) hold every shape an
    # implementation keeps producing.
    xs = [torch.randn(1, T, D, generator=gen).to(DEVICE, dtype) for _ in range(N_INPUTS)]
    x = xs[0]
    cur = {"x": x}

    def next_input(i: int) -> None:
        cur["x"] = xs[i % N_INPUTS]
    calls = {"dense": dense}
    for b in backends:
        calls["moekit" if b == "auto" else f"moekit-{b}"] = moekit_call(moe, b)
    for impl, block in hf.items():
        calls[f"hf-{impl}"] = hf_call(block)
    params = {"dense": list(dense.parameters()), **{n: list(moe.parameters()) for n in calls if n.startswith("moekit")},
              **{f"hf-{i}": list(b.parameters()) for i, b in hf.items()}}

    # correctness first: every MoE variant against transformers' eager experts (or moekit's loop backend)
    ref_name = "hf-eager" if "hf-eager" in calls else "moekit-loop" if "moekit-loop" in calls else "moekit"
    xr = x.detach().requires_grad_()
    ref_out = calls[ref_name](xr)
    ref_out.backward(g)
    ref_grad = xr.grad
    keep_T = clear_routing(moe, x, dtype)
    checks = {"tokens_compared": int(keep_T.sum()), "tokens": T}
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    compile_s = {}
    for name, call in calls.items():
        if name == "dense":
            continue
        xv = x.detach().requires_grad_()
        t0 = time.perf_counter()
        out = call(xv)
        out.backward(g)
        sync()
        if name.endswith("compiled"):
            compile_s["first fwd+bwd (compiles)"] = time.perf_counter() - t0
        p99, mx = per_token_error(out, ref_out, keep_T)
        gp99, gmx = per_token_error(xv.grad, ref_grad, keep_T)
        ok = max(p99, gp99) < tol and (dtype != torch.float32 or max(mx, gmx) < tol)
        checks[name] = {"out_p99": p99, "out_max": mx, "grad_p99": gp99, "grad_max": gmx, "ok": ok}
        if not ok:
            raise SystemExit(f"{name} disagrees with {ref_name} at T={T} {dtype_name}: {checks[name]}")
    if any(n.endswith("compiled") for n in calls):  # the first no-grad call compiles the inference graph
        with torch.no_grad():
            t0 = time.perf_counter()
            calls["moekit-compiled"](x)
            sync()
            compile_s["first forward (compiles)"] = time.perf_counter() - t0

    results = []
    for mode in modes:
        def make(name, call, mode=mode):
            ps = params[name]
            if mode == "fwd":
                def f():
                    with torch.no_grad():
                        call(cur["x"])
            else:
                def f():
                    for p in ps:
                        p.grad = None
                    xv = cur["x"].detach().requires_grad_()
                    call(xv).backward(g)
            return synced(f)

        load0 = load_now()
        times = interleaved({n: make(n, c) for n, c in calls.items()}, rounds, warmup=N_INPUTS,
                            before_round=next_input)
        res = {"section": "layer", "T": T, "dtype": dtype_name, "mode": mode, "rounds": rounds, "device": DEVICE,
               "shape": {"dim": D, "expert_ffn": FFN, "experts": E, "top_k": K},
               "auto_backend": auto_backend(T, dtype), "load_before": load0, "load_after": load_now(),
               "median_s": {n: statistics.median(v) for n, v in times.items()},
               "ratio_to_dense": {n: median_ratio(times, n, "dense") for n in times},
               "samples_s": times, "checks": checks, "reference": ref_name,
               "skipped": {i: f"needs > {hf_mem_gib} GiB for per-row weight copies"
                           for i in hf_impls if i not in hf_run}}
        if compile_s:
            res["compile_s"] = compile_s
        if "moekit" in times:
            res["speedup_vs"] = {n: median_ratio(times, n, "moekit") for n in times if n.startswith("hf-")}
        results.append(res)
        print_layer(res)
    return results


def print_layer(res: dict) -> None:
    mode = "forward" if res["mode"] == "fwd" else "forward+backward"
    print(f"\nT={res['T']} {res['dtype']} {mode}  (rounds={res['rounds']}, auto -> {res['auto_backend']}, "
          f"load {res['load_before']['loadavg_1m']} -> {res['load_after']['loadavg_1m']})")
    print(f"  {'variant':22s} {'median ms':>10s} {'/dense':>8s} {'moekit faster by':>17s}")
    for n, t in res["median_s"].items():
        sp = res.get("speedup_vs", {}).get(n)
        print(f"  {n:22s} {t * 1e3:10.1f} {res['ratio_to_dense'][n]:8.3f} {'' if sp is None else f'{sp:.2f}x':>17s}")
    c = res["checks"]
    print(f"  (every variant agreed with {res['reference']} on {c['tokens_compared']} of {c['tokens']} tokens: "
          "the others are near a routing tie)" if c["tokens_compared"] < c["tokens"] else
          f"  (every variant agreed with {res['reference']} on all {c['tokens']} tokens)")
    if res.get("compile_s"):
        print("  compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["compile_s"].items()))
    for n, why in res.get("skipped", {}).items():
        print(f"  hf-{n}: skipped ({why})")


# ---------------------------------------------------------------------------------------------- decode
def bench_decode(Ts: list[int], dtype_name: str, backends: list[str], hf_impls: list[str], rounds: int,
                 calls_per_sample: int) -> list[dict]:
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    moe, dense, hf = build(dtype, hf_impls)
    moe.eval()
    dense.eval()
    dense_set = [dense] + [copy.deepcopy(dense) for _ in range(E // K - 1)]
    bytes_per_expert = (moe.experts.w_in[0].numel() + moe.experts.w_out[0].numel()) * dtype.itemsize
    # bandwidth probes, timed in the same rounds: DRAM (1 GiB, far beyond any cache) and a buffer the size
    # of all experts' weights (what a decode loop over this layer re-reads)
    big = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
    big_dst = torch.empty_like(big)
    resident = torch.ones(E * bytes_per_expert // 4, dtype=torch.float32)
    results = []
    for T in Ts:
        gen = torch.Generator().manual_seed(2 + T)
        n = calls_per_sample
        xs = [torch.randn(1, T, D, generator=gen).to(dtype) for _ in range(n)]  # n different tokens per sample
        x = xs[0]
        with torch.no_grad():  # experts the tokens of a call use, on average over the n inputs
            active = statistics.mean(int(torch.unique(moe.router(xi.view(T, D)).topk_idx_TK).numel()) for xi in xs)

        def rep(call, xs=xs):
            def f():
                with torch.no_grad():
                    for xi in xs:
                        call(xi)
            return f

        # the same dense-active FFN every call keeps its weights in cache; a model's L layers do not. "dense-active
        # x4" cycles through E/K such FFNs, as many bytes as all E experts: the working set of the MoE layer
        def dense_cycled(xi, cycle={"i": 0}):  # noqa: B006 (a per-T call counter)
            cycle["i"] += 1
            return dense_set[cycle["i"] % len(dense_set)](xi)

        fns = {"dense-active": rep(dense), f"dense-active x{len(dense_set)}": rep(dense_cycled)}
        # generation runs the layer with aux=False (no losses, no routing statistics); "+stats" is the cost of both
        for b in backends:
            fns["moekit" if b == "auto" else f"moekit-{b}"] = rep(moekit_call(moe, b, aux=False))
        fns["moekit+stats"] = rep(moekit_call(moe, "auto"))
        for impl, block in hf.items():
            fns[f"hf-{impl}"] = rep(hf_call(block))
        fns["bw: sum 1 GiB"] = lambda: big.sum()
        fns["bw: copy 1 GiB"] = lambda: big_dst.copy_(big)
        fns["bw: sum expert-sized"] = lambda: [resident.sum() for _ in range(8)]
        with torch.no_grad():  # same answer first
            ref = moe(x).out
            for name in fns:
                if name.startswith(("moekit-", "hf-")):
                    is_moekit = name.startswith("moekit-")
                    call = moekit_call(moe, name[7:], aux=False) if is_moekit else hf_call(hf[name[3:]])
                    p99, mx = per_token_error(call(x), ref)
                    if mx > (1e-3 if dtype == torch.float32 else 5e-2):
                        raise SystemExit(f"decode T={T}: {name} disagrees with moekit (max rel err {mx:.2e})")
        load0 = load_now()
        times = interleaved(fns, rounds, warmup=2)
        per_call = {k: [t / n for t in v] for k, v in times.items() if not k.startswith("bw:")}
        bw = {"dram_sum_GBps": big.nbytes / statistics.median(times["bw: sum 1 GiB"]) / 1e9,
              "dram_copy_GBps": 2 * big.nbytes / statistics.median(times["bw: copy 1 GiB"]) / 1e9,
              "resident_sum_GBps": 8 * resident.nbytes / statistics.median(times["bw: sum expert-sized"]) / 1e9}
        bw["best_GBps"] = max(bw.values())
        active_bytes = active * bytes_per_expert
        lat = {k: statistics.median(v) for k, v in per_call.items()}
        res = {"section": "decode", "T": T, "dtype": dtype_name, "rounds": rounds, "calls_per_sample": n,
               "load_before": load0, "load_after": load_now(), "auto_backend": auto_backend(T, dtype),
               "active_experts": active, "active_bytes": active_bytes,
               "dense_active_bytes": sum(p.numel() for p in dense.parameters()) * dtype.itemsize,
               "latency_s": lat, "ratio_to_dense": {k: median_ratio(per_call, k, "dense-active") for k in per_call},
               "GBps": {k: active_bytes / v / 1e9 for k, v in lat.items() if not k.startswith("dense-active")},
               "bandwidth": bw, "samples_s": per_call}
        for k in lat:
            if k.startswith("dense-active"):
                res["GBps"][k] = res["dense_active_bytes"] / lat[k] / 1e9
        res["frac_of_dram_bw"] = {k: v / max(bw["dram_sum_GBps"], bw["dram_copy_GBps"]) for k, v in res["GBps"].items()}
        res["frac_of_resident_bw"] = {k: v / bw["resident_sum_GBps"] for k, v in res["GBps"].items()}
        results.append(res)
        print_decode(res)
    return results


def print_decode(res: dict) -> None:
    bw = res["bandwidth"]
    print(f"\ndecode T={res['T']} {res['dtype']}  ({res['active_experts']:.2f} active experts = "
          f"{res['active_bytes'] / 2**20:.1f} MiB; auto -> {res['auto_backend']}; "
          f"load {res['load_before']['loadavg_1m']})"
          f"\n  bandwidth: DRAM sum {bw['dram_sum_GBps']:.1f} GB/s, copy {bw['dram_copy_GBps']:.1f} GB/s; "
          f"expert-sized buffer sum {bw['resident_sum_GBps']:.1f} GB/s")
    print(f"  {'variant':22s} {'latency us':>11s} {'/dense-active':>14s} {'GB/s':>8s} {'of DRAM':>8s} "
          f"{'of resident':>12s}")
    for k, v in res["latency_s"].items():
        print(f"  {k:22s} {v * 1e6:11.1f} {res['ratio_to_dense'][k]:14.3f} {res['GBps'][k]:8.1f} "
              f"{res['frac_of_dram_bw'][k]:8.0%} {res['frac_of_resident_bw'][k]:12.0%}")


# ---------------------------------------------------------------------------------------------- allocator
def child_allocator(spec: dict) -> None:
    """One round of the allocator comparison in this (fresh) process; prints a JSON line."""
    import torch

    dtype = getattr(torch, DTYPES[spec["dtype"]])
    moe, dense, _ = build(dtype, [])
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(1, spec["T"], D, generator=gen).to(dtype)
    xs = [torch.randn(1, spec["T"], D, generator=gen).to(dtype) for _ in range(4)]
    cur = {"x": xs[0]}
    calls = {"dense": dense, "moekit": moekit_call(moe, "auto")}

    def step(call, ps):
        def f():
            for p in ps:
                p.grad = None
            xv = cur["x"].detach().requires_grad_()
            call(xv).backward(g)
        return f

    fns = {n: step(c, list(dense.parameters()) if n == "dense" else list(moe.parameters())) for n, c in calls.items()}
    times = interleaved(fns, spec["steps"], warmup=2, before_round=lambda i: cur.update(x=xs[i % len(xs)]))
    # VmHWM, the peak of this process's own memory map: ru_maxrss would also count the parent's RSS at the fork
    # (Linux keeps the pre-exec high-water mark), which after the layer sections is gigabytes
    from moekit.compare.runner import _rss_bytes

    peak = _rss_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"median_s": {n: statistics.median(v) for n, v in times.items()}, "maxrss_MiB": peak / 2**20}))


def bench_allocator(T: int, dtype_name: str, rounds: int, steps: int) -> dict:
    tuned_env = {**os.environ, **ALLOCATOR_ENV}
    default_env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    default_env["MOEKIT_NO_ALLOCATOR_TUNING"] = "1"
    spec = json.dumps({"T": T, "dtype": dtype_name, "steps": steps})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-allocator", spec]
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    load0 = load_now()
    for r in range(rounds):
        for which in (["default", "tuned"] if r % 2 == 0 else ["tuned", "default"]):
            out = subprocess.run(cmd, env=default_env if which == "default" else tuned_env, capture_output=True,
                                 text=True, check=True)
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {"section": "allocator", "T": T, "dtype": dtype_name, "rounds": rounds, "steps_per_round": steps,
           "load_before": load0, "load_after": load_now(), "env": ALLOCATOR_ENV, "runs": runs,
           "ratio_default_to_tuned": {}}
    for n in ("dense", "moekit"):
        ratios = [d["median_s"][n] / t["median_s"][n] for d, t in zip(runs["default"], runs["tuned"])]
        res["ratio_default_to_tuned"][n] = statistics.median(ratios)
    res["median_s"] = {f"{n} {w}": statistics.median(run["median_s"][n] for run in runs[w])
                       for w in runs for n in ("dense", "moekit")}
    res["maxrss_MiB"] = {w: statistics.median(run["maxrss_MiB"] for run in runs[w]) for w in runs}
    print(f"\nallocator: T={T} {dtype_name} forward+backward, {rounds} rounds x {steps} steps, fresh process per round"
          f" (load {load0['loadavg_1m']})")
    for n in ("dense", "moekit"):
        print(f"  {n:8s} default {res['median_s'][n + ' default'] * 1e3:8.1f} ms   tuned "
              f"{res['median_s'][n + ' tuned'] * 1e3:8.1f} ms   default/tuned {res['ratio_default_to_tuned'][n]:.3f}")
    print(f"  peak RSS: default {res['maxrss_MiB']['default']:.0f} MiB, tuned {res['maxrss_MiB']['tuned']:.0f} MiB")
    return res


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few rounds (a smoke test)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (on a GPU only the layer section runs)")
    p.add_argument("--shape", default="issue", choices=list(SHAPES),
                   help="layer shape: " + "; ".join(f"{n}: d={s[0]}, FFN {s[1]}, E={s[2]}, top-{s[3]}"
                                                    for n, s in SHAPES.items()))
    p.add_argument("--dim", type=int, help="override the shape's model dim")
    p.add_argument("--ffn", type=int, help="override the shape's expert FFN width")
    p.add_argument("--experts", type=int, help="override the shape's expert count")
    p.add_argument("--top-k", type=int, help="override the shape's top-k")
    p.add_argument("--sections", help="comma list of layer, decode, allocator (default all three on the CPU, "
                                      "layer on a GPU: decode and allocator measure the CPU)")
    p.add_argument("--tokens", help="comma list of T for the layer section (default 4096,16384; 16384 on a GPU)")
    p.add_argument("--decode-tokens", help="comma list of T for the decode section (default 1,2,8)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd (inference forward) and/or fwdbwd")
    p.add_argument("--backends", help="moekit variants (auto = what MoEConfig() picks; default "
                                      "auto,loop-serial,grouped,padded,compiled; on a GPU without loop-serial)")
    p.add_argument("--hf", default="eager,grouped_mm,batched_mm",
                   help="transformers experts implementations (comma list; '' skips them)")
    p.add_argument("--hf-mem-gib", type=float,
                   help="skip batched_mm above this weight-copy size (default 2; on a GPU, a quarter of its memory)")
    p.add_argument("--rounds", type=int, help="timed rounds per case (default 7; decode 15)")
    p.add_argument("--allocator-tokens", type=int, help="T of the allocator comparison (default 16384)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moe_layer.json"))
    p.add_argument("--child-allocator", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_allocator:
        child_allocator(json.loads(args.child_allocator))
        return
    if any(os.environ.get(k) != v for k, v in BENCH_ENV.items()):  # read by oneDNN at start-up only
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]],
                  {**os.environ, **BENCH_ENV})
    _tune_allocator([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])

    import torch

    global D, FFN, E, K, DEVICE
    D, FFN, E, K = SHAPES[args.shape]
    D, FFN, E, K = args.dim or D, args.ffn or FFN, args.experts or E, args.top_k or K
    DEVICE = args.device
    gpu = torch.device(DEVICE).type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {DEVICE}: torch {torch.__version__} sees no CUDA device")
    if gpu:
        torch.cuda.set_device(torch.device(DEVICE))
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"transformers cannot be imported ({e}): the hf-* variants are skipped", file=sys.stderr)
        args.hf = ""
    sections = (args.sections or ("layer" if gpu else "layer,decode,allocator")).split(",")
    if gpu and set(sections) - {"layer"}:
        raise SystemExit(f"--sections {args.sections}: on a GPU only the layer section runs (decode and allocator "
                         "measure the CPU's memory bandwidth and glibc)")
    if (D, FFN, E, K) != SHAPES["issue"] and set(sections) - {"layer"}:
        raise SystemExit("decode and allocator run the issue's shape only (--shape issue, no size overrides)")
    default_tokens = "256,1024" if args.quick else "16384" if gpu else "4096,16384"
    tokens = [int(t) for t in (args.tokens or default_tokens).split(",")]
    dec_tokens = [int(t) for t in (args.decode_tokens or ("1" if args.quick else "1,2,8")).split(",")]
    rounds = args.rounds or (3 if args.quick else 7)
    dtypes, modes = args.dtypes.split(","), args.modes.split(",")
    default_backends = "auto,grouped,loop,padded,compiled" if gpu else "auto,loop-serial,grouped,padded,compiled"
    backends = [b for b in (args.backends or default_backends).split(",") if b]
    if gpu and "loop-serial" in backends:
        raise SystemExit("--backends: loop-serial is the CPU loop without the expert threads; use loop on a GPU")
    hf_mem_gib = args.hf_mem_gib
    if hf_mem_gib is None:
        hf_mem_gib = torch.cuda.get_device_properties(torch.device(DEVICE)).total_memory / 4 / 2**30 if gpu else 2.0
    hf_impls = [h for h in args.hf.split(",") if h]
    if hf_impls:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        known = {"eager", *ALL_EXPERTS_FUNCTIONS.keys()}
        unknown = [h for h in hf_impls if h not in known]
        if unknown:
            raise SystemExit(f"--hf: {', '.join(unknown)} not among transformers' experts implementations "
                             f"({', '.join(sorted(known))}; '' skips them)")
    out = {"machine": machine(), "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": []}
    where = f"{out['machine']['gpu']} ({DEVICE})" if gpu else f"{torch.get_num_threads()} threads"
    print(f"moekit MoE layer benchmark: d={D}, expert FFN {FFN}, E={E}, top-{K}; torch {torch.__version__}, "
          f"{where}; allocator env {out['machine']['allocator_env']}")
    if "layer" in sections:
        for T in tokens:
            for dt in dtypes:
                out["results"] += bench_layer(T, dt, modes, backends, hf_impls, rounds, hf_mem_gib)
    if "decode" in sections:
        for dt in dtypes:
            out["results"] += bench_decode(dec_tokens, dt, [b for b in backends if b != "compiled"], hf_impls,
                                           args.rounds or (5 if args.quick else 15), 10 if args.quick else 50)
    if "allocator" in sections:
        out["results"].append(bench_allocator(args.allocator_tokens or (1024 if args.quick else 16384), "bf16",
                                              2 if args.quick else 5, 3 if args.quick else 5))
    write_results(out, args.out)


if __name__ == "__main__":
    main()
