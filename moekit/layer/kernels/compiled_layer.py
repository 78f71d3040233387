"""The compiled MoE layer: ``MoE._forward`` through ``torch.compile`` (backend "compiled", and "auto" when it
trains on the CPU), the experts an opaque custom op inside it (``custom_op.py``).

Imports: ``moekit.layer.kernels`` only; the layer's forward is handed in (``compiled(fn)``), so this file does not
import the layer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layer.kernels.inductor import kernels_turned_off
from moekit.layer.kernels.select import select_backend

log = logging.getLogger("moekit")


class AutoCompile:
    """backend="auto" on the CPU: training calls run the layer through torch.compile (the "compiled" backend:
    the experts as one opaque op, inductor fusing the router, dispatch plan, gather, combine and statistics
    around it). Measured on preset small (d=192, E=8, F=256, bf16 autocast, AMD EPYC without AMX), training
    tokens/s against the dense twin, interleaved in one process: 0.90-0.93 compiled against 0.87-0.90 eager in
    five of six runs of one session, 0.85-0.88 against 0.84-0.87 in another (benchmarks/RESULTS.md, "What changed",
    item 9, and the targets); the first training step pays the compilation (5-6 s with inductor's on-disk cache
    warm, ~16 s cold). Inference (eval, generation) keeps the eager paths and the decode kernel, and calls below
    ``min_flops`` (the tests' toy layers) stay eager: compiling costs more than they run. If compilation fails (no
    C++ compiler, an unsupported op) it warns once and every layer trains eagerly from then on;
    ``MOEKIT_KERNELS=eager`` keeps training eager from the start."""

    min_flops = 1e9  # SwiGLU FLOPs of the call (6 * rows * dim * ffn): preset small's training calls are 2.4e9

    def __init__(self) -> None:
        self.enabled = not kernels_turned_off()
        self.announced = False

    def applies(self, device: torch.device, dtype: torch.dtype, dim: int, ffn_dim: int, rows: int) -> bool:
        """Does a training call of ``rows`` expert rows (tokens x top-k) in ``dtype`` run compiled?"""
        return (self.enabled and device.type == "cpu" and 6.0 * rows * dim * ffn_dim >= self.min_flops
                and select_backend("auto", device, dtype, widths=(dim, ffn_dim), rows=rows) == "loop")

    def forward(self, layer: nn.Module, x: Tensor, aux: bool) -> Any:
        """``layer._forward(x, aux)`` compiled (a ``moekit.layer.moe.MoEOutput``), or None once compiling failed."""
        if not self.announced:
            self.announced = True
            log.info("MoE layers: training through torch.compile; the first step compiles (~10 s; "
                     "MOEKIT_KERNELS=eager trains the eager layer)")
        try:
            return compiled(type(layer)._forward)(layer, x, aux)
        except Exception as e:  # noqa: BLE001 (any failure to compile: the eager layer from now on)
            first = str(e).splitlines()[0] if str(e) else ""
            log.warning("MoE layer: torch.compile failed (%s: %s); training with the eager layer "
                        "(MOEKIT_KERNELS=eager skips the attempt)", type(e).__name__, first)
            self.enabled = False
            return None


AUTO_COMPILE = AutoCompile()


@functools.cache
def compiled(forward: Callable) -> Callable:
    """backend="compiled": the layer's ``_forward`` through torch.compile, one compiled function for every layer (the
    parameters are graph inputs). The experts are an opaque custom op there (``custom_op.py``), so the graph
    depends on the token count only, never on the per-expert row counts: it compiles once for the first T and
    once more, with a dynamic T, if T changes; routing changes never recompile."""
    return torch.compile(forward)
