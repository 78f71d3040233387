"""The trainer: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, validation, checkpoints.

One step = ``grad_accum`` micro-batches of ``batch_size x seq_len`` tokens. Each micro-batch's loss
(LM + its own weighted aux and z losses, see ``losses.py`` for their scope) is divided by
``grad_accum``, so the step's gradient is the mean over micro-batches for every term alike.
After the optimizer step the aux-loss-free router biases are updated from the load observed over
the whole step.

Logs go to ``metrics.jsonl`` in the run directory (always), TensorBoard when it is installed,
and a progress bar. A NaN or inf loss stops the run with ``NonFiniteLossError`` before the
optimizer step, so the last checkpoint on disk is the last good one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moekit import host
from moekit.config import ModelConfig
from moekit.formats.paths import CHECKPOINTS_DIR
from moekit.host import check_dtype
from moekit.model.transformer import Transformer
from moekit.parallel import (
    ParallelContext,
    check_expert_parallel,
    full_optimizer_state,
    setup_parallel,
    shard_model,
    shard_optimizer_state,
    unsharded,
)
from moekit.train.state import load_checkpoint, save_checkpoint


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class DataSpec:
    """Which corpus and tokenizer to train on (see ``moekit.train.data.prepare_data``)."""

    corpus: str = "stdlib"
    tokenizer: str = "byte"
    val_path: str | None = None
    text_field: str = "text"
    cache_dir: str | None = None

    def load(self, progress: bool = True):
        """(TokenDataset, Tokenizer), tokenized once and cached (``moekit.train.data.prepare_data``)."""
        from moekit.train.data import prepare_data

        return prepare_data(corpus=self.corpus, tokenizer=self.tokenizer, val_path=self.val_path,
                            text_field=self.text_field, cache_dir=self.cache_dir, progress=progress)


DEFAULT_SEQ_LEN = 256


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int | None = None  # tokens per sequence; None: 256, or the model's max_seq_len where that is shorter
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    router_lr_scale: float = 1.0  # router learning rate = lr * router_lr_scale
    dtype: str = "auto"  # autocast: "auto" (bf16 where the device computes it natively, moekit.host), "bf16", "fp32"
    device: str = "auto"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 0  # 0: save only at the end
    compile: bool = False
    ep: int = 1  # expert-parallel degree when several processes train (moekit train --nproc N --ep EP)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every", "ep"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        check_dtype(self.dtype)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def for_model(self, cfg: ModelConfig) -> TrainConfig:
        """This config with ``seq_len`` resolved for ``cfg`` (None: ``DEFAULT_SEQ_LEN``, capped at the model's
        context, so every preset trains with no flags) and checked against the model's context."""
        if self.seq_len is None:
            return dataclasses.replace(self, seq_len=min(DEFAULT_SEQ_LEN, cfg.max_seq_len))
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len: {self.seq_len} tokens exceed the model's context (max_seq_len="
                             f"{cfg.max_seq_len}); pass --seq-len {cfg.max_seq_len} or less, or a longer context "
                             f"with --set max_seq_len=N")
        return self


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    train_seconds: float
    final_val_loss: float | None
    curve: list[dict[str, float]] = field(default_factory=list)  # validation points
    tokens_per_s: float = 0.0  # over the whole run's training time
    # the first optimizer step of this call of ``train`` (it pays compilation: the compiled MoE layer, kernels) and
    # the tokens/s of the steps after it (the steady state; tokens_per_s when the call ran one step)
    first_step_seconds: float | None = None
    steady_tokens_per_s: float = 0.0
    expert_load: list[list[float]] = field(default_factory=list)  # per MoE layer, fraction per expert
    imbalance_curve: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to lr, then cosine to lr * min_lr_ratio at the last step (Loshchilov & Hutter 2017)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)


def make_optimizer(model: Transformer, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and routers; routers get their own learning rate."""
    decay, no_decay, router = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".router." in name:
            router.append(p)
        elif p.ndim < 2 or name.endswith("norm.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": router, "weight_decay": 0.0, "lr_scale": tc.router_lr_scale},
    ]
    groups = [g for g in groups if g["params"]]
    # the fused kernel (one pass per tensor) where torch has one: 3.4 ms against 21 ms per step for the 5.4M
    # parameters of preset "small" on 2 CPU cores (*ad hoc*, benchmarks/RESULTS.md "End to end")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused)


def autocast_ctx(device: torch.device, tc: TrainConfig):
    """bf16 autocast when ``tc.dtype`` is, or resolves to (``auto``, ``moekit.host``), bf16 on ``device``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=host.resolve_dtype(tc.dtype, device) == "bf16")


