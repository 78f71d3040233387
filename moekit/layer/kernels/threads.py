"""The expert worker threads: the experts of one CPU call side by side, one intra-op thread each.

Imports: torch only.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


class ExpertThreads:
    """Runs the per-expert tasks of one call on W = ``torch.get_num_threads()`` worker threads that each
    use ONE intra-op thread, so W experts run side by side instead of every GEMM being split over the
    cores. Each GEMM then needs no barrier: on a 2-core machine shared with other processes, a split
    GEMM waits a whole scheduler time slice whenever one of its two threads is descheduled, and the
    per-expert GEMMs are small (benchmarks/RESULTS.md, "expert threads"). Calls below ``min_flops``, or
    with one thread or one active expert, run inline. The caller's grad and inference modes are
    carried into the workers (both are thread-local in PyTorch)."""

    # below ~10 GFLOP per call (e.g. T=4096 tokens at d=192, F=256: 2.4 GFLOP) the per-expert GEMMs are so small
    # that the workers' Python and hand-over cost more than a split GEMM loses (measured at d=192: 1.4x slower)
    min_flops = 1e10

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._width = 0
        self._lock = threading.Lock()


    def map(self, task, items: list[tuple], flops: float) -> None:
        """task(*item) for every item; returns when all are done."""
        self.start(task, items, flops)()

    def start(self, task, items: list[tuple], flops: float):
        """Start task(*item) for every item and return ``wait()``, which blocks until all are done and
        re-raises a worker's exception. Inline (done before returning) when threads would not pay."""
        width = torch.get_num_threads()
        if width < 2 or len(items) < 2 or flops < self.min_flops:
            for item in items:
                task(*item)
            return _done
        pool = self._workers(width)
        inference = torch.is_inference_mode_enabled()
        grad = torch.is_grad_enabled()
        futures = [pool.submit(_run_in_worker, task, item, grad, inference) for item in items]

        def wait() -> None:
            for f in futures:
                f.result()
        return wait

    def _workers(self, width: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._width != width:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                started = threading.Barrier(width + 1)
                pool = ThreadPoolExecutor(width, thread_name_prefix="moekit-experts",
                                          initializer=torch.set_num_threads, initargs=(1,))
                futures = [pool.submit(started.wait) for _ in range(width)]  # start every worker now
                started.wait()
                for f in futures:
                    f.result()
                # torch.set_num_threads(1) in the workers also set the default that threads started later
                # inherit; restore it (the caller's own thread count never changed)
                torch.set_num_threads(width)
                self._pool, self._width = pool, width
            return self._pool

    def reset_after_fork(self) -> None:
        self._pool, self._width, self._lock = None, 0, threading.Lock()  # a forked child has no workers


def _run_in_worker(task, item: tuple, grad: bool, inference: bool) -> None:
    with torch.inference_mode(inference), torch.set_grad_enabled(grad and not inference):
        task(*item)


def _done() -> None:
    pass


EXPERT_THREADS = ExpertThreads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=EXPERT_THREADS.reset_after_fork)

