"""The ``moekit`` command line: maps verbs to the typed Python functions that do the work.

    moekit compare   MoE vs its dense twins, runs/<name>/report.md     (moekit.compare.runner.compare)
    moekit train     train one model                                    (moekit.train.trainer.run_training)
    moekit generate  sample from a checkpoint, streaming                (moekit.train.evaluation.generate_text)
    moekit eval      validation loss, perplexity, bits per byte         (moekit.train.evaluation.eval_checkpoint)
    moekit costs     parameters, FLOPs and memory of a preset, config or checkpoint      (moekit.model.costs.costs)
    moekit convert   Hugging Face <-> moekit checkpoints                                 (moekit.formats.hf.convert)
    moekit upcycle   a dense checkpoint into an MoE one                                  (moekit.upcycle.upcycle)
    moekit compress  quantized experts, a width per expert                               (moekit.compress.compress)
    moekit serve     an OpenAI-compatible HTTP server over the batching engine           (moekit.serve.server.serve)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

# moekit.host.DTYPE_CHOICES, spelled out: importing moekit.host loads torch, which must wait for the allocator
# re-exec below (a test checks that the two agree)
DTYPE_CHOICES = ("auto", "bf16", "fp32")

# glibc returns large freed blocks to the OS and re-faults them on the next step; keeping them
# (no mmap for big blocks, no trimming) is measurably faster for training loops (benchmarks/moe_layer.py).
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _tune_allocator(command: list[str] | None = None) -> None:
    """Re-exec once with the allocator settings (glibc reads them at start-up only).

    ``command``: the command line to re-run (default: this ``python -m moekit ...``); the benchmarks pass
    their own script. ``MOEKIT_NO_ALLOCATOR_TUNING=1`` keeps glibc's defaults.
    """
    if os.environ.get("MOEKIT_NO_ALLOCATOR_TUNING") or all(k in os.environ for k in ALLOCATOR_ENV):
        return
    if sys.platform != "linux" or not sys.argv or not sys.argv[0]:
        return
    env = {**os.environ, **{k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}}
    try:
        os.execve(sys.executable, command or [sys.executable, "-m", "moekit", *sys.argv[1:]], env)
    except OSError:
        pass


def _number(kind: type, ok, what: str):
    """An argparse ``type`` that parses ``kind`` and accepts only values with ``ok(value)``; a bad value is an error
    naming the flag (argparse adds it), the value and what was expected."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what
    parse.expects = what  # (tests/test_cli.py builds one bad value per flag from it)
    return parse


