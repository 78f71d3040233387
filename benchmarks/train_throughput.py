#!/usr/bin/env python3
"""End to end: training and decode tokens/s of an MoE model against its dense-active twin.

    python3 benchmarks/train_throughput.py            # preset "small", batch 16 x 256 tokens, dtype auto
    python3 benchmarks/train_throughput.py --dtypes auto,fp32,bf16   # is auto's choice the faster one here?
    python3 benchmarks/train_throughput.py --quick    # smoke run: 2 rounds, short decode
    python3 benchmarks/train_throughput.py --eager    # also the MoE model with its eager layer (backend="loop")
    python3 benchmarks/train_throughput.py --compiled # also the MoE model with backend="compiled"
    python3 benchmarks/train_throughput.py --config benchmarks/results/runs/<name>/moe/config.json  # any config

Writes ``benchmarks/results/train_throughput.json`` and prints the tables.

Models: ``moekit.model.presets.get_preset(preset)`` and ``moekit.model.costs.dense_twin(cfg, "active")``, the dense
model with the MoE model's ACTIVE parameter count (same attention, one FFN per layer of the matching
width). Training step = the trainer's step (``moekit.train.trainer``): lr set, forward with targets under
autocast in the dtype (``--dtypes``; ``auto`` resolves as the trainer does, ``moekit.host``),
``loss.backward()``, one host read of the losses, grad clipping, AdamW (the trainer's
``make_optimizer``), ``zero_grad(set_to_none=True)``, the router-bias update. Data: a pool of batches
sampled before timing from the built-in standard-library corpus (``--data``; the data pipeline is not what
is measured), the same batches in the same order for every model. Real text matters: on random token ids
the hidden states carry no information and the router sends almost every token to the same two experts
within a few steps (load imbalance 4.0, the maximum for 8 experts top-2), which is not the routing a real run times.
The MoE model's per-layer load imbalance (max / mean assignments per expert) over the timed steps is
printed and written with the timings. Decode: greedy generation with the KV cache, batch 1
(``moekit.model.generate.sample_tokens``), after a prefill of ``--prompt`` tokens, in the model's fp32 weights
(as ``moekit generate`` runs) and in bf16 weights.

Method: both models (and the compiled variant) are timed in ONE process, interleaved round by round
(order rotating); reported: median tokens/s and the median over rounds of the per-round ratio
MoE / dense. The script re-executes itself with ``moekit.cli.ALLOCATOR_ENV`` like the moekit CLI.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moekit.cli import _tune_allocator  # noqa: E402  (stdlib only: imported before torch)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import interleaved, load_now, machine, write_results  # noqa: E402


def make_step(model, tc, batches: list, imbalance: list | None = None):
    """One optimizer step of ``moekit.train.trainer.train`` (no accumulation, no logging, no eval) on the next of
    ``batches`` (cycled); an MoE model appends each step's per-layer load imbalance to ``imbalance``."""
    import torch

    from moekit.train.trainer import autocast_ctx, lr_at, make_optimizer

    device = torch.device("cpu")
    opt = make_optimizer(model, tc)
    n_moe = len(model.moe_layers)
    state = {"step": 0}

    def step() -> float:
        lr = lr_at(state["step"], tc)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = batches[state["step"] % len(batches)]
        with autocast_ctx(device, tc):
            out = model(x, y)
        out.loss.backward()
        loss = float(out.loss.detach())  # the trainer's one host read per step
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if n_moe:
            model.update_router_biases([s.routed_per_expert for s in out.stats if s is not None])
            if imbalance is not None:
                imbalance.append([float(s.load_imbalance) for s in out.stats if s is not None])
        state["step"] += 1
        return loss

    return step


