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

With ``link_prefetch`` a layer also guesses the next layer's experts with that layer's router and has them read on a
background thread while it computes (``moekit.offload.prefetch``); the guess changes what is in the pool, never
what is computed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch
from torch import Tensor, nn

from moekit.layer.dispatch import DispatchPlan
from moekit.layer.experts import Experts
from moekit.layer.ffn import compute_dtype, needs_grad
from moekit.layer.kernels.decode import DECODE_KERNEL, decode_eager, decode_rows_limit
from moekit.layer.kernels.sorted_rows import ActSpec, Segments, experts_ffn
from moekit.offload.prefetch import GuessScore, Prefetcher, PrefetchJob, guessed_experts
from moekit.offload.store import ExpertStore

PARTS = ("w_in", "w_out", "b_in", "b_out")  # the stacked tensors of one layer's experts, as Experts names them


class ExpertPool:
    """S slots of one layer's experts, filled from the store, least recently used evicted first.

    ``fetch(experts)`` returns each expert's slot, loading what is missing; the experts of one call are never
    evicted by each other (at most S per call). ``prefetch(experts)`` loads guesses ahead of the call that may
    need them (``moekit.offload.prefetch``). ``keep=False`` is naive on-demand loading, the baseline: nothing
    stays between calls, every call reads all of its experts.

    Counters: ``hits`` (of which ``prefetch_hits``: the first use of a prefetched expert; the rest are reuse:
    experts kept hot from earlier tokens), ``misses`` (loads on the critical path), ``prefetched`` (loads
    ahead of time), and the eviction log ``evicted`` (the last few, for the tests and the benchmark)."""

    def __init__(self, store: ExpertStore, prefix: str, n_experts: int, n_slots: int,
                 tensors: dict[str, Tensor], keep: bool = True):
        self.store, self.prefix, self.n_experts, self.n_slots = store, prefix, n_experts, n_slots
        self.tensors = tensors  # part name -> [S, ...] slot stack (the module's buffers)
        self.keep = keep
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(n_slots))
        self.fresh: set[int] = set()  # prefetched, not used since
        self.last: set[int] = set()   # the experts of the latest call (a prefetch may be told to keep them)
        self.hits = self.misses = self.prefetched = self.prefetch_hits = 0
        self.reuse_right = self.reuse_total = 0  # needed experts that the latest call had needed too, of all
        self.evicted: list[int] = []
        self._lock = threading.Lock()  # (the prefetch thread and the forward; see prefetch.py for why rarely held)

    def slot_of(self, expert: int) -> int | None:
        return self.lru.get(expert)

    def fetch(self, experts: list[int]) -> list[int]:
        if len(experts) > self.n_slots:
            raise ValueError(f"fetch: {len(experts)} experts at once, the pool has {self.n_slots} slots")
        with self._lock:
            if not self.keep:  # (naive loading: what the last call read is gone)
                self.free.extend(self.lru.values())
                self.lru.clear()
            wanted = set(experts)
            slots = []
            for e in experts:
                s = self.lru.get(e)
                if s is not None:
                    self.lru.move_to_end(e)
                    self.hits += 1
                    if e in self.fresh:
                        self.prefetch_hits += 1
                        self.fresh.discard(e)
                else:
                    s = self._load_evicting(e, wanted)
                    self.misses += 1
                slots.append(s)
            self.reuse_right += len(wanted & self.last)
            self.reuse_total += len(wanted)
            self.last = wanted
            return slots

    @property
    def reuse_rate(self) -> float:
        """How often an expert a call needs was needed by the call before: the hit rate of "keep the last
        token's experts", the guess that the router's guess must beat to be allowed to evict them."""
        return self.reuse_right / self.reuse_total if self.reuse_total else 1.0

    def prefetch(self, job: PrefetchJob) -> None:
        """Load the first S of ``job.experts`` that are not in the pool (most wanted first) into free slots or
        over the least recently used; with ``job.keep_last`` never over the experts of the latest call (where
        only those remain, the rest of the guess is dropped). Stops before the next read once the job is
        cancelled (the layer arrived: it reads what it needs itself). The loaded ones count as most recently
        used."""
        with self._lock:
            wanted = set(job.experts[:self.n_slots])
            keep = wanted | self.last if job.keep_last else wanted
            for e in job.experts[:self.n_slots]:
                if job.cancelled:
                    break
                if e in self.lru:
                    self.lru.move_to_end(e)
                    continue
                if not self.free and all(v in keep for v in self.lru):
                    break
                self._load_evicting(e, keep)
                self.prefetched += 1
                self.fresh.add(e)

    def would_load(self, experts: list[int], keep_last: bool) -> bool:
        """Whether ``prefetch`` would read anything: a guess not in the pool, and room for it."""
        wanted = set(experts[:self.n_slots])
        keep = wanted | self.last if keep_last else wanted
        return any(e not in self.lru for e in wanted) and (bool(self.free) or any(v not in keep for v in self.lru))

    def _load_evicting(self, expert: int, keep: set[int]) -> int:
        if self.free:
            s = self.free.pop(0)
        else:
            victim = next(v for v in self.lru if v not in keep)
            s = self.lru.pop(victim)
            self.fresh.discard(victim)
            self.evicted.append(victim)
            del self.evicted[:-64]
        try:
            for part, stack in self.tensors.items():
                self.store.read(f"{self.prefix}.{part}", expert, stack[s])
        except BaseException:  # (a failed read: the slot holds nothing usable, and is free again)
            self.free.append(s)
            raise
        self.lru[expert] = s
        return s