@torch.no_grad()
def evaluate(model: Transformer, data, tc: TrainConfig, device: torch.device, max_batches: int | None = None,
             ctx: ParallelContext | None = None) -> float:
    """Mean next-token cross-entropy (nats/token) over the validation split, in order.

    Under expert parallelism every rank takes its share of each batch (all ranks join every all-to-all)
    and the token-weighted mean is reduced over ranks."""
    ctx = ctx or ParallelContext()
    was_training = model.training
    model.eval()
    total_count = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in data.val_batches(tc.batch_size, tc.seq_len, max_batches or tc.eval_batches):
        x, y = ctx.local_batch(x).to(device), ctx.local_batch(y).to(device)
        with autocast_ctx(device, tc):
            out = model(x, y, aux=False)  # the LM loss only: no balancing losses or routing statistics
        n = (y != -100).sum()
        if n > 0:
            total_count += torch.stack([out.lm_loss.double() * n, n.double()])
    (total_count,) = ctx.all_reduce_sum([total_count])
    model.train(was_training)
    total, count = total_count.tolist()
    if count == 0:
        raise ValueError("validation split: too short for one batch of seq_len tokens")
    return total / count


class _Logger:
    def __init__(self, run_dir: Path, append: bool):
        self.path = run_dir / "metrics.jsonl"
        self.fh = open(self.path, "a" if append else "w")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: needs `tensorboard`

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except (ImportError, ModuleNotFoundError):
            pass

    def log(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def train(model_config: ModelConfig, train_config: TrainConfig, data, run_dir: str | Path,
          tokenizer: Any | None = None, resume: bool = False, progress: bool = True,
          model: Transformer | None = None, stop_at: int | None = None, announce: bool = True) -> TrainResult:
    """Train ``model_config`` on ``data`` (a ``moekit.train.data.TokenDataset``) and write ``run_dir``.

    ``train_config.dtype`` ``auto`` resolves to bf16 where the device computes it natively, else fp32
    (``moekit.host``); the choice and the host go into ``train_config.json`` (``dtype``, ``dtype_requested``,
    ``host``) and, with ``progress`` and ``announce``, into one header line on stderr.

    With ``resume=True`` the latest checkpoint of ``run_dir`` is loaded and training continues the
    same run: same data order, RNG streams, optimizer moments and schedule. ``stop_at`` ends this
    invocation early after that step (with a checkpoint), as an interruption would.

    Under ``torchrun`` or ``moekit train --nproc N`` (``TrainConfig.ep`` experts-parallel ranks, the rest
    data-parallel) every process calls this function: each draws the same global batch and takes its
    share, experts are spread over the ep ranks (``moekit.parallel``), gradients, losses and routing
    statistics are reduced over the right groups, and rank 0 alone writes the run directory. Checkpoints
    are in the single-process format whatever the layout.

    A run that fails before its first checkpoint removes the run directory it created (one that stops on a
    non-finite loss later keeps its last good checkpoint).
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        return _train(model_config, train_config, data, run_dir, tokenizer, resume, progress, model, stop_at, announce)
    except BaseException:
        # a run that failed before its first checkpoint leaves nothing behind (a NaN stop after one keeps them)
        if created and run_dir.is_dir() and not (run_dir / CHECKPOINTS_DIR).is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train(model_config: ModelConfig, train_config: TrainConfig, data, run_dir: Path, tokenizer: Any | None,
           resume: bool, progress: bool, model: Transformer | None, stop_at: int | None, announce: bool) -> TrainResult:
    tc = train_config
    ctx = setup_parallel(ep=tc.ep, device=None if tc.device == "auto" else tc.device)
    device = ctx.device if ctx.world_size > 1 else resolve_device(tc.device)
    main = ctx.is_main
    requested = tc.dtype
    tc = dataclasses.replace(tc, dtype=host.resolve_dtype(tc.dtype, device))
    if main and progress and announce:
        print(f"moekit train: {host.header(requested, tc.dtype, device)}", file=sys.stderr, flush=True)
    if tc.batch_size % ctx.world_size:
        raise ValueError(f"batch_size: {tc.batch_size} sequences cannot be split evenly over {ctx.world_size} "
                         "processes")
    if not resume:
        tc = tc.for_model(model_config)  # before anything is written: a too-long seq_len is a clear error
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    start_step, tokens, elapsed = 0, 0, 0.0
    data_gen = torch.Generator().manual_seed(tc.seed)  # the same global batches on every rank
    curve: list[dict[str, float]] = []
    imbalance_curve: list[dict[str, Any]] = []
    state_tensors = None
    if resume:
        model, state, state_tensors = load_checkpoint(run_dir)
        model_config = model.config
        if tc.seq_len is None:  # the run's own seq_len, so that a resumed run draws the same batches
            tc = dataclasses.replace(tc, seq_len=state.get("train_config", {}).get("seq_len"))
        tc = tc.for_model(model_config)
        start_step, tokens, elapsed = state["step"], state["tokens"], state["train_seconds"]
        curve, imbalance_curve = state.get("curve", []), state.get("imbalance_curve", [])
        data_gen.set_state(state_tensors["data_rng"])
        torch.set_rng_state(state_tensors["torch_rng"])
        if state["step"] >= tc.steps:
            raise ValueError(f"steps: the run in {run_dir} already finished {state['step']} steps; "
                             f"pass a larger --steps to continue it")
    else:
        torch.manual_seed(tc.seed)
        if model is None:
            model = Transformer(model_config)
    model.to(device).train()
    shard_model(model, ctx)  # a no-op in a single process
    if model_config.vocab_size < getattr(data, "vocab_size", 0):
        raise ValueError(f"vocab_size: model has {model_config.vocab_size} tokens, data needs {data.vocab_size}")
    opt = make_optimizer(model, tc)
    if state_tensors is not None:
        shard_optimizer_state(model, opt, state_tensors["optimizer"], ctx)
    step_fn = torch.compile(model) if tc.compile else model

    if main:
        (run_dir / "config.json").write_text(model_config.to_json())
        record = {**dataclasses.asdict(tc), **host.record(requested, tc.dtype, device)}
        (run_dir / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    logger = _Logger(run_dir, append=resume) if main else None
    n_moe = len(model.moe_layers)
    load_sum = [torch.zeros(m.config.n_experts, device=device) for m in model.moe_layers]
    if state_tensors is not None and "expert_load" in state_tensors:
        load_sum = [t.to(device) for t in state_tensors["expert_load"]]

    def checkpoint(step: int) -> None:
        full_opt = full_optimizer_state(model, opt, ctx)  # collectives: every rank takes part
        with unsharded(model, ctx) as whole:
            if main:
                save_checkpoint(run_dir, step, whole, tokenizer,
                                {"step": step, "tokens": tokens, "train_seconds": elapsed, "curve": curve,
                                 "imbalance_curve": imbalance_curve, "train_config": dataclasses.asdict(tc)},
                                {"optimizer": full_opt, "data_rng": data_gen.get_state(),
                                 "torch_rng": torch.get_rng_state(), "expert_load": [t.cpu() for t in load_sum]})
        ctx.barrier()

    last = tc.steps if stop_at is None else min(tc.steps, stop_at)
    bar = tqdm(total=tc.steps, initial=start_step, disable=not (progress and main),
               desc=model_config.name or "train", unit="step", dynamic_ncols=True)
    window_tokens, window_steps, window_t0 = 0, 0, time.perf_counter()
    first_step_s, later_s, later_steps = None, 0.0, 0  # this call's first step; the steps after it
    try:
        for step in range(start_step, last):
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loads = [torch.zeros_like(s) for s in load_sum]
            sums = torch.zeros(4, device=device)  # loss, lm, aux, z
            out = None
            for _ in range(tc.grad_accum):
                x, y = data.get_batch("train", tc.batch_size, tc.seq_len, data_gen)
                x, y = ctx.local_batch(x).to(device), ctx.local_batch(y).to(device)
                with autocast_ctx(device, tc):
                    out = step_fn(x, y)
                (out.loss / tc.grad_accum).backward()
                sums += torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float() / tc.grad_accum
                for i, s in enumerate(s for s in out.stats if s is not None):
                    loads[i] += s.routed_per_expert
            ctx.reduce_grads(model)
            sums = ctx.all_reduce_mean(sums)
            loss, lm_loss, aux_loss, z_loss = sums.tolist()  # one sync per step
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}; stopping. The last good checkpoint is kept in "
                    f"{run_dir / 'checkpoints'} (lower the learning rate or enable grad clipping)")
            grad_norm = float(ctx.clip_grad_norm_(model, tc.grad_clip)) if tc.grad_clip > 0 else float("nan")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if n_moe:
                loads = ctx.all_reduce_sum(loads)  # the global load, so every replica's biases agree
                model.update_router_biases(loads)
                for acc, ld in zip(load_sum, loads):
                    acc += ld
            tokens += tc.tokens_per_step
            window_tokens += tc.tokens_per_step
            window_steps += 1
            step_s = time.perf_counter() - t0
            elapsed += step_s
            if first_step_s is None:
                first_step_s = step_s
            else:
                later_s, later_steps = later_s + step_s, later_steps + 1
            bar.update(1)
            done = step + 1
            if done % tc.log_every == 0 or done == last or done == 1:
                layer_stats = [s for s in ctx.reduce_stats(out.stats) if s is not None]
                comm = ctx.comm_metrics(model, steps=window_steps)
                tok_s = window_tokens / max(1e-9, time.perf_counter() - window_t0)
                window_tokens, window_steps, window_t0 = 0, 0, time.perf_counter()
                rec: dict[str, Any] = {"step": done, "tokens": tokens, "loss": loss, "lm_loss": lm_loss,
                                       "aux_loss": aux_loss, "z_loss": z_loss, "lr": lr, "grad_norm": grad_norm,
                                       "tokens_per_s": tok_s, "train_seconds": elapsed, **comm}
                if layer_stats:
                    rec["load_imbalance"] = [float(s.load_imbalance) for s in layer_stats]
                    rec["dropped_frac"] = [float(s.dropped_frac) for s in layer_stats]
                    rec["dead_experts"] = [int(s.dead_experts) for s in layer_stats]
                    rec["router_entropy"] = [float(s.router_entropy) for s in layer_stats]
                    imbalance_curve.append({"step": done, "tokens": tokens, "load_imbalance": rec["load_imbalance"]})
                if logger is not None:
                    logger.log(rec)
                bar.set_postfix(loss=f"{lm_loss:.3f}", tok_s=f"{tok_s:,.0f}")
            if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
                val = evaluate(model, data, tc, device, ctx=ctx)
                curve.append({"step": done, "tokens": tokens, "train_seconds": elapsed, "val_loss": val})
                if logger is not None:
                    logger.log({"step": done, "tokens": tokens, "val_loss": val, "train_seconds": elapsed})
            if (tc.save_every and done % tc.save_every == 0) or done == last:
                checkpoint(done)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    final_val = curve[-1]["val_loss"] if curve and curve[-1]["step"] == tc.steps else None
    expert_load = [(ld / ld.sum().clamp_min(1)).tolist() for ld in load_sum]
    tokens_per_s = tokens / max(elapsed, 1e-9)
    steady = later_steps * tc.tokens_per_step / later_s if later_steps else tokens_per_s
    return TrainResult(run_dir=run_dir, steps=last, tokens=tokens, train_seconds=elapsed, final_val_loss=final_val,
                       curve=curve, tokens_per_s=tokens_per_s, expert_load=expert_load,
                       imbalance_curve=imbalance_curve, first_step_seconds=first_step_s, steady_tokens_per_s=steady)


def run_training(model_config: ModelConfig, train_config: TrainConfig, data_spec: DataSpec, run_dir: str | Path,
                 resume: bool = False, progress: bool = True, nproc: int = 1,
                 stop_at: int | None = None) -> TrainResult:
    """``moekit train``: load (and cache) the data of ``data_spec``, then train.

    ``nproc > 1`` starts that many local processes (gloo on CPU, NCCL on GPUs) with
    ``train_config.ep``-way expert parallelism and ``nproc / ep``-way data parallelism; under
    ``torchrun`` (RANK set) this process is already one of them.
    """
    if nproc < 1:
        raise ValueError(f"nproc: must be >= 1, got {nproc}")
    if nproc % train_config.ep:
        raise ValueError(f"ep: {train_config.ep} does not divide nproc={nproc}")
    # tokenize here (once) so that the processes below all find the cache ready
    data, tokenizer = data_spec.load(progress)
    if not resume and tokenizer.vocab_size != model_config.vocab_size:
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    if nproc > 1 and "RANK" not in os.environ:
        from moekit.parallel import launch

        if model_config.moe is not None:
            check_expert_parallel(model_config.moe.n_experts, train_config.ep)
        res = launch(_train_process, nproc, (model_config.to_dict(), dataclasses.asdict(train_config),
                                             dataclasses.asdict(data_spec), str(run_dir), resume, progress,
                                             stop_at))[0]
        return TrainResult(**{**res, "run_dir": Path(res["run_dir"])})
    return train(model_config, train_config, data, run_dir, tokenizer=tokenizer, resume=resume, progress=progress,
                 stop_at=stop_at)


def _train_process(cfg: dict, tc: dict, spec: dict, run_dir: str, resume: bool, progress: bool,
                   stop_at: int | None) -> dict:
    """One process of ``run_training(nproc > 1)``; returns the result as plain data."""
    data, tokenizer = DataSpec(**spec).load(progress=False)
    res = train(ModelConfig.from_dict(cfg), TrainConfig(**tc), data, run_dir, tokenizer=tokenizer, resume=resume,
                progress=progress, stop_at=stop_at)
    return {**dataclasses.asdict(res), "run_dir": str(res.run_dir)}