def sample_batches(data: str, vocab: int, batch_size: int, seq_len: int, n: int) -> list:
    """``n`` training batches (x, y), sampled once before timing (seeded): windows of the corpus ``data``
    (byte-level tokens, tokenized once and cached as moekit train does) or uniform token ids for 'random'."""
    import torch

    gen = torch.Generator().manual_seed(1)
    if data == "random":
        return [(torch.randint(0, vocab, (batch_size, seq_len), generator=gen),
                 torch.randint(0, vocab, (batch_size, seq_len), generator=gen)) for _ in range(n)]
    from moekit.train.trainer import DataSpec

    dataset, _ = DataSpec(corpus=data).load()
    if dataset.vocab_size > vocab:
        raise SystemExit(f"--data {data}: its tokenizer has {dataset.vocab_size} ids, the model only {vocab}")
    return [dataset.get_batch("train", batch_size, seq_len, gen) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--config", help="a model config.json (e.g. runs/<name>/moe/config.json) instead of --preset")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--data", default="stdlib",
                   help="where the training batches come from: 'stdlib' (the built-in corpus, default), a text "
                        "file or directory (as moekit train --corpus), or 'random' (uniform token ids: the router "
                        "collapses onto two experts, see above)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per model per round")
    p.add_argument("--rounds", type=int, help="timed rounds (default 7)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--decode-tokens", type=int, help="decoded tokens per sample (default 64)")
    p.add_argument("--compiled", action="store_true", help="add the MoE model with backend='compiled'")
    p.add_argument("--eager", action="store_true",
                   help="add the MoE model with backend='loop': the eager layer that 'auto' trains through "
                        "torch.compile on the CPU (moekit/layer/kernels/compiled_layer.py)")
    p.add_argument("--dtypes", default="auto",
                   help="comma-separated training dtypes, each model timed in each (auto, fp32, bf16; default auto); "
                        "with several, the table says whether auto's choice is the faster on this host")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = p.parse_args()
    _tune_allocator([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])

    import torch

    from moekit.host import check_dtype, probe_host, resolve_dtype
    from moekit.layer.kernels.select import select_backend
    from moekit.model.costs import costs, dense_twin
    from moekit.model.generate import sample_tokens
    from moekit.model.presets import get_preset
    from moekit.model.transformer import Transformer
    from moekit.train.trainer import TrainConfig

    rounds = args.rounds or (2 if args.quick else 7)
    n_decode = args.decode_tokens or (16 if args.quick else 64)
    if args.config:
        from moekit.config import ModelConfig

        cfg = ModelConfig.from_json(args.config)  # a clear error for a missing or invalid file
        args.preset = args.config
    else:
        cfg = get_preset(args.preset)
    twin = dense_twin(cfg, "active")
    dtypes = [check_dtype(d.strip(), "--dtypes") for d in args.dtypes.split(",") if d.strip()]
    tcs = {d: TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, steps=10**6, warmup_steps=10, dtype=d)
           for d in dtypes}
    tc = tcs[dtypes[0]]
    resolved = {d: resolve_dtype(d, "cpu") for d in dtypes}
    configs = {"moe": cfg, "dense-active": twin}
    if args.compiled:
        configs["moe-compiled"] = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, backend="compiled"))
    if args.eager:
        configs["moe-eager"] = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, backend="loop"))
    batches = sample_batches(args.data, cfg.vocab_size, tc.batch_size, tc.seq_len, n=32)

    def key(name: str, d: str) -> str:  # "moe", or "moe@fp32" when several dtypes are timed
        return name if len(dtypes) == 1 else f"{name}@{d}"

    models, steps, imbalance = {}, {}, {key(n, d): [] for n in configs for d in dtypes}
    for d in dtypes:
        for name, c in configs.items():
            torch.manual_seed(0)
            k = key(name, d)
            models[k] = Transformer(c).train()
            steps[k] = make_step(models[k], tcs[d], batches, imbalance[k])
    info = {n: {"params": costs(c).total_params, "active_params": costs(c).active_params, "ffn_dim": c.ffn_dim}
            for n, c in configs.items()}
    T = tc.batch_size * tc.seq_len
    compute = torch.bfloat16 if resolved[dtypes[0]] == "bf16" else torch.float32
    auto = select_backend("auto", torch.device("cpu"), compute,
                          widths=(cfg.dim, cfg.moe.expert_ffn_dim or cfg.ffn_dim), rows=T * cfg.moe.top_k)
    from moekit.layer.kernels.compiled_layer import AUTO_COMPILE

    if cfg.moe.backend == "auto" and AUTO_COMPILE.applies(torch.device("cpu"), compute, cfg.dim,
                                                            cfg.moe.expert_ffn_dim or cfg.ffn_dim, T * cfg.moe.top_k):
        auto += ", training through torch.compile"
    print(f"train throughput: preset {args.preset} ({info['moe']['active_params'] / 1e6:.2f}M active of "
          f"{info['moe']['params'] / 1e6:.2f}M) vs dense twin ffn_dim={twin.ffn_dim} "
          f"({info['dense-active']['params'] / 1e6:.2f}M); {T} tokens/step; dtypes "
          + ", ".join(f"{d} -> {resolved[d]}" for d in dtypes)
          + f"; experts backend auto ({dtypes[0]}) -> {auto}; {torch.get_num_threads()} threads\n"
          f"host: {probe_host().describe()}")

    first_step_s = {}  # the first training step of each model (the compiled layer compiles there)
    for name, step_fn in steps.items():
        t0 = time.perf_counter()
        step_fn()
        first_step_s[name] = time.perf_counter() - t0

    def run_steps(fn):
        return lambda: [fn() for _ in range(args.steps)]

    def timed_only(r: int) -> None:  # the routing balance of the timed rounds, not the warm-up's
        if r == 0:
            for v in imbalance.values():
                v.clear()

    load0 = load_now()
    times = interleaved({n: run_steps(f) for n, f in steps.items()}, rounds, warmup=1, before_round=timed_only)
    tok_s = {n: [args.steps * T / t for t in v] for n, v in times.items()}
    train = {"tokens_per_step": T, "steps_per_sample": args.steps, "rounds": rounds, "load_before": load0,
             "load_after": load_now(), "tokens_per_s": {n: statistics.median(v) for n, v in tok_s.items()},
             "ratio_to_dense": {key(n, d): statistics.median(a / b for a, b in zip(tok_s[key(n, d)],
                                                                                       tok_s[key("dense-active", d)]))
                                for n in configs for d in dtypes},
             "dtypes": dtypes, "resolved_dtypes": resolved,
             "samples_tokens_per_s": tok_s, "first_step_s": first_step_s, "data": args.data,
             "load_imbalance_per_layer": {n: [statistics.median(col) for col in zip(*v)] for n, v in imbalance.items()
                                          if v}}
    print(f"\ntraining ({rounds} rounds x {args.steps} steps; load {load0['loadavg_1m']} -> "
          f"{train['load_after']['loadavg_1m']})")
    print(f"  {'model':18s} {'tokens/s':>10s} {'/dense-active':>14s}")
    for n, v in train["tokens_per_s"].items():
        print(f"  {n:18s} {v:10.0f} {train['ratio_to_dense'][n]:14.3f}")
    print("  first training step (compiles the layer and the kernels where they run): "
          + ", ".join(f"{n} {t:.1f} s" for n, t in first_step_s.items()))
    if "auto" in dtypes and len(set(resolved.values())) > 1:
        # is auto's choice the faster dtype on this host? (issue 24: >= 0.95x the faster of fp32 and bf16)
        train["auto_to_best"] = {}
        print(f"  dtype auto -> {resolved['auto']} here; auto's tokens/s / the fastest dtype's:")
        for n in configs:
            best = max(train["tokens_per_s"][key(n, d)] for d in dtypes)
            train["auto_to_best"][n] = train["tokens_per_s"][key(n, "auto")] / best
            print(f"  {n:18s} {train['auto_to_best'][n]:.3f}")
    worst = cfg.moe.n_experts / cfg.moe.top_k
    for n, v in train["load_imbalance_per_layer"].items():
        per_layer = ", ".join(f"{x:.2f}" for x in v)
        print(f"  {n}: load imbalance per layer over the timed steps (median; 1 = balanced, {worst:g} = every "
              f"token on the same experts): {per_layer}")

    decode = {}
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(5)).tolist()
    for wdtype in ("fp32", "bf16"):
        dmodels = {n: copy.deepcopy(models[key(n, dtypes[0])]).eval() for n in configs if n != "moe-compiled"}
        if wdtype == "bf16":
            dmodels = {n: m.to(torch.bfloat16) for n, m in dmodels.items()}

        def gen(m):
            def f():
                out = list(sample_tokens(m, prompt, max_new_tokens=n_decode, temperature=0.0))
                assert len(out) == n_decode
            return f

        load0 = load_now()
        dtimes = interleaved({n: gen(m) for n, m in dmodels.items()}, rounds, warmup=1)
        dtok = {n: [n_decode / t for t in v] for n, v in dtimes.items()}  # includes the prefill of the prompt
        decode[wdtype] = {"prompt": args.prompt, "new_tokens": n_decode, "load_before": load0,
                          "tokens_per_s": {n: statistics.median(v) for n, v in dtok.items()},
                          "ratio_to_dense": {n: statistics.median(a / b for a, b in zip(dtok[n], dtok["dense-active"]))
                                             for n in dtok},
                          "samples_tokens_per_s": dtok}
        print(f"\ndecode, {wdtype} weights (prompt {args.prompt}, {n_decode} new tokens, batch 1, KV cache; "
              f"load {load0['loadavg_1m']})")
        print(f"  {'model':14s} {'tokens/s':>10s} {'/dense-active':>14s}")
        for n, v in decode[wdtype]["tokens_per_s"].items():
            print(f"  {n:14s} {v:10.1f} {decode[wdtype]['ratio_to_dense'][n]:14.3f}")

    out = {"machine": machine(), "argv": sys.argv, "preset": args.preset, "models": info, "auto_backend": auto,
           "train": train, "decode": decode}
    write_results(out, args.out)


if __name__ == "__main__":
    main()
