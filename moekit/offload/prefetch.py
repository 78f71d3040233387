"""Speculative expert loading: the next MoE layer's router applied to this layer's input guesses which experts
the next layer will want, and a background thread reads them into its pool while this layer computes.

Two guesses compete for a layer's slots: the last token's experts (consecutive tokens share experts: the LRU pool
keeps them) and the router's guess. Per layer, the router's guess may evict the last token's experts only once it
has measured the better of the two (its precision against the pool's reuse rate); on the benchmark's trained model
it is, for all layers but the first (benchmarks/RESULTS.md, "Expert offloading").

The router's guess is good because the residual stream changes little from one layer to the next: the next layer's
router sees nearly the input it will see. Mixtral-offloading (Eliseev & Mazur, 2023, "Fast Inference of
Mixture-of-Experts Language Models with Offloading", section 3.2) applies the next layer's gate to the current
layer's hidden states the same way. A wrong guess costs a read and an eviction, never a result: the layer still
fetches exactly the experts its router chose (``ExpertPool.fetch``) and computes from the slots' bytes.

One thread serves every layer of a model: reads are ``os.preadv`` calls that release the GIL, so they run while
the main thread's kernels compute. A layer waits for the read submitted for it before touching its pool, so a
pool is never used by both threads at once.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GuessScore:
    """How well the previous layer's guesses named the experts a layer then needed (summed over calls)."""

    guessed: int = 0   # experts guessed (submitted for reading)
    needed: int = 0    # experts the layer's router chose
    right: int = 0     # needed experts that had been guessed

    @property
    def recall(self) -> float:
        """Fraction of the needed experts that were guessed: the share of loads taken off the critical path."""
        return self.right / self.needed if self.needed else 0.0

    @property
    def precision(self) -> float:
        """Fraction of the guessed experts that were needed (the rest were read for nothing)."""
        return self.right / self.guessed if self.guessed else 0.0


def guessed_experts(router: nn.Module, x_TD: Tensor, n: int) -> list[int]:
    """The at most ``n`` experts ``router`` would choose most often for the rows ``x_TD``: its selection (scores
    plus the balancing bias, top-k) in four ops, without the combine weights and, for group-limited routers,
    without the group limit (a guess: ~40 us for one token where the full router takes ~190)."""
    w_ED = router.weight
    logits_TE = F.linear(x_TD.to(w_ED.dtype), w_ED, router.bias)
    scores_TE = logits_TE.softmax(-1) if router.config.score_func == "softmax" else logits_TE.sigmoid()
    if router.expert_bias is not None:
        scores_TE = scores_TE + router.expert_bias
    chosen = scores_TE.topk(router.config.top_k, dim=-1).indices.reshape(-1).tolist()  # (the host read)
    return [e for e, _ in Counter(chosen).most_common(n)]  # (a few ints: cheaper than tensor ops)


@dataclass
class PrefetchJob:
    """The experts guessed for one layer's next call, most wanted first; ``keep_last``: the guess may not evict
    the experts of the layer's latest call; ``cancelled``: set when the layer arrives (reads not yet started are
    dropped: the layer reads what it needs itself)."""

    experts: list[int]
    keep_last: bool = True
    cancelled: bool = False


class Prefetcher:
    """One background reader for a model's pools: ``submit(pool.prefetch, job)`` runs the job's reads in order
    and returns a future that resolves when done; a failed read is kept on the future (the layer's own fetch
    then reads the expert again and raises the error where it matters, or never needs it)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
        self._lock = threading.Lock()

    def submit(self, read: Callable[[PrefetchJob], None], job: PrefetchJob) -> Future:
        with self._lock:
            return self._executor.submit(read, job)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