class OffloadedExperts(nn.Module):
    """Routed experts in a pool of ``n_slots`` slots, read from ``store`` (see the module docstring)."""

    backend = "offload"  # not "auto": MoE never routes training calls through the compiled layer
    decode_step_ready = True  # moekit.model.decode's fast step may call the MoE layer holding these
    routed_decode = False  # the one-kernel router + experts reads a full [E, ...] stack: route, then decode

    def __init__(self, like: Experts, store: ExpertStore, prefix: str, n_slots: int, dtype: torch.dtype,
                 keep: bool = True):
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
        self.pool = ExpertPool(store, prefix, self.n_experts, n_slots, self._stacks(), keep)
        # speculative loading (``link_prefetch``): the next layer's router and experts, the reader thread, the
        # read submitted for this layer and the experts it guessed, and how good the guesses were
        self.next: tuple[nn.Module, OffloadedExperts] | None = None
        self.prefetcher: Prefetcher | None = None
        self.pending: tuple[PrefetchJob, Future] | None = None
        self.guess: list[int] | None = None
        self.score = GuessScore()

    def link_prefetch(self, prefetcher: Prefetcher, next_router: nn.Module, next_experts: OffloadedExperts) -> None:
        """Guess the next MoE layer's experts with its router on this layer's input, and read them on
        ``prefetcher``'s thread while this layer computes (``moekit.offload.prefetch``)."""
        self.prefetcher, self.next = prefetcher, (next_router, next_experts)

    def _arrive(self, needed: list[int]) -> None:
        """Wait for the read the previous layer submitted for this one (its failure is not this call's: the
        fetch reads again what is needed), and score its guess against the experts the router chose."""
        if self.pending is not None:
            job, done = self.pending
            job.cancelled = True  # (reads not yet started are dropped; the one in flight finishes)
            done.exception()
            self.pending = None
        if self.guess is not None:
            self.score.guessed += len(self.guess)
            self.score.needed += len(needed)
            self.score.right += len(set(self.guess).intersection(needed))
            self.guess = None

    def _prefetch_next(self, x_TD: Tensor) -> None:
        """Submit the next layer's guessed experts (the most often chosen first, at most its slot count)."""
        if self.next is None:
            return
        router, nxt = self.next
        if len(nxt.pool.lru) == nxt.n_experts:  # (the next pool holds every expert: nothing to guess)
            return
        guess = guessed_experts(router, x_TD, nxt.n_slots)
        nxt.guess = guess
        # The guess may evict the last token's experts only where it has measured the better predictor of the two
        # for that layer (its precision against the pool's reuse rate, after a few calls).
        score = nxt.score
        keep_last = score.guessed < 16 or score.precision <= nxt.pool.reuse_rate
        # (no thread hand-off when the guess is in the pool already: waking the reader costs ~1 ms on a busy host;
        # the next pool is idle here, its own read having been waited for at its last call)
        if nxt.pool.would_load(guess, keep_last):
            job = PrefetchJob(guess, keep_last)
            nxt.pending = job, self.prefetcher.submit(nxt.pool.prefetch, job)

    def _stacks(self) -> dict[str, Tensor]:
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def _apply(self, fn, recurse=True):  # .to(dtype) re-makes the slot buffers: the pool must hold the new ones
        out = super()._apply(fn, recurse)
        self.pool.tensors = self._stacks()
        return out

    def cast_input(self, x: Tensor) -> Tensor:
        return x.to(compute_dtype(x))

    def _waves(self, experts: list[int]) -> list[list[int]]:
        """The experts of one call (ascending) in groups of at most S. The groups do not depend on what the pool
        holds: a wave's experts share kernel calls (the tail GEMMs of ``experts_ffn``), so another grouping could
        round differently in 16 bits, and what the pool holds (the prefetch, the cache policy) must not change a
        result."""
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
        needed = [e for e, n in enumerate(rows_E) if n]
        self._arrive(needed)
        for i, wave in enumerate(self._waves(needed)):
            slots = self.pool.fetch(wave)
            if i == 0:  # (this layer's first experts are in: the next layer's guesses read while they compute)
                self._prefetch_next(x_AD)
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
        needed = torch.unique(topk_idx_TK).tolist()  # (the host read: which experts to load)
        self._arrive(needed)
        waves = self._waves(needed)
        out_TD = None
        for i, wave in enumerate(waves):
            slots = self.pool.fetch(wave)
            if i == 0:
                self._prefetch_next(x_TD)
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
