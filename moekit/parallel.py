"""Expert parallelism (EP) composed with data parallelism (DP) on torch.distributed.

Legend: T tokens of this rank, D dim, E experts (global), R = ep ranks in an expert-parallel group,
L = E / R experts held per rank, A rows (token-expert assignments, sorted by expert), N rows an
expert-parallel rank received, C capacity slots per (rank, expert), W = dp * ep processes.

Layout: a DeviceMesh ("dp", "ep") of shape (dp, ep); global rank = dp_rank * ep + ep_rank. EVERY rank
holds its own tokens (the data is split W ways: EP borrows ranks from DP, as torchtitan's "dp2ep" and
Megatron-Core's expert-data-parallel do). Rank ``ep_rank`` holds experts [ep_rank * L, (ep_rank + 1) * L),
replicated over the dp ranks; all other parameters are replicated over all W ranks.

The MoE pipeline is unchanged: route -> plan_dispatch -> experts -> combine. ``shard_model`` gives each
MoE layer an ``AllToAllDispatcher`` that stands between the plan and the experts:

    rows sorted by expert = sorted by destination rank (experts of a rank are contiguous)
    dropless  1. exchange the [R, L] row counts (all_to_all_single, equal splits)
              2. one host sync for the split sizes (as MegaBlocks, torchtitan and OLMo-core's dropless EP)
              3. all_to_all_single of the rows with variable splits (autograd: backward = same exchange,
                 splits swapped), regroup (source, expert) -> (expert, source), run the L local experts
              4. the results return the same way and ``combine`` puts them back in token order
    capacity  each rank packs its rows into a static [E, C, D] buffer (dropped rows go nowhere): fixed
              splits, no host-device sync. The capacities of the R senders (host ints, differing only when
              local batch sizes do) are exchanged once per layer over a CPU (gloo) group.

Capacity is per rank ("micro-batch" = the rank's tokens, GShard's groups): EP output on rank r equals
the single-process layer applied to rank r's tokens, in both modes.

Balance loss: with W > 1 the Switch loss uses the expert-assignment fractions f of the GLOBAL batch
(one all-reduce of E+1 counts per layer, no gradient needed) and each rank contributes its share of
the mean router probability P, so the mean of the per-rank losses is exactly the single-process loss
on the global batch (Qwen's "global-batch" LBL, Megatron-Core's ``global_aux_loss``). Routing statistics
and the aux-loss-free bias loads are summed over all W ranks by ``ParallelContext.reduce_stats``.

Gradients: every rank's loss is the mean over its own tokens and the global loss is the mean over
ranks, so grad = (1/W) sum_r grad_r. Non-expert parameters: all-reduce over the W ranks / W (or DDP).
Expert parameters already hold the sum over the ep group of the grads of the tokens they processed
(the all-to-all backward brings them home), so they are summed over the dp group only and divided by
W. ``clip_grad_norm_`` sums squared expert norms over the ep group, so every replica clips alike.

Checkpoints are layout-independent and in the single-process format (``moekit.checkpoint``):
``save_model`` gathers the stacked expert tensors on rank 0, ``load_model`` reads the full model and
slices it. ``full_optimizer_state`` / ``shard_optimizer_state`` do the same for AdamW moments.

Processes: ``launch(fn, nproc)`` starts nproc local processes with torchrun's environment (127.0.0.1, the
launcher hosts the rendezvous store) and fails fast, never hanging: a failed rank stops all, and a
deadline kills everything.
``setup_parallel`` reads that environment (or torchrun's), so the same code runs under ``torchrun``
with NCCL on GPUs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from moekit.dispatch import DispatchPlan
from moekit.experts import Experts
from moekit.losses import expert_counts, switch_aux_loss
from moekit.moe import MoE, MoEStats

DEFAULT_TIMEOUT = timedelta(minutes=10)


# ---------------------------------------------------------------------------------------------- context
@dataclass
class ParallelContext:
    """Process groups of an (dp, ep) layout and the collective steps a trainer needs.

    With ``world_size == 1`` every method is a no-op, so a trainer can call them unconditionally.
    """

    ep: int = 1
    dp: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh ("dp", "ep") for FSDP2/DTensor composition
    ep_group: Any = None  # the R ranks that exchange tokens (hold one copy of all experts)
    dp_group: Any = None  # the dp replicas of this rank's expert shard
    world_group: Any = None  # all W ranks; gradient and statistics reductions (never shared with the a2a)
    cpu_ep_group: Any = None  # gloo group over the ep ranks for host integers (capacities); = ep_group on gloo

    @property
    def world_size(self) -> int:
        return self.ep * self.dp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch: Tensor) -> Tensor:
        """This rank's share of a global batch (split over all W ranks along dim 0)."""
        return batch.tensor_split(self.world_size)[self.rank]

    # ------------------------------------------------------------------ gradients
    def wrap_ddp(self, model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
        """DDP over all W ranks for the replicated parameters; sharded expert parameters are left to
        ``reduce_grads`` (call it after backward; it then touches only those)."""
        if self.world_size == 1:
            return model
        experts, _ = _split_params(model)
        expert_ids = {id(p) for p in experts}
        names = [n for n, p in model.named_parameters() if id(p) in expert_ids]
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
        ddp_kwargs.setdefault("broadcast_buffers", False)  # buffers stay identical by construction
        if self.device.type == "cuda":
            ddp_kwargs.setdefault("device_ids", [self.device.index])
        return DDP(model, process_group=self.world_group, **ddp_kwargs)

    @torch.no_grad()
    def reduce_grads(self, model: nn.Module) -> None:
        """Average gradients as if one process had run the global batch (see the module docstring).

        A parameter without a gradient on this rank (e.g. experts that received no tokens) counts as
        zeros, so every rank joins every collective and replicas stay identical.
        """
        if self.world_size == 1:
            return
        module, ddp = _unwrap(model)
        experts, replicated = _split_params(module)
        if not ddp:
            _all_reduce_grads(replicated, self.world_group, 1.0 / self.world_size)
        _all_reduce_grads(experts, self.dp_group if self.dp > 1 else None, 1.0 / self.world_size)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` (2-norm) over the whole, unsharded model's gradients."""
        module, _ = _unwrap(model)
        experts, replicated = _split_params(module)
        sq = [_sq_norm(replicated, self.device), _sq_norm(experts, self.device)]
        if self.ep > 1:
            dist.all_reduce(sq[1], group=self.ep_group)  # expert shards are disjoint over the ep group
        total = (sq[0] + sq[1]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [p.grad for p in experts + replicated if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef)
        return total

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
        if self.world_size > 1:
            dist.barrier(group=self.world_group)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def all_reduce_mean(self, t: Tensor) -> Tensor:
        """Mean over all W ranks (for logging losses: each rank's loss is a mean over its tokens)."""
        t = t.detach().float()
        if self.world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.world_group)
        return t / self.world_size

    @torch.no_grad()
    def all_reduce_sum(self, tensors: list[Tensor]) -> list[Tensor]:
        """Sum over all W ranks, one collective (e.g. per-layer expert loads for ``update_router_biases``)."""
        if self.world_size == 1 or not tensors:
            return tensors
        flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.world_group)
        return [f.view_as(t).to(t.dtype) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    @torch.no_grad()
    def reduce_stats(self, stats: list[MoEStats | None]) -> list[MoEStats | None]:
        """Per-layer routing statistics of the GLOBAL batch (all W ranks), in one all-reduce.

        Counts are summed; imbalance, dropped fraction and dead experts are recomputed from the sums;
        entropy is token-weighted; ``lb_loss`` is averaged (each rank holds its share, see ``switch_aux_loss``).
        The values equal the single-process layer's on the global batch.
        """
        layers = [s for s in stats if s is not None]
        if self.world_size == 1 or not layers:
            return stats
        parts = []
        for s in layers:
            n = s.routed_per_expert.sum()
            parts += [s.tokens_per_expert.float(), s.routed_per_expert.float(),
                      (s.router_entropy * n).view(1), s.lb_loss.float().view(1)]
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.world_group)
        out, it = [], iter(flat.split([p.numel() for p in parts]))
        for s in stats:
            if s is None:
                out.append(None)
                continue
            kept_E, routed_E, ent, lb = next(it), next(it), next(it), next(it)
            n = routed_E.sum().clamp_min(1e-20)
            out.append(dataclasses.replace(
                s, tokens_per_expert=kept_E, routed_per_expert=routed_E,
                load_imbalance=routed_E.max() / routed_E.mean().clamp_min(1e-20),
                dropped_frac=1.0 - kept_E.sum() / n, router_entropy=ent[0] / n,
                dead_experts=(routed_E == 0).sum(), lb_loss=lb[0] / self.world_size))
        return out

    @torch.no_grad()
    def comm_metrics(self, model: nn.Module, steps: int = 1, reset: bool = True) -> dict[str, Any]:
        """Expert-parallel observability since the last call, per step, summed over MoE layers:

        ``ep/tokens_recv``   rows each ep rank's experts processed (list over ep ranks, mean over dp groups)
        ``ep/recv_imbalance`` max / mean of that list (1 = balanced across ranks)
        ``ep/a2a_bytes``     bytes the ep group moved between ranks (forward + backward, sum over its ranks)
        ``ep/a2a_seconds``   time in the dispatcher's collectives, mean over ranks (host clock: on CPU/gloo
                             it includes waiting for the slowest peer; on CUDA it is launch time plus the
                             dropless split sync)
        Evaluation forwards count too. A collective: every rank must call it.
        """
        module, _ = _unwrap(model)
        ds = [m.dispatcher for m in _moe_layers(module) if m.dispatcher is not None]
        if self.world_size == 1 or not ds:
            return {}
        kept = [d.meter.kept_E for d in ds if d.meter.kept_E is not None]
        if not kept:
            return {}
        kept_E = torch.stack(kept).sum(0)
        host = torch.tensor([sum(d.meter.bytes for d in ds), sum(d.meter.seconds for d in ds)],
                            dtype=torch.float64, device=kept_E.device)
        if reset:
            for d in ds:
                d.meter.reset()
        flat = torch.cat([kept_E.double(), host])
        dist.all_reduce(flat, group=self.world_group)  # sum over all W = dp groups x ep ranks
        recv_R = flat[:-2].view(self.ep, -1).sum(1) / (self.dp * steps)
        return {"ep/tokens_recv": recv_R.tolist(),
                "ep/recv_imbalance": float(recv_R.max() / recv_R.mean().clamp_min(1e-20)),
                "ep/a2a_bytes": float(flat[-2]) / (self.dp * steps),
                "ep/a2a_seconds": float(flat[-1]) / (self.world_size * steps)}


def setup_parallel(ep: int = 1, dp: int | None = None, *, backend: str | None = None,
                   timeout: timedelta = DEFAULT_TIMEOUT, device: str | torch.device | None = None) -> ParallelContext:
    """Initialise torch.distributed from the environment (torchrun or ``launch``) and build the mesh.

    ``dp`` defaults to world_size // ep. Without a distributed environment and ep = dp = 1 this returns
    a single-process context and initialises nothing. ``backend``: "gloo" on CPU, "nccl" on CUDA by default.
    ``timeout`` bounds every collective (a missing rank raises instead of hanging).
    """
    if ep < 1 or (dp is not None and dp < 1):
        raise ValueError(f"ep, dp: must be >= 1, got ep={ep}, dp={dp}")
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized() and env_world == 1 and ep == 1 and dp in (None, 1):
        return ParallelContext(device=torch.device(device or "cpu"))
    if device is None:
        device = "cuda" if backend != "gloo" and torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep or (dp is not None and ep * dp != world):
        raise ValueError(f"ep, dp: ep={ep} x dp={dp if dp is not None else 'world/ep'} must equal the number of "
                         f"processes ({world})")
    dp = world // ep
    # Every group gets the timeout explicitly: new_group's default is 30 min, not the default group's.
    ep_groups = [dist.new_group([d * ep + e for e in range(ep)], timeout=timeout) for d in range(dp)]
    dp_groups = [dist.new_group([d * ep + e for d in range(dp)], timeout=timeout) for e in range(ep)]
    world_group = dist.new_group(list(range(world)), timeout=timeout)
    if dist.get_backend() == "gloo":
        cpu_ep_group = ep_groups[rank // ep]
    else:
        cpu_ep = [dist.new_group([d * ep + e for e in range(ep)], timeout=timeout, backend="gloo") for d in range(dp)]
        cpu_ep_group = cpu_ep[rank // ep]
    mesh = DeviceMesh.from_group([dp_groups[rank % ep], ep_groups[rank // ep]], device.type,
                                 mesh=torch.arange(world).view(dp, ep), mesh_dim_names=("dp", "ep"))
    return ParallelContext(ep=ep, dp=dp, rank=rank, device=device, mesh=mesh, ep_group=ep_groups[rank // ep],
                           dp_group=dp_groups[rank % ep], world_group=world_group, cpu_ep_group=cpu_ep_group)


def teardown_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- sharding
def check_expert_parallel(n_experts: int, ep: int) -> int:
    """Experts per rank; a clear error when they do not divide evenly."""
    if n_experts % ep:
        raise ValueError(f"n_experts={n_experts} is not divisible by ep={ep}: each expert-parallel rank must hold "
                         f"the same number of experts (choose ep among the divisors of n_experts)")
    return n_experts // ep


@torch.no_grad()
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
    it (``moekit.checkpoint.save_checkpoint``); the shards are put back on exit. Do not train inside."""
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
    """Write the model with ``moekit.checkpoint.write_model`` exactly as one process would (rank 0
    writes the temporarily unsharded module); every rank must call it."""
    from moekit.checkpoint import write_model

    with unsharded(model, ctx) as module:
        if ctx.is_main:
            write_model(module, directory)
    if ctx.world_size > 1:
        dist.barrier(group=ctx.world_group)  # the files exist when any rank returns


def load_model(directory: str | Path, ctx: ParallelContext) -> nn.Module:
    """Read a single-process checkpoint (any layout wrote it) and shard it for ``ctx``."""
    from moekit.checkpoint import read_model

    return shard_model(read_model(directory, map_location=ctx.device), ctx)


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


# ---------------------------------------------------------------------------------------------- dispatcher
class CommMeter:
    """Host-side counters of one dispatcher since the last reset (no device sync to update them)."""

    def __init__(self) -> None:
        self.kept_E: Tensor | None = None  # rows each global expert processed, summed over forwards
        self.reset()

    def reset(self) -> None:
        self.bytes = 0  # bytes sent to OTHER ranks (the local chunk is a copy, not communication)
        self.seconds = 0.0
        self.calls = 0
        if self.kept_E is not None:
            self.kept_E = torch.zeros_like(self.kept_E)

    def record(self, rows_sent_to_others: int, row_bytes: int, seconds: float) -> None:
        self.bytes += rows_sent_to_others * row_bytes
        self.seconds += seconds
        self.calls += 1

    @contextmanager
    def timed(self):
        """Count the time of the small collectives (counts, capacities, balance-loss counts) too."""
        t0 = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - t0


@dataclass
class ExpertRows:
    """The part of a ``DispatchPlan`` the experts read, for rows received from other ranks."""

    rows_per_expert_E: Tensor  # int64 [L]
    expert_idx_A: Tensor  # local expert of each row (non-decreasing)
    slot_A: Tensor | None = None  # capacity mode: slot within the expert's rows
    capacity: int | None = None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd: the backward is the same exchange with the splits swapped
    (Megatron-Core's ``_AllToAll``)."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group, rank: int,
                meter: CommMeter) -> Tensor:
        ctx.args = (in_splits, out_splits, group, rank, meter)
        return _all_to_all(x, out_splits, in_splits, group, rank, meter)

    @staticmethod
    def backward(ctx, grad: Tensor):
        in_splits, out_splits, group, rank, meter = ctx.args
        return _all_to_all(grad, in_splits, out_splits, group, rank, meter), None, None, None, None, None


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group, rank: int, meter: CommMeter) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    meter.record(sum(in_splits) - in_splits[rank], math.prod(x.shape[1:]) * x.element_size(),
                 time.perf_counter() - t0)
    return out


class AllToAllDispatcher:
    """Runs the experts of a ``DispatchPlan`` on the ranks that hold them (see the module docstring).

    Attached to ``MoE.dispatcher`` by ``shard_model``; not a submodule (no state in the checkpoint).
    """

    def __init__(self, ctx: ParallelContext, n_experts: int):
        self.ctx = ctx
        self.R, self.L = ctx.ep, check_expert_parallel(n_experts, ctx.ep)
        self.meter = CommMeter()

    def __deepcopy__(self, memo):  # process groups cannot be copied; a copied model shares the layout
        return self

    def __call__(self, x_AD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        with torch.no_grad():
            kept_E = plan.kept_per_expert_E.detach().float()
            self.meter.kept_E = kept_E.clone() if self.meter.kept_E is None else self.meter.kept_E + kept_E
        if self.R == 1:
            return experts(x_AD, plan)
        if plan.capacity is None:
            return self._dropless(x_AD, plan, experts)
        return self._capacity(x_AD, plan, experts)

    def _dropless(self, x_AD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        R, L, ctx = self.R, self.L, self.ctx
        send_RL = plan.rows_per_expert_E.view(R, L)
        recv_RL = torch.empty_like(send_RL)
        with self.meter.timed():
            dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=ctx.ep_group)  # counts first
            host = torch.cat([send_RL.sum(1), recv_RL.reshape(-1)]).tolist()  # the one host sync
        in_splits, recv = host[:R], [host[R + s * L:R + (s + 1) * L] for s in range(R)]
        out_splits = [sum(row) for row in recv]
        x_ND = _AllToAll.apply(x_AD, out_splits, in_splits, ctx.ep_group, ctx.ep_rank, self.meter)
        if sum(out_splits) == 0:
            # nothing to compute here, but the return exchange (and its backward) must still run on this
            # rank, connected to the graph, or the other ranks would wait for it (Megatron-LM #1877)
            y_ND = x_ND.clone()
        else:
            y_ND = self._run_local(x_ND, recv, recv_RL.sum(0), experts)
        return _AllToAll.apply(y_ND, in_splits, out_splits, ctx.ep_group, ctx.ep_rank, self.meter)

    def _capacity(self, x_AD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        R, L, ctx = self.R, self.L, self.ctx
        E, C, D = R * L, plan.capacity, x_AD.shape[-1]
        caps = [torch.zeros(1, dtype=torch.int64) for _ in range(R)]
        with self.meter.timed():
            dist.all_gather(caps, torch.tensor([C]), group=ctx.cpu_ep_group)  # host ints: no device sync
        caps = [int(c) for c in caps]
        # static [E * C] send buffer; dropped rows (slot -1) land on a trash row past the end
        dest_A = torch.where(plan.slot_A >= 0, plan.expert_idx_A * C + plan.slot_A, E * C)
        buf_XD = x_AD.new_zeros(E * C + 1, D).index_copy(0, dest_A, x_AD)[: E * C]
        in_splits, out_splits = [L * C] * R, [L * c for c in caps]
        x_ND = _AllToAll.apply(buf_XD, out_splits, in_splits, ctx.ep_group, ctx.ep_rank, self.meter)
        cap = sum(caps)  # every local expert gets exactly this many rows (empty slots are zeros)
        rows_L = torch.full((L,), cap, dtype=torch.int64, device=x_AD.device)
        y_ND = self._run_local(x_ND, [[c] * L for c in caps], rows_L, experts, capacity=cap)
        y_XD = _AllToAll.apply(y_ND, in_splits, out_splits, ctx.ep_group, ctx.ep_rank, self.meter)
        return torch.cat([y_XD, y_XD.new_zeros(1, D)])[dest_A]

    def _run_local(self, x_ND: Tensor, recv: list[list[int]], rows_L: Tensor, experts: Experts,
                   capacity: int | None = None) -> Tensor:
        """Run the local experts on received rows. They arrive in blocks of (source rank, local expert)
        with ``recv[s][e]`` rows (host ints); the experts need (expert, source). Regrouping the blocks
        with host sizes needs no index tensors and no device sync."""
        R, L, N = self.R, self.L, x_ND.shape[0]
        if L > 1:
            blocks = x_ND.split([n for row in recv for n in row])
            x_ND = torch.cat([blocks[s * L + e] for e in range(L) for s in range(R)])
        expert_N = torch.arange(L, device=x_ND.device).repeat_interleave(rows_L, output_size=N)
        slot_N = None if capacity is None else torch.arange(N, device=x_ND.device) % capacity
        y_ND = experts(x_ND, ExpertRows(rows_L, expert_N, slot_N, capacity))
        if L > 1:  # back to (source, expert) blocks for the return exchange
            blocks = y_ND.split([recv[s][e] for e in range(L) for s in range(R)])
            y_ND = torch.cat([blocks[e * R + s] for s in range(R) for e in range(L)])
        return y_ND

    def switch_aux_loss(self, probs_TE: Tensor, topk_idx_TK: Tensor) -> Tensor:
        """The Switch balance loss E * sum_e f_e P_e of the GLOBAL batch, as this rank's share.

        f_E (assignment fractions, not differentiable) comes from one all-reduce of the counts over all
        W ranks; P_E is this rank's probability mass / global tokens * W, so the mean over ranks of the
        returned values is exactly the global loss, also for unequal or empty local batches. Without
        gradients (evaluation) it is the local loss: no collective (with ep = 1 a rank may evaluate alone).
        """
        T, K = topk_idx_TK.shape
        if not torch.is_grad_enabled() or self.ctx.world_size == 1:
            return switch_aux_loss(probs_TE, topk_idx_TK)
        E = probs_TE.shape[-1]
        counts = torch.cat([expert_counts(topk_idx_TK, E), probs_TE.new_full((1,), T, dtype=torch.float32)])
        with self.meter.timed():
            dist.all_reduce(counts, group=self.ctx.world_group)
        T_global = counts[E].clamp_min(1.0)
        f_E = counts[:E] / (T_global * K)
        P_E = probs_TE.float().sum(0) * (self.ctx.world_size / T_global)
        return E * (f_E * P_E).sum()


# ---------------------------------------------------------------------------------------------- launch
def _worker(rank: int, nproc: int, port: int, fn: Callable, args: tuple, outdir: str, threads: int | None) -> None:
    # torchrun's environment; the rendezvous store is the launcher's (torchrun's "agent store"), so no
    # process has to bind a port that another program could have taken since it was chosen
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    if threads:
        torch.set_num_threads(threads)
    try:
        result = fn(*args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # no teardown: it could block on a peer that is stuck or gone
    teardown_parallel()


def launch(fn: Callable, nproc: int, args: Iterable = (), *, timeout: float | None = None,
           threads: int | None = None) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` fresh local processes, like torchrun; return each rank's result.

    ``fn`` (a module-level function) typically calls ``setup_parallel``; it returns plain containers of
    tensors, numbers and strings (loaded back with ``weights_only=True``). The environment is torchrun's
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT of a store this process hosts). ``threads``: torch
    threads per process (default: the machine's cores / nproc). If a rank fails, the others are killed
    and its traceback is raised as RuntimeError; past ``timeout`` seconds all are killed (TimeoutError).
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise ValueError(f"nproc: must be >= 1, got {nproc}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="moekit-launch-") as outdir:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: the OS picks
        port = store.port
        procs = [spawn.Process(target=_worker, args=(r, nproc, port, fn, tuple(args), outdir, threads), daemon=True)
                 for r in range(nproc)]
        for p in procs:
            p.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        failed: int | None = None
        try:
            while any(p.is_alive() for p in procs):
                failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
                if failed is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"launch: {nproc} processes did not finish within {timeout} s; killed them")
                time.sleep(0.05)
            failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), failed)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
        if failed is not None:
            errs = sorted(Path(outdir).glob("rank*.err"))
            detail = "\n".join(f"--- {e.stem}\n{e.read_text()}" for e in errs) or f"exit code {procs[failed].exitcode}"
            raise RuntimeError(f"launch: rank {failed} of {nproc} failed\n{detail}")
        # results are plain containers of tensors and numbers (and MoEStats): no arbitrary unpickling
        with torch.serialization.safe_globals([MoEStats]):
            return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


