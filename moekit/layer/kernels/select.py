"""Backend selection for the experts (``select_backend``): which kernel runs a call, by device, dtype, size and host.

Imports: ``moekit.host`` and ``moekit.layer.kernels.grouped`` / ``threads``.
"""

from __future__ import annotations

import logging

import torch

from moekit.host import probe_host
from moekit.layer.kernels.grouped import grouped_mm_aligned, grouped_mm_available
from moekit.layer.kernels.sorted_rows import JIT_DTYPES
from moekit.layer.kernels.threads import ExpertThreads

log = logging.getLogger("moekit")

_LOGGED: set[tuple[str, str, torch.dtype, str]] = set()


def _cpu_bf16_without_amx() -> bool:
    """Native bf16 through oneDNN's AVX-512-BF16 kernels, without AMX tiles (``moekit.host``): the host kind on
    which grouped_mm measured faster than the threaded loop for large bf16 calls."""
    return probe_host().kind == "AVX-512-BF16"


def select_backend(requested: str, device: torch.device, dtype: torch.dtype, widths: tuple[int, ...] = (),
                   rows: int | None = None) -> str:
    """``widths``: the feature widths the experts multiply (dim, expert ffn width), for grouped_mm's alignment;
    ``rows``: the sorted rows of the call (None: unknown).

    auto: on the CPU, the loop backend for any call of real size (bf16 GEMM shapes the oneDNN cache keeps,
    see ROW_BLOCK; the expert threads for large calls, see ExpertThreads): benchmarks/RESULTS.md measures
    it fastest there. Otherwise grouped where grouped_mm works (CUDA: one grouped GEMM per stage, no host
    sync), else loop. Where this returns loop for a large CPU training call, the MoE layer around it runs
    through torch.compile (``compiled_layer.py``) and the loop as the compiled backend's opaque op.
    """
    aligned = grouped_mm_aligned(dtype, widths)
    if requested == "auto":
        # (SwiGLU FLOPs of the call; below, e.g. the tests' toy layers, grouped_mm's single call is cheaper)
        flops = 6.0 * rows * widths[0] * widths[1] if rows is not None and len(widths) >= 2 else 0.0
        if device.type == "cpu" and flops >= 2e5:
            chosen = "loop"
            if (dtype in JIT_DTYPES and flops >= ExpertThreads.min_flops and _cpu_bf16_without_amx() and aligned
                    and grouped_mm_available(device, dtype)):
                # bf16 without AMX (oneDNN's AVX-512 kernels), calls big enough for the expert threads: one
                # grouped_mm per stage beat the threaded loop in 10 of 12 layer comparisons on such a host
                # (d=512, F=1408, e.g. fwd+bwd T=4096 1.039 against 1.118 dense, T=16384 1.015 against 1.072;
                # benchmarks/RESULTS.md); with AMX, and for smaller calls (preset small: 0.83 against 0.88 of
                # the dense twin's training tokens/s), the loop wins; where bf16 is emulated (AVX2) it was not
                # measured faster, and auto trains in fp32 there
                chosen = "grouped"
        else:
            chosen = "grouped" if aligned and grouped_mm_available(device, dtype) else "loop"
    elif requested == "grouped" and not grouped_mm_available(device, dtype):
        raise RuntimeError(
            f"backend='grouped' cannot run on {device.type} with {dtype}: torch {torch.__version__} has no working "
            "grouped_mm there; use backend='auto', 'loop' or 'padded'")
    elif requested == "grouped" and not aligned:
        raise RuntimeError(
            f"backend='grouped' needs widths {widths} to be multiples of 16 bytes for {dtype} (grouped_mm strides); "
            "use backend='auto', 'loop' or 'padded'")
    else:
        chosen = requested
    key = (requested, device.type, dtype, chosen)
    if not torch.compiler.is_compiling() and key not in _LOGGED:  # (logging would break a compiled graph)
        _LOGGED.add(key)
        log.info("moekit experts backend: %s (requested %s, %s, %s)", chosen, requested, device.type, dtype)
    return chosen