POSITIVE_INT = _number(int, lambda v: v >= 1, "an integer >= 1")
NONNEGATIVE_INT = _number(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE_FLOAT = _number(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
NONNEGATIVE_FLOAT = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
PORT = _number(int, lambda v: 0 <= v <= 65535, "a port number in 0..65535")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def model_config_from_args(args: argparse.Namespace):
    from moekit.config import ModelConfig
    from moekit.model.presets import get_preset

    cfg = ModelConfig.from_json(args.config) if args.config else get_preset(args.preset)
    d = cfg.to_dict()
    moe_flags = {"n_experts": args.n_experts, "top_k": args.top_k, "expert_ffn_dim": args.expert_ffn_dim}
    model_flags = {"dim": args.dim, "n_layers": args.n_layers, "ffn_dim": args.ffn_dim}
    d.update({k: v for k, v in model_flags.items() if v is not None})
    if d["moe"] is not None:
        d["moe"].update({k: v for k, v in moe_flags.items() if v is not None})
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        target = d
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(target.get(p), dict):
                raise SystemExit(f"--set {key}: {p!r} is not a nested config")
            target = target[p]
        target[leaf] = _parse_value(value)
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise SystemExit(f"invalid model config: {e}") from e


def train_config_from_args(args: argparse.Namespace):
    from moekit.train.trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
        return TrainConfig(**kwargs)
    except ValueError as e:
        raise SystemExit(f"invalid training config: {e}") from e


def data_spec_from_args(args: argparse.Namespace):
    from moekit.train.trainer import DataSpec

    return DataSpec(corpus=args.corpus, tokenizer=args.tokenizer, val_path=args.val, text_field=args.text_field,
                    cache_dir=args.cache_dir)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="small", help="named model config (see `moekit costs --list`); default small")
    g.add_argument("--config", help="a model config.json instead of a preset")
    g.add_argument("--dim", type=POSITIVE_INT, help="model width")
    g.add_argument("--n-layers", dest="n_layers", type=POSITIVE_INT, help="transformer layers")
    g.add_argument("--ffn-dim", dest="ffn_dim", type=POSITIVE_INT, help="dense FFN width")
    g.add_argument("--n-experts", dest="n_experts", type=POSITIVE_INT, help="routed experts per MoE layer")
    g.add_argument("--top-k", dest="top_k", type=POSITIVE_INT, help="experts per token")
    g.add_argument("--expert-ffn-dim", dest="expert_ffn_dim", type=POSITIVE_INT,
                   help="width of each expert (fine-grained)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any ModelConfig field, nested with dots, e.g. --set moe.capacity_factor=1.25 (repeatable)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=POSITIVE_INT, help="optimizer steps (default 300)")
    g.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT, help="sequences per micro-batch (default 16)")
    g.add_argument("--seq-len", dest="seq_len", type=POSITIVE_INT,
                   help="tokens per sequence (default 256, or the model's context where that is shorter)")
    g.add_argument("--grad-accum", dest="grad_accum", type=POSITIVE_INT, help="micro-batches per step (default 1)")
    g.add_argument("--lr", type=POSITIVE_FLOAT, help="peak learning rate (default 3e-3)")
    g.add_argument("--warmup-steps", dest="warmup_steps", type=NONNEGATIVE_INT, help="linear warmup steps (default 30)")
    g.add_argument("--router-lr-scale", dest="router_lr_scale", type=NONNEGATIVE_FLOAT,
                   help="router lr multiplier (default 1)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="autocast dtype: auto (default: bf16 where the host computes it natively, else fp32), bf16, "
                        "fp32")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    g.add_argument("--seed", type=NONNEGATIVE_INT, help="random seed (default 0)")
    g.add_argument("--eval-every", dest="eval_every", type=NONNEGATIVE_INT, help="validate every N steps (default 50)")
    g.add_argument("--eval-batches", dest="eval_batches", type=POSITIVE_INT, help="validation batches (default 16)")
    g.add_argument("--log-every", dest="log_every", type=POSITIVE_INT, help="log metrics every N steps (default 10)")
    g.add_argument("--save-every", dest="save_every", type=NONNEGATIVE_INT,
                   help="checkpoint every N steps (default: end only)")


def _add_inference_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype: auto (default: the checkpoint's, but fp32 for a 16-bit one on a CPU "
                        "without native bf16), bf16, fp32")


def _add_expert_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-memory", dest="expert_memory", type=POSITIVE_FLOAT, metavar="GB",
                   help="keep the routed experts on disk, read into a pool of GB GiB (LRU; the CPU; moekit "
                        "checkpoints). Default: all in memory")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default="stdlib",
                   help="'stdlib' (this Python's standard library source, the default), a text file, a directory, "
                        ".jsonl or .parquet")
    g.add_argument("--val", help="a separate validation corpus (default: a deterministic split of --corpus)")
    g.add_argument("--tokenizer", default="byte",
                   help="'byte' (default), 'bpe' (trained locally) or a tokenizer.json path")
    g.add_argument("--text-field", dest="text_field", default="text", help="text field of jsonl/parquet records")
    g.add_argument("--cache-dir", dest="cache_dir",
                   help="token cache directory (default $MOEKIT_CACHE/tokens, else ~/.cache/moekit/tokens)")


