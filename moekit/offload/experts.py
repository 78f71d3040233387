"""A MoE layer's routed experts kept on disk, ``S`` of them at a time in a fixed pool of slots (LRU).

Legend: A rows (sorted token-expert assignments), T tokens, K top-k, D dim, E experts, S pool slots, I input
projection width, F ffn width.

``OffloadedExperts`` stands in for :class:`~moekit.layer.experts.Experts` inside a ``MoE`` layer: the router, the
dispatch and the combine are the layer's own; only the expert weights come from elsewhere. A call first asks the
pool for the experts its tokens were routed to (the one host read of the routing: which experts to load cannot be
known without it), loading the missing ones from the :class:`~moekit.offload.store.ExpertStore` into the least
recently used slots, then runs the experts through the same kernels as the resident layer with expert ids mapped
to slots:

    prefill  (``forward``, rows sorted by expert) the rows re-sorted by slot, the loop kernel (``experts_ffn``) on
             the slots; each expert's GEMMs see the same rows as in the resident layer
    decode   (``decode``, a few tokens) the decode kernel on the slots, ids remapped

When a call needs more experts than the pool has slots (one slot per layer and top-2, or a batch whose union is
wide), it runs in waves of at most S experts, each wave's experts loaded over the last's; decode then sums the
waves' partial outputs (equal to the resident layer up to rounding: the sum is taken in another order).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from moekit.layer.dispatch import DispatchPlan
from moekit.layer.experts import Experts
from moekit.layer.ffn import compute_dtype, needs_grad
from moekit.layer.kernels.decode import DECODE_KERNEL, decode_eager, decode_rows_limit
from moekit.layer.kernels.sorted_rows import ActSpec, Segments, experts_ffn
from moekit.offload.store import ExpertStore

PARTS = ("w_in", "w_out", "b_in", "b_out")  # the stacked tensors of one layer's experts, as Experts names them


class ExpertPool:
    """S slots of one layer's experts, filled from the store, least recently used evicted first.

    ``fetch(experts)`` returns each expert's slot, loading what is missing; the experts of one call are never
    evicted by each other (at most S per call). Counters: ``hits``, ``misses`` (expert loads), and the eviction
    log ``evicted`` (the last few, for the tests and the benchmark)."""

    def __init__(self, store: ExpertStore, prefix: str, n_experts: int, n_slots: int,
                 tensors: dict[str, Tensor]):
        self.store, self.prefix, self.n_experts, self.n_slots = store, prefix, n_experts, n_slots
        self.tensors = tensors  # part name -> [S, ...] slot stack (the module's buffers)
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(n_slots))
        self.hits = self.misses = 0
        self.evicted: list[int] = []

    def slot_of(self, expert: int) -> int | None:
        return self.lru.get(expert)

    def fetch(self, experts: list[int]) -> list[int]:
        if len(experts) > self.n_slots:
            raise ValueError(f"fetch: {len(experts)} experts at once, the pool has {self.n_slots} slots")
        wanted = set(experts)
        slots = []
        for e in experts:
            s = self.lru.get(e)
            if s is not None:
                self.lru.move_to_end(e)
                self.hits += 1
            else:
                if self.free:
                    s = self.free.pop(0)
                else:
                    victim = next(v for v in self.lru if v not in wanted)
                    s = self.lru.pop(victim)
                    self.evicted.append(victim)
                    del self.evicted[:-64]
                try:
                    self._load(e, s)
                except BaseException:  # (a failed read: the slot holds nothing usable, and is free again)
                    self.free.append(s)
                    raise
                self.lru[e] = s
                self.misses += 1
            slots.append(s)
        return slots

    def _load(self, expert: int, slot: int) -> None:
        for part, stack in self.tensors.items():
            self.store.read(f"{self.prefix}.{part}", expert, stack[slot])


class OffloadedExperts(nn.Module):
    """Routed experts in a pool of ``n_slots`` slots, read from ``store`` (see the module docstring)."""

    backend = "offload"  # not "auto": MoE never routes training calls through the compiled layer
    decode_step_ready = True  # moekit.model.decode's fast step may call the MoE layer holding these
    routed_decode = False  # the one-kernel router + experts reads a full [E, ...] stack: route, then decode

    def __init__(self, like: Experts, store: ExpertStore, prefix: str, n_slots: int, dtype: torch.dtype):
        super().__init__()
        if n_slots < 1:
            raise ValueError(f"n_slots: a pool needs at least one slot, got {n_slots}")
        self.n_experts, self.dim, self.ffn_dim = like.n_experts, like.dim, like.ffn_dim
        self.activation, self.limit, self.alpha = like.activation, like.limit, like.alpha
        self.n_slots = n_slots = min(n_slots, like.n_experts)
        for part in PARTS:
            p = getattr(like, part)
            if p is not None:  # (a meta or real parameter: only its shape is read)
                self.register_buffer(part, torch.zeros(n_slots, *p.shape[1:], dtype=dtype), persistent=False)
            else:
                setattr(self, part, None)
        self.pool = ExpertPool(store, prefix, self.n_experts, n_slots, self._stacks())

    def _stacks(self) -> dict[str, Tensor]:
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def _apply(self, fn, recurse=True):  # .to(dtype) re-makes the slot buffers: the pool must hold the new ones
        out = super()._apply(fn, recurse)
        self.pool.tensors = self._stacks()
        return out

    def cast_input(self, x: Tensor) -> Tensor:
        return x.to(compute_dtype(x))

    def _waves(self, experts: list[int]) -> list[list[int]]:
        """The experts of one call in groups of at most S, the resident ones first (they need no load)."""
        experts = sorted(experts, key=lambda e: self.pool.slot_of(e) is None)
        return [experts[i:i + self.n_slots] for i in range(0, len(experts), self.n_slots)]

    _biases = Experts._biases  # (the same b_in / b_out attributes: slot stacks here)

    def forward(self, x_AD: Tensor, plan: DispatchPlan) -> Tensor:
        """Each expert on its rows (sorted by expert), its weights from the pool."""
        dtype = compute_dtype(x_AD)
        x_AD = x_AD.to(dtype).contiguous()
        rows_E = plan.rows_per_expert_E.tolist()  # (the host read: which experts to load)
        starts = [0]
        for n in rows_E:
            starts.append(starts[-1] + n)
        y_AD = x_AD.new_empty(x_AD.shape[0], self.dim)
        act = ActSpec(self.activation, self.limit, self.alpha, self.ffn_dim)
        b_in, b_out = self._biases(dtype)
        for wave in self._waves([e for e, n in enumerate(rows_E) if n]):
            slots = self.pool.fetch(wave)
            rows_S = [0] * self.n_slots
            idx = []
            for e, s in sorted(zip(wave, slots), key=lambda es: es[1]):  # rows in slot order
                rows_S[s] = rows_E[e]
                idx.append(torch.arange(starts[e], starts[e + 1]))
            idx_R = torch.cat(idx).to(x_AD.device)
            rows_S_t = torch.tensor(rows_S, device=x_AD.device)
            slot_R = torch.repeat_interleave(torch.arange(self.n_slots, device=x_AD.device), rows_S_t)
            seg = Segments(rows_S_t, slot_R, grouped=False)
            y_RD = experts_ffn(x_AD[idx_R], self.w_in.to(dtype), self.w_out.to(dtype), b_in, b_out, seg, act)
            y_AD[idx_R] = y_RD
        return y_AD

    def decode_eligible(self, x_TD: Tensor, top_k: int) -> bool:
        """A few tokens, no autograd, on the CPU: ``decode``."""
        return (x_TD.device.type == "cpu" and not needs_grad(x_TD, self)
                and x_TD.shape[0] * top_k <= decode_rows_limit(self.w_in, self.w_out))

    def decode(self, x_TD: Tensor, topk_idx_TK: Tensor, topk_weight_TK: Tensor) -> Tensor:
        """out_TD = sum_k w_tk expert_{e_tk}(x_t), the experts from the pool (ids mapped to slots)."""
        dtype = compute_dtype(x_TD)
        x_TD = x_TD.detach().to(dtype)
        waves = self._waves(torch.unique(topk_idx_TK).tolist())  # (the host read: which experts to load)
        out_TD = None
        for wave in waves:
            slots = self.pool.fetch(wave)
            slot_of_E = torch.full((self.n_experts,), -1, dtype=topk_idx_TK.dtype)
            slot_of_E[wave] = torch.tensor(slots, dtype=topk_idx_TK.dtype)
            slot_TK = slot_of_E[topk_idx_TK]
            weight_TK = topk_weight_TK
            if len(waves) > 1:  # this wave's experts only: the others weigh nothing (and read slot 0)
                weight_TK = torch.where(slot_TK >= 0, topk_weight_TK, torch.zeros_like(topk_weight_TK))
                slot_TK = slot_TK.clamp_min(0)
            part_TD = self._decode_slots(x_TD, slot_TK, weight_TK)
            out_TD = part_TD if out_TD is None else out_TD + part_TD
        return out_TD

    def _decode_slots(self, x_TD: Tensor, slot_TK: Tensor, weight_TK: Tensor) -> Tensor:
        weights = (self.w_in, self.w_out, self.b_in, self.b_out)
        out_TD = DECODE_KERNEL((x_TD, slot_TK, weight_TK, *weights), (self.activation, self.limit, self.alpha))
        if out_TD is not None:
            return out_TD
        dtype = x_TD.dtype
        b_in, b_out = self._biases(dtype)
        return decode_eager(x_TD, slot_TK, weight_TK, self.w_in.to(dtype), self.w_out.to(dtype), b_in, b_out,
                            ActSpec(self.activation, self.limit, self.alpha, self.ffn_dim))

    def decode_weights(self):
        raise TypeError("offloaded experts have no full weight stack: the routed decode kernel cannot run them")

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, slots={self.n_slots}, dim={self.dim}, ffn_dim={self.ffn_dim}"