# ---------------------------------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    return (model.module, True) if isinstance(model, DDP) else (model, False)


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _sharded_experts(module: nn.Module) -> list[tuple[str, Experts]]:
    """(state-dict prefix, Experts) of the MoE layers whose experts are split over ep ranks."""
    return [(f"{name}." if name else "", m) for name, m in module.named_modules()
            if isinstance(m, Experts) and m.expert_offset is not None]


def _split_params(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(sharded expert parameters, replicated parameters), trainable only, each parameter once."""
    expert_ids = {id(p) for _, e in _sharded_experts(module) for p in e.parameters()}
    experts, replicated = [], []
    for p in module.parameters():
        if p.requires_grad:
            (experts if id(p) in expert_ids else replicated).append(p)
    return experts, replicated


def _sharded_param_indices(model: nn.Module, optimizer: torch.optim.Optimizer
                           ) -> list[tuple[int, nn.Parameter, Experts]]:
    """(index in optimizer.state_dict(), parameter, its Experts) of the sharded expert parameters."""
    module, _ = _unwrap(model)
    owner = {id(p): e for _, e in _sharded_experts(module) for p in e.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    return [(idx, p, owner[id(p)]) for idx, p in enumerate(params) if id(p) in owner]


def _all_reduce_grads(params: list[nn.Parameter], group, scale: float) -> None:
    """Sum grads over ``group`` (None: no communication) and scale, one flat buffer per dtype."""
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for p, g in zip(ps, flat.split([p.numel() for p in ps])):
            p.grad.copy_(g.view_as(p.grad))


def _broadcast(tensors: list[Tensor], group) -> None:
    """Broadcast from global rank 0, one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.broadcast(flat, src=0, group=group)
        for t, f in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(f.view_as(t))


def _sq_norm(params: list[nn.Parameter], device: torch.device) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().to(device)


__all__ = [
    "AllToAllDispatcher", "CommMeter", "ParallelContext", "check_expert_parallel", "full_optimizer_state",
    "full_state_dict", "launch", "load_full_state_dict", "load_model", "save_model", "setup_parallel",
    "shard_model", "shard_optimizer_state", "teardown_parallel", "unsharded",
]
