"""``moekit compare``: train an MoE model and its dense twins under one budget and report side by side.

Every model gets the same data, tokenizer, token budget, seed and schedule. Each one is trained and
measured in its own fresh process (spawned), so wall-clock, peak memory and allocator state of one
model never leak into another's numbers.

Measured per model: total/active parameters, FLOPs per token, weight memory (cost model); the
validation curve against tokens, training FLOPs and wall-clock; training tokens/s; decode latency
at batch 1 with the KV cache; batched prefill throughput; peak memory; and for MoE models the
expert load per layer and the load imbalance over training.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moekit import host
from moekit.config import ModelConfig
from moekit.model.costs import costs, dense_twin
from moekit.model.transformer import KVCache, Transformer
from moekit.train.trainer import DataSpec, TrainConfig, autocast_ctx, resolve_device, train

RESULT_FIELDS = ("total_params", "active_params", "flops_per_token", "final_val_loss", "tokens_trained",
                 "train_seconds", "decode_ms_per_token", "prefill_tokens_per_s", "peak_memory_bytes", "curve")


def _peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def measure_inference(model: Transformer, tc: TrainConfig, device: torch.device, prompt_len: int = 32,
                      decode_tokens: int = 32, prefill_batch: int = 8, repeats: int = 3) -> dict[str, float]:
    """Decode ms/token at batch 1 (KV cache, median over steps) and batched prefill tokens/s (best of N)."""
    model.eval()
    cfg = model.config
    prompt_len = min(prompt_len, cfg.max_seq_len // 2)
    decode_tokens = min(decode_tokens, cfg.max_seq_len - prompt_len)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    # as a server would run: no autograd, no balancing losses or routing statistics (aux=False)
    with torch.inference_mode(), autocast_ctx(device, tc):
        for _ in range(2):  # the first pass warms up kernels and allocator
            cache = KVCache(cfg, 1, device=device)
            logits = model(ids, cache=cache, aux=False).logits
            nxt = logits[:, -1:].argmax(-1)
            times = []
            for _ in range(decode_tokens):
                t0 = time.perf_counter()
                nxt = model(nxt, cache=cache, aux=False).logits[:, -1:].argmax(-1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        seq = min(tc.seq_len, cfg.max_seq_len)
        batch = torch.randint(0, cfg.vocab_size, (prefill_batch, seq), generator=torch.Generator().manual_seed(1))
        batch = batch.to(device)
        model(batch, aux=False)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(batch, aux=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return {"decode_ms_per_token": 1000 * statistics.median(times), "prefill_tokens_per_s": prefill_batch * seq / best}


def run_one(label: str, cfg_dict: dict[str, Any], tc_dict: dict[str, Any], spec_dict: dict[str, Any],
            run_dir: str, progress: bool) -> dict[str, Any]:
    """Train and measure one model (runs in a fresh process under ``compare``)."""
    cfg, tc, spec = ModelConfig.from_dict(cfg_dict), TrainConfig(**tc_dict), DataSpec(**spec_dict)
    data, tokenizer = spec.load(progress=False)
    device = resolve_device(tc.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_bytes("VmRSS")
    _peak_rss_reset()
    res = train(cfg, tc, data, run_dir, tokenizer=tokenizer, progress=progress, announce=False)
    from moekit.train.state import latest_checkpoint, read_model

    model = read_model(latest_checkpoint(run_dir)).to(device)
    inference = measure_inference(model, tc, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_bytes("VmHWM") or 0
    c = costs(cfg, seq_len=tc.seq_len)
    return {
        "label": label,
        "name": cfg.name,
        "config": cfg.to_dict(),
        "total_params": c.total_params,
        "active_params": c.active_params,
        "flops_per_token": c.flops_per_token_forward,
        "train_flops_per_token": c.flops_per_token_train,
        "weight_bytes_bf16": c.weight_bytes["bf16"],
        "kv_cache_bytes_per_token_bf16": c.kv_cache_bytes_per_token["bf16"],
        "final_val_loss": res.final_val_loss,
        "tokens_trained": res.tokens,
        "train_seconds": res.train_seconds,
        # the steady state, after the first step: that one pays torch.compile's compilation of the MoE layer on the
        # CPU (a few seconds, once per process) and the first-use builds of the kernels; it is reported apart
        "train_tokens_per_s": res.steady_tokens_per_s,
        "train_first_step_seconds": res.first_step_seconds,
        "train_tokens_per_s_overall": res.tokens_per_s,
        "peak_memory_bytes": peak,
        "baseline_memory_bytes": baseline if device.type == "cpu" else 0,
        "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS (VmHWM)",
        "curve": res.curve,
        "expert_load": res.expert_load,
        "imbalance_curve": res.imbalance_curve,
        "run_dir": str(run_dir),
        **inference,
    }


def _run_isolated(args: tuple) -> dict[str, Any]:
    pool = mp.get_context("spawn").Pool(1)
    try:
        return pool.apply(run_one, args)
    finally:
        # let the worker exit on its own: terminating it (the Pool context manager does) leaves the compile
        # workers torch.compile started there unreleased, and Python warns of a leaked semaphore at exit
        pool.close()
        pool.join()


def crossover_tokens(curve: list[dict[str, float]], target: float) -> float | None:
    """Tokens at which a validation curve first reaches ``target`` (linear interpolation), else None."""
    prev = None
    for p in curve:
        if p["val_loss"] <= target:
            if prev is None:
                return float(p["tokens"])
            frac = (prev["val_loss"] - target) / max(1e-12, prev["val_loss"] - p["val_loss"])
            return prev["tokens"] + frac * (p["tokens"] - prev["tokens"])
        prev = p
    return None


def compare(model_config: ModelConfig, train_config: TrainConfig | None = None, data: DataSpec | None = None,
            name: str | None = None, runs_dir: str | Path = "runs", dense_total: bool = False, plots: bool = True,
            progress: bool = True, isolate: bool = True) -> dict[str, Any]:
    """Train ``model_config`` (an MoE config) and its dense twin(s); write report.md, results.json, PNGs.

    Returns the results dictionary that is also written to ``results.json``. A comparison that fails removes the
    output directory it created (and says so on stderr); one that existed before keeps what it held.
    """
    out = Path(runs_dir) / (name or model_config.name or "compare")
    created = not out.exists()
    try:
        return _compare(model_config, train_config, data, out, dense_total, plots, progress, isolate)
    except BaseException:
        if created and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
            print(f"moekit compare: removed the partial {out} after the error", file=sys.stderr, flush=True)
        raise


def _compare(model_config: ModelConfig, train_config: TrainConfig | None, data: DataSpec | None, out: Path,
             dense_total: bool, plots: bool, progress: bool, isolate: bool) -> dict[str, Any]:
    if model_config.moe is None:
        raise ValueError("model_config.moe: compare needs an MoE config (its dense twins are derived from it)")
    if plots:
        from moekit.plotting import require_matplotlib

        require_matplotlib()
    tc = train_config or TrainConfig()
    device = resolve_device(tc.device)
    requested = tc.dtype
    # resolved once here, so every model trains in the same dtype (moekit.host: bf16 where it is native)
    tc = dataclasses.replace(tc, dtype=host.resolve_dtype(tc.dtype, device))
    if progress:
        print(f"moekit compare: {host.header(requested, tc.dtype, device)}", file=sys.stderr, flush=True)
    spec = data or DataSpec()
    name = out.name
    tc = tc.for_model(model_config)  # seq_len resolved (and checked) once, for every model alike
    out.mkdir(parents=True, exist_ok=True)
    # tokenize once in this process so the children find the cache ready
    dataset, tokenizer = spec.load(progress)
    if tokenizer.vocab_size != model_config.vocab_size:
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    models = {"moe": model_config, "dense_active": dense_twin(model_config, "active")}
    if dense_total:
        models["dense_total"] = dense_twin(model_config, "total")
    results: dict[str, Any] = {
        "name": name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **host.record(requested, tc.dtype, device),
        "threads": torch.get_num_threads(),
        "isolated": isolate,
        "data": dataclasses.asdict(spec),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "train_config": dataclasses.asdict(tc),
        "models": {},
    }
    for label, cfg in models.items():
        args = (label, cfg.to_dict(), dataclasses.asdict(tc), dataclasses.asdict(spec), str(out / label), progress)
        results["models"][label] = _run_isolated(args) if isolate else run_one(*args)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # partial results survive
    moe, dense = results["models"]["moe"], results["models"]["dense_active"]
    target = dense["final_val_loss"]
    results["moe_tokens_to_dense_active_final_loss"] = crossover_tokens(moe["curve"], target) if target else None
    results["crossover"] = curve_crossover(moe["curve"], dense["curve"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    from moekit.compare.report import write_report

    write_report(results, out, plots=plots)
    return results


def curve_crossover(a: list[dict[str, float]], b: list[dict[str, float]]) -> dict[str, Any] | None:
    """The LAST point where curve ``a`` (MoE) and curve ``b`` (dense) cross at the same tokens, after which their
    order holds to the end of the run, and how many times they crossed (early curves are noisy and can cross
    back and forth); None if they never cross."""
    pts = [(pa["tokens"], pa["val_loss"] - pb["val_loss"]) for pa, pb in zip(a, b) if pa["tokens"] == pb["tokens"]]
    crossings = []
    for (t0, d0), (t1, d1) in zip(pts, pts[1:]):
        if d0 > 0 >= d1:
            crossings.append({"tokens": t0 + (t1 - t0) * d0 / (d0 - d1), "direction": "moe_overtakes"})
        elif d0 < 0 <= d1:
            crossings.append({"tokens": t0 + (t1 - t0) * -d0 / (d1 - d0), "direction": "dense_overtakes"})
    return {**crossings[-1], "n_crossings": len(crossings)} if crossings else None
