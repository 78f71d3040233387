"""The parallel context: the (dp, ep) process groups, gradient and statistics reductions, set-up.

See the package docstring (``moekit/parallel/__init__.py``) for the design.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from moekit.layer.experts import Experts
from moekit.layer.moe import MoE, MoEStats

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



def check_expert_parallel(n_experts: int, ep: int) -> int:
    """Experts per rank; a clear error when they do not divide evenly."""
    if n_experts % ep:
        raise ValueError(f"n_experts={n_experts} is not divisible by ep={ep}: each expert-parallel rank must hold "
                         f"the same number of experts (choose ep among the divisors of n_experts)")
    return n_experts // ep


@torch.no_grad()


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


