"""Reused CPU scratch buffers for the temporaries of one experts call (``SCRATCH``, ``release_scratch``).

Imports: torch only.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor


class _ScratchPool(threading.local):
    """Reused CPU buffers for temporaries that never leave one call: the backward's dA [A, F] and
    dh [A, I], and an inference forward's h [A, I] and a [A, F]. glibc's default allocator serves blocks
    this large (> 32 MiB at T=16384) with a fresh mmap and page-faults them on every call (see
    benchmarks/RESULTS.md, "allocator"). Nothing handed to autograd or returned to the caller lives here,
    and every element a call reads it has written first (tests/test_perf_paths.py poisons the buffers
    between calls). Thread-local: two threads never share a buffer."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        if device.type != "cpu":  # the CUDA caching allocator already reuses blocks
            return torch.empty(shape, dtype=dtype, device=device)
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            self.buffers.pop(name, None)  # free the old block first: peak memory stays one buffer
            # a normal tensor even when first asked for under torch.inference_mode (an inference tensor could
            # never again be written outside inference mode)
            with torch.inference_mode(False):
                buf = self.buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


SCRATCH = _ScratchPool()


def release_scratch() -> None:
    """Free this thread's reused expert buffers (each is kept at the size of the largest call so far)."""
    SCRATCH.buffers.clear()