def cmd_compare(args: argparse.Namespace) -> int:
    from moekit.compare.runner import compare

    cfg = model_config_from_args(args)
    res = compare(cfg, train_config_from_args(args), data_spec_from_args(args), name=args.name,
                  runs_dir=args.runs_dir, dense_total=args.dense_total, plots=not args.no_plots,
                  progress=not args.quiet)
    out = Path(args.runs_dir) / res["name"]
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, results.json" + ("" if args.no_plots else " and plots"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from moekit.train.trainer import run_training

    res = run_training(model_config_from_args(args), train_config_from_args(args), data_spec_from_args(args),
                       run_dir=args.out, resume=args.resume, progress=not args.quiet, nproc=args.nproc)
    first = "" if res.first_step_seconds is None else f", the first step {res.first_step_seconds:.1f}s"
    print(f"trained {res.steps} steps, {res.tokens:,} tokens in {res.train_seconds:.1f}s "
          f"({res.steady_tokens_per_s:,.0f} tokens/s after the first step{first}); "
          f"final validation loss {res.final_val_loss}; checkpoint in {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moekit.train.evaluation import benchmark_generation, generate_text

    if args.benchmark:
        r = benchmark_generation(args.checkpoint, prompt_tokens=args.prompt_tokens, new_tokens=args.max_new_tokens,
                                 rounds=args.rounds, dtype=args.dtype, expert_memory_gb=args.expert_memory)
        if args.json:
            print(json.dumps(r, indent=2))
            return 0
        bw = r["read_bandwidth_bytes_per_s"]
        print(f"{r['checkpoint']}: {r['dtype']} on {r['device']}, {r['threads']} threads; "
              f"{r['host']['cpu_model']} ({r['host']['kind']})")
        print(f"  load                 {r['load_seconds']:8.2f} s")
        print(f"  prompt ({r['prompt_tokens']} tokens)  {r['prompt_tokens_per_s']:8.1f} tokens/s")
        print(f"  decode (batch 1)     {r['decode_tokens_per_s']:8.1f} tokens/s  "
              f"({r['weight_bytes_per_decode_token'] / 1e6:.1f} MB of weights a token: "
              f"{r['decode_weight_bytes_per_s'] / 1e9:.1f} GB/s"
              + ("" if bw is None else f", {r['bandwidth_fraction']:.0%} of the {bw / 1e9:.1f} GB/s read bandwidth")
              + ")")
        print(f"  first round          {r['first_round_prompt_seconds']:8.2f} s prompt, "
              f"{r['first_round_decode_ms_per_token']:.1f} ms/token (compiles the kernels once per shape)")
        if r["offload"]:
            o = r["offload"]
            print(f"  offloaded experts    {o['slots_per_layer']} slots per layer: hit rate {o['hit_rate']:.1%}, "
                  f"{o['bytes_read'] / 2**20:,.1f} MiB read")
        return 0

    for piece in generate_text(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed, dtype=args.dtype,
                               expert_memory_gb=args.expert_memory):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moekit.train.evaluation import eval_checkpoint

    res = eval_checkpoint(args.checkpoint, corpus=args.corpus, val_path=args.val, text_field=args.text_field,
                          batch_size=args.batch_size, seq_len=args.seq_len, max_batches=args.max_batches,
                          cache_dir=args.cache_dir, dtype=args.dtype, expert_memory_gb=args.expert_memory)
    print(json.dumps(res, indent=2) if args.json else
          f"val loss {res['val_loss']:.4f} nats/token, perplexity {res['perplexity']:.2f}, "
          f"{res['bits_per_byte']:.4f} bits/byte over {res['tokens']:,} tokens")
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    from moekit.model.costs import costs, format_costs
    from moekit.model.presets import PRESETS

    if args.list:
        print("\n".join(PRESETS))
        return 0
    if args.checkpoint:
        cfg = _config_of_checkpoint(args.checkpoint)
    else:
        cfg = model_config_from_args(args)
    c = costs(cfg, seq_len=args.seq_len)
    print(json.dumps(c.to_dict(), indent=2) if args.json else format_costs(c))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from moekit.formats import convert

    out = convert(args.src, args.dst, to=args.to, arch=args.arch, expert_layout=args.expert_layout,
                  max_shard_bytes=args.max_shard_bytes)
    print(f"wrote {out} ({args.to} format)")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from moekit.compress import compress

    common = dict(method=args.method, group_size=None if args.group_size == "row" else int(args.group_size),
                  calib=args.calib, symmetric=args.symmetric, scope=args.scope, quantize_dense=args.dense,
                  dense_bits=args.dense_bits, calibrate_all_experts=args.calibrate_all_experts,
                  act_order=args.act_order, calib_sequences=args.calib_sequences, progress=not args.json)
    if args.sweep is not None:
        from moekit.compress.sweep import parse_budgets, report_markdown, sweep

        if args.dst is not None or args.out is None or args.bits is not None:
            raise SystemExit("moekit compress --sweep: give SRC and --out DIR (no DST, no --bits: the budgets are "
                             "--sweep's)")
        results = sweep(args.src, args.out, parse_budgets(args.sweep), seeds=args.seeds,
                        decode_tokens=args.decode_tokens, plots=not args.no_plots,
                        command="moekit " + " ".join(sys.argv[1:]), **common)
        print(json.dumps(results, indent=2) if args.json else report_markdown(results))
        return 0
    if args.dst is None or args.bits is None:
        raise SystemExit("moekit compress: give SRC DST --bits B (or SRC --sweep B1,B2,... --out DIR)")
    res = compress(args.src, args.dst, bits=args.bits, mixed=not args.uniform, seed=args.seed, **common)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    ppl = ("" if res.perplexity_after is None else
           f"; validation perplexity {res.perplexity_before:.3f} -> {res.perplexity_after:.3f}")
    print(f"wrote {res.dst}: {res.method}, {res.effective_bits:.3f} effective bits per weight (asked {args.bits}), "
          f"{res.weight_bytes_before / 2**20:.1f} -> {res.weight_bytes_after / 2**20:.1f} MiB of quantized weights "
          f"({res.compression:.2f}x){ppl}")
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    from moekit.shift import shift

    rep = shift(args.ref, args.other, corpus=args.corpus, batches=args.batches, batch_size=args.batch_size,
                seq_len=args.seq_len, out=args.out, plots=not args.no_plots, dtype=args.dtype,
                cache_dir=args.cache_dir, progress=not args.json, command="moekit " + " ".join(sys.argv[1:]))
    print(json.dumps(rep.to_dict(), indent=2) if args.json else rep.markdown())
    if args.out and not args.json:
        print(f"wrote {args.out}/shift.json, shift.md" + ("" if args.no_plots else ", shift.png"))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from moekit.compress.prune import prune

    res = prune(args.src, args.dst, experts_per_layer=args.experts_per_layer, drop_frac=args.drop_frac,
                rule=args.rule, calib=args.calib, calib_sequences=args.calib_sequences, eval_batches=args.eval_batches,
                seed=args.seed, cache_dir=args.cache_dir, progress=not args.json)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    changed = sum(s["changed_any"] for s in res.shift.values()) / max(1, len(res.shift))
    print(f"wrote {res.dst}: {res.experts_before} -> {res.experts_after} experts per MoE layer ({res.rule}); "
          f"{res.params_before / 1e6:.2f}M -> {res.params_after / 1e6:.2f}M parameters "
          f"({res.active_params / 1e6:.2f}M active); validation perplexity {res.perplexity_before:.3f} -> "
          f"{res.perplexity_after:.3f}; tokens whose top-k changed: {changed:.1%} (mean over layers)")
    for path, ids in res.kept_experts.items():
        print(f"  {path}: kept {ids}")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from moekit.config import MoEConfig
    from moekit.formats import export_hf
    from moekit.upcycling import upcycle

    moe_kwargs = {"n_experts": args.n_experts, "top_k": args.top_k}
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        moe_kwargs[key] = _parse_value(value)
    try:
        moe = MoEConfig(**moe_kwargs)
    except TypeError as e:
        raise ValueError(f"--set: {e}") from e
    model = upcycle(args.src, moe, noise_std=args.noise_std, granularity=args.granularity, moe_every=args.moe_every,
                    first_dense_layers=args.first_dense_layers, seed=args.seed)
    out = export_hf(model, args.dst, arch=args.arch) if args.to == "hf" else model.save_pretrained(args.dst)
    print(f"wrote {out}: {len(model.moe_layers)} MoE layers of {moe.n_experts} experts (top-{moe.top_k})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from moekit.serve.server import serve

    serve(args.checkpoint, host=args.host, port=args.port, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
          kv_cache_gb=args.kv_cache_gb, max_queue=args.max_queue, dtype=args.dtype, model_name=args.model_name,
          drain_timeout=args.drain_timeout, stream_interval=args.stream_interval,
          expert_memory_gb=args.expert_memory)
    return 0


def _config_of_checkpoint(path: str):
    """The config of a checkpoint directory (moekit or Hugging Face) or of a config.json file."""
    from moekit.config import ModelConfig
    from moekit.formats import config_of

    p = Path(path)
    return ModelConfig.from_json(p) if p.is_file() and p.suffix == ".json" else config_of(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit",
                                     description="Mixture-of-Experts transformers and their dense twins.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices and other details")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("compare", help="train an MoE model and its dense twins; write a side-by-side report",
                       description="Train an MoE model, its dense twin with the same active parameters (and "
                                   "optionally the one with the same total parameters) on the same data and budget; "
                                   "write runs/<name>/report.md, results.json and plots.")
    _add_model_args(p)
    _add_train_args(p)
    _add_data_args(p)
    p.add_argument("--name", help="run name (default: the preset name)")
    p.add_argument("--runs-dir", dest="runs_dir", default="runs", help="where runs/<name>/ is written (default runs)")
    p.add_argument("--dense-total", dest="dense_total", action="store_true",
                   help="also train the dense twin with the same TOTAL parameters")
    p.add_argument("--no-plots", dest="no_plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train one model", description="Train one model; checkpoints and metrics.jsonl "
                                                                      "go to --out. --resume continues the same run.")
    _add_model_args(p)
    _add_train_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--nproc", type=POSITIVE_INT, default=1,
                   help="train with N local processes (torch.distributed: gloo on CPU, NCCL on GPUs); "
                        "or launch with torchrun -m moekit train")
    p.add_argument("--ep", type=POSITIVE_INT,
                   help="expert-parallel degree (divides --nproc and n_experts; default 1); the "
                                          "other nproc/ep ways are data parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a checkpoint, streaming",
                       description="Sample from a checkpoint (a run directory or a checkpoint directory).")
    p.add_argument("checkpoint", help="run or checkpoint directory")
    p.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=POSITIVE_INT, default=200,
                   help="tokens to sample (default 200)")
    p.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=0.8,
                   help="sampling temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", dest="top_k", type=POSITIVE_INT, default=50,
                   help="sample among the k most likely (default 50)")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=None, help="sampling seed")
    _add_inference_dtype_arg(p)
    _add_expert_memory_arg(p)
    p.add_argument("--benchmark", action="store_true",
                   help="instead of text: time the prompt pass and decode on a random prompt and print tokens/s and "
                        "the share of the host's read bandwidth decode reaches (--max-new-tokens decode steps)")
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=POSITIVE_INT, default=512,
                   help="with --benchmark: prompt length in tokens (default 512)")
    p.add_argument("--rounds", type=POSITIVE_INT, default=3, help="with --benchmark: timed rounds (default 3)")
    p.add_argument("--json", action="store_true", help="with --benchmark: print JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a checkpoint",
                       description="Evaluate a checkpoint on the validation split of a corpus.")
    p.add_argument("checkpoint", help="run or checkpoint directory")
    p.add_argument("--corpus", default="stdlib", help="corpus as for train (default stdlib)")
    p.add_argument("--val", help="a separate validation corpus")
    p.add_argument("--text-field", dest="text_field", default="text", help="text field of jsonl/parquet records")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT, default=8,
                   help="sequences per batch (default 8)")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE_INT, default=None,
                   help="tokens per sequence (default: trained)")
    p.add_argument("--max-batches", dest="max_batches", type=POSITIVE_INT, default=None,
                   help="limit the batches (default all)")
    p.add_argument("--cache-dir", dest="cache_dir", help="token cache directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_inference_dtype_arg(p)
    _add_expert_memory_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("costs", help="parameters, FLOPs/token, memory of a preset, config or checkpoint",
                       description="The analytic cost model: total and active parameters, FLOPs per token, weight "
                                   "memory, KV cache per token, sparsity.")
    _add_model_args(p)
    p.add_argument("--checkpoint", help="a moekit or Hugging Face checkpoint directory")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE_INT, default=None,
                   help="context for the attention FLOPs (default: the model's max_seq_len)")
    p.add_argument("--json", action="store_true", help="print JSON (keys include total_params, active_params)")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.set_defaults(func=cmd_costs)

    p = sub.add_parser("convert", help="convert checkpoints between the Hugging Face and moekit formats",
                       description="Convert a checkpoint directory: Hugging Face (mixtral, qwen2_moe, qwen3_moe, "
                                   "olmoe, deepseek_v2, deepseek_v3, gpt_oss, llama, qwen2, mistral) <-> moekit.")
    p.add_argument("src", help="source checkpoint directory (either format)")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--to", choices=["hf", "moekit"], required=True, help="target format")
    p.add_argument("--arch", help="Hugging Face architecture to export as (default: the source's, or the first "
                                  "that holds the model exactly)")
    p.add_argument("--expert-layout", dest="expert_layout", choices=["per_expert", "fused"], default="per_expert",
                   help="HF expert tensors: one per expert (hub layout, default) or fused 3-D")
    p.add_argument("--max-shard-bytes", dest="max_shard_bytes", type=POSITIVE_INT, default=None,
                   help="split the safetensors into shards of at most this many bytes (with an index file)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compress", help="quantize the experts (2/3/4/8 bits, a width per expert); write a checkpoint",
                       description="Weight-only quantization of the routed and shared experts (and, with --dense, "
                                   "attention and dense FFNs): --bits is the average in effective bits, scales and "
                                   "zeros included; --mixed (default) gives each expert its own width by an exact "
                                   "allocation on measured errors. The destination is written atomically.")
    p.add_argument("src", help="source checkpoint (a moekit run/checkpoint or a Hugging Face MoE directory)")
    p.add_argument("dst", nargs="?", help="destination directory (the compressed checkpoint); not with --sweep")
    p.add_argument("--bits", type=POSITIVE_FLOAT, help="average effective bits per quantized weight")
    p.add_argument("--sweep", help="compress at each of these budgets instead (e.g. 8,4,3,2.5,2), uniform and mixed, "
                                   "and write a report into --out (report.md, results.json, plots)")
    p.add_argument("--out", help="--sweep: the report directory (must not exist)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1, help="--sweep: calibration seeds per mixed run (default 1)")
    p.add_argument("--decode-tokens", dest="decode_tokens", type=POSITIVE_INT, default=16,
                   help="--sweep: timed decode tokens per model (default 16)")
    p.add_argument("--no-plots", dest="no_plots", action="store_true", help="--sweep: no PNGs (no matplotlib needed)")
    p.add_argument("--method", choices=["rtn", "hqq", "gptq"], default="rtn",
                   help="rtn (round to nearest), hqq (calibration-free), gptq (needs --calib); default rtn")
    p.add_argument("--group-size", dest="group_size", choices=["32", "64", "128", "row"], default="128",
                   help="weights per scale (default 128; row: one group per row)")
    p.add_argument("--symmetric", action="store_true", help="symmetric codes (no zeros stored)")
    p.add_argument("--calib", help="calibration corpus (a name or path, as moekit train's --corpus); also gives "
                                   "the validation perplexity before and after")
    p.add_argument("--uniform", action="store_true", help="one width for every expert (default: mixed widths)")
    p.add_argument("--scope", choices=["layer", "global"], default="layer",
                   help="allocate the bits per MoE layer (default) or over the whole model")
    p.add_argument("--dense", action="store_true", help="also quantize attention projections and dense FFNs")
    p.add_argument("--dense-bits", dest="dense_bits", type=POSITIVE_INT, choices=[2, 3, 4, 8], default=None,
                   help="their width (default: the widest that fits)")
    p.add_argument("--calibrate-all-experts", dest="calibrate_all_experts", action="store_true",
                   help="gptq: calibrate every expert on every token (rare experts get statistics)")
    p.add_argument("--act-order", dest="act_order", action="store_true", help="gptq: columns by activation order")
    p.add_argument("--calib-sequences", dest="calib_sequences", type=POSITIVE_INT, default=32,
                   help="calibration sequences (default 32)")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0, help="seed of the calibration sample")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("shift", help="expert shift: how far OTHER's routing moved from REF's on the same tokens",
                       description="Per MoE layer: the share of tokens whose top-k changed (at least one, at least "
                                   "half, all), top-1 agreement, KL between the routing distributions and the change "
                                   "in per-expert load, with both models' perplexity on the same validation tokens. "
                                   "A pruned OTHER is mapped back to REF's experts through its pruning.json.")
    p.add_argument("ref", help="reference checkpoint (moekit, Hugging Face or compressed)")
    p.add_argument("other", help="modified checkpoint: compressed, pruned or fine-tuned from REF")
    p.add_argument("--corpus", default="stdlib", help="corpus as for train; its validation split (default stdlib)")
    p.add_argument("--batches", type=POSITIVE_INT, default=8, help="validation batches (default 8)")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT, default=4,
                   help="sequences per batch (default 4)")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE_INT, default=None,
                   help="tokens per sequence (default: REF's max_seq_len)")
    p.add_argument("--out", help="write shift.json, shift.md and shift.png into this directory")
    p.add_argument("--no-plots", dest="no_plots", action="store_true", help="no shift.png (no matplotlib needed)")
    p.add_argument("--cache-dir", dest="cache_dir", help="token cache directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_inference_dtype_arg(p)
    p.set_defaults(func=cmd_shift)

    p = sub.add_parser("prune", help="drop the least-routed experts of every MoE layer; write a checkpoint",
                       description="Static expert pruning by routing frequency on calibration text (or at random, "
                                   "the baseline): the experts' weights and the router's rows for removed experts "
                                   "go. DST is a plain moekit checkpoint (written atomically) with pruning.json "
                                   "naming the kept experts; it loads, trains, converts and goes through costs.")
    p.add_argument("src", help="source checkpoint (moekit run/checkpoint or Hugging Face MoE directory)")
    p.add_argument("dst", help="destination directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--experts-per-layer", dest="experts_per_layer", type=POSITIVE_INT, help="experts kept per layer")
    g.add_argument("--drop-frac", dest="drop_frac", type=NONNEGATIVE_FLOAT, help="share of each layer's experts "
                                                                                  "dropped, in [0, 1)")
    p.add_argument("--rule", choices=["frequency", "random"], default="frequency",
                   help="which experts stay: the most routed (default) or random ones (the baseline)")
    p.add_argument("--calib", default="stdlib", help="corpus the routes are counted on and the perplexity measured "
                                                     "(default stdlib)")
    p.add_argument("--calib-sequences", dest="calib_sequences", type=POSITIVE_INT, default=32,
                   help="calibration sequences (default 32)")
    p.add_argument("--eval-batches", dest="eval_batches", type=POSITIVE_INT, default=8,
                   help="validation batches for the perplexity before and after (default 8)")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0,
                   help="seed of the calibration sample and of --rule random")
    p.add_argument("--cache-dir", dest="cache_dir", help="token cache directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("upcycle", help="turn a dense checkpoint into an MoE one (sparse upcycling)",
                       description="Every expert starts as a copy of the dense FFN (optionally split into "
                                   "fine-grained slices, optionally with noise); attention and embeddings are "
                                   "copied; routers are initialised. With identical copies and renormalised "
                                   "top-k the result computes the same function as the dense model.")
    p.add_argument("src", help="dense checkpoint directory (moekit, or Hugging Face llama/qwen2/mistral)")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--n-experts", dest="n_experts", type=POSITIVE_INT, default=8,
                   help="routed experts per layer (default 8)")
    p.add_argument("--top-k", dest="top_k", type=POSITIVE_INT, default=2, help="experts per token (default 2)")
    p.add_argument("--granularity", type=POSITIVE_INT, default=1,
                   help="split each FFN copy into this many fine-grained experts (default 1)")
    p.add_argument("--noise-std", dest="noise_std", type=NONNEGATIVE_FLOAT, default=0.0,
                   help="relative noise added to each expert copy (default 0: exact copies)")
    p.add_argument("--moe-every", dest="moe_every", type=POSITIVE_INT, default=1, help="MoE every N layers (default 1)")
    p.add_argument("--first-dense-layers", dest="first_dense_layers", type=NONNEGATIVE_INT, default=0,
                   help="keep the first K layers dense (default 0)")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0, help="seed of the router init and the noise")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any MoEConfig field, e.g. --set aux_loss_coef=0.001 (repeatable)")
    p.add_argument("--to", choices=["hf", "moekit"], default="moekit", help="output format (default moekit)")
    p.add_argument("--arch", help="Hugging Face architecture for --to hf (default: mixtral-compatible)")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
                       description="Continuous batching behind /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health and /metrics (needs pip install 'moekit[serve]'). SIGINT/SIGTERM drain "
                                   "the requests in flight, then exit.")
    p.add_argument("checkpoint", help="run or checkpoint directory (moekit, Hugging Face or compressed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=PORT, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", dest="max_batch", type=POSITIVE_INT, default=16,
                   help="sequences decoded together: the KV slots (default 16)")
    p.add_argument("--max-seq-len", dest="max_seq_len", type=POSITIVE_INT, help="context served (default: the model's)")
    p.add_argument("--kv-cache-gb", dest="kv_cache_gb", type=POSITIVE_FLOAT,
                   help="KV cache budget in GiB: as many slots as fit, at most --max-batch (default: --max-batch)")
    p.add_argument("--max-queue", dest="max_queue", type=POSITIVE_INT, default=64,
                   help="requests waiting for a slot before new ones get 429 (default 64)")
    p.add_argument("--drain-timeout", dest="drain_timeout", type=NONNEGATIVE_FLOAT, default=30.0,
                   help="seconds the requests in flight get to finish on shutdown (default 30)")
    p.add_argument("--model-name", dest="model_name", help="the model clients ask for (default: the checkpoint's name)")
    p.add_argument("--stream-interval", dest="stream_interval", type=POSITIVE_INT, default=1,
                   help="tokens per streamed chunk, at least (default 1; more: fewer writes, more engine time)")
    _add_inference_dtype_arg(p)
    _add_expert_memory_arg(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _tune_allocator()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from moekit.formats import CheckpointError
    from moekit.train.trainer import NonFiniteLossError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointError, NonFiniteLossError) as e:
        if args.verbose:
            raise
        print(f"moekit {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
