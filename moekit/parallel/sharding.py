"""Sharding: experts spread over the ep ranks; full (single-process) state dicts and optimizer state.

See the package docstring (``moekit/parallel/__init__.py``) for the design.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.parallel.context import (
    ParallelContext,
    _broadcast,
    _moe_layers,
    _sharded_experts,
    _sharded_param_indices,
    _unwrap,
    check_expert_parallel,
)
from moekit.parallel.dispatcher import AllToAllDispatcher


# ---------------------------------------------------------------------------------------------- sharding
def shard_model(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Make ``model`` (a Transformer, a MoE layer or anything holding MoE layers) run under ``ctx``, in place.

    Parameters and buffers are first broadcast from rank 0 so that replicas start identical; then each
    MoE layer keeps only its rank's experts and gets an ``AllToAllDispatcher``. Build the optimizer (and
    DDP) after this call: the expert parameters are replaced by their slices.
    """
    moes = _moe_layers(model)
    for m in moes:
        check_expert_parallel(m.config.n_experts, ctx.ep)  # before any collective: all ranks raise alike
        if m.dispatcher is not None:
            raise ValueError("shard_model: this model is already sharded")
    if ctx.world_size == 1:
        return model
    _broadcast(list(model.state_dict().values()), ctx.world_group)
    for m in moes:
        L = m.config.n_experts // ctx.ep
        if ctx.ep > 1:
            m.experts.shard_(ctx.ep_rank * L, L)
        m.dispatcher = AllToAllDispatcher(ctx, m.config.n_experts)
    return model


@contextmanager
def unsharded(model: nn.Module, ctx: ParallelContext):
    """Inside, every sharded ``Experts`` holds its full stacked tensors (gathered over the ep group: a
    collective, every rank enters), so the model IS the single-process model for any code that saves
    it (``moekit.train.state.save_checkpoint``); the shards are put back on exit. Do not train inside."""
    module, _ = _unwrap(model)
    saved = []
    with torch.no_grad():
        for _, experts in _sharded_experts(module):
            for name, p in list(experts.named_parameters(recurse=False)):
                parts = [torch.empty_like(p) for _ in range(ctx.ep)]
                dist.all_gather(parts, p.detach().contiguous(), group=ctx.ep_group)
                saved.append((experts, name, p))
                setattr(experts, name, nn.Parameter(torch.cat(parts), requires_grad=p.requires_grad))
    try:
        yield module
    finally:
        for experts, name, p in saved:
            setattr(experts, name, p)


def full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, Tensor]:
    """The single-process ``state_dict`` (full stacked experts) of a sharded model; a collective."""
    with unsharded(model, ctx) as module:
        return dict(module.state_dict())


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, Tensor], ctx: ParallelContext) -> None:
    """Load a single-process state dict into a sharded model: every rank slices its experts (no collective)."""
    module, _ = _unwrap(model)
    state = dict(state)
    for prefix, experts in _sharded_experts(module):
        lo, hi = experts.expert_offset, experts.expert_offset + experts.n_experts
        for name, _p in experts.named_parameters(recurse=False):
            state[f"{prefix}{name}"] = state[f"{prefix}{name}"][lo:hi]
    module.load_state_dict(state)


def save_model(model: nn.Module, directory: str | Path, ctx: ParallelContext) -> None:
    """Write the model with ``moekit.formats.save_pretrained`` exactly as one process would (rank 0
    writes the temporarily unsharded module); every rank must call it."""
    from moekit.formats.checkpoint import save_pretrained

    with unsharded(model, ctx) as module:
        if ctx.is_main:
            save_pretrained(module, directory)
    if ctx.world_size > 1:
        dist.barrier(group=ctx.world_group)  # the files exist when any rank returns


def load_model(directory: str | Path, ctx: ParallelContext) -> nn.Module:
    """Read a single-process checkpoint (any layout wrote it) and shard it for ``ctx``."""
    from moekit.formats.checkpoint import load_pretrained_moekit

    return shard_model(load_pretrained_moekit(directory, device=ctx.device), ctx)


@torch.no_grad()
def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext) -> dict:
    """``optimizer.state_dict()`` with the per-expert moments gathered to full [E, ...] tensors, i.e. what a
    single-process optimizer over the unsharded model holds; a collective."""
    sd = optimizer.state_dict()
    if ctx.ep == 1:
        return sd
    sd["state"] = {idx: dict(st) for idx, st in sd["state"].items()}  # state_dict() shares the live dicts
    for idx, p, _experts in _sharded_param_indices(model, optimizer):
        for k, v in sd["state"].get(idx, {}).items():
            if torch.is_tensor(v) and v.shape == p.shape:  # per-element moments (not AdamW's scalar step)
                parts = [torch.empty_like(v) for _ in range(ctx.ep)]
                dist.all_gather(parts, v.contiguous(), group=ctx.ep_group)
                sd["state"][idx][k] = torch.cat(parts)
    return sd


@torch.no_grad()
def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict,
                          ctx: ParallelContext) -> None:
    """Load a single-process optimizer state (``full_optimizer_state``'s format) into this rank's optimizer."""
    sd = {**full, "state": {idx: dict(st) for idx, st in full["state"].items()}}
    for idx, p, experts in _sharded_param_indices(model, optimizer):
        lo, hi = experts.expert_offset, experts.expert_offset + experts.n_experts
        for k, v in sd["state"].get(idx, {}).items():
            if torch.is_tensor(v) and v.ndim == p.ndim and v.shape[1:] == p.shape[1:]:
                sd["state"][idx][k] = v[lo:hi]
    optimizer.load_state_dict(sd)


