"""grouped_mm: the one grouped GEMM of the ``grouped`` backend, and the capability check that decides where it runs.

Imports: torch only.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("moekit")

# torch.nn.functional.grouped_mm (torch >= 2.10), else its private predecessor torch.grouped_mm (same signature;
# CUDA from 2.8, the CPU from 2.9), else None: no grouped backend
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "grouped_mm", None)
_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}
_LOGGED: set[tuple[str, str, torch.dtype, str]] = set()


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """The one capability check: does a tiny grouped_mm run and give the right answer here, in both forms the
    grouped backend uses (rows x stacked weights, and the weight gradients' transposed rows x rows)?"""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        ok = grouped_mm is not None and dtype in (torch.float32, torch.bfloat16, torch.float16)
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(32, 16, generator=g).to(device, dtype)
                b = torch.randn(2, 16, 16, generator=g).to(device, dtype)
                offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
                out = grouped_mm(a, b.transpose(1, 2), offs=offs)
                ref = torch.cat([a[:16] @ b[0].T, a[16:] @ b[1].T])
                dw = grouped_mm(out.t(), a, offs=offs)  # [2, 16, 16]: per group out^T a, as dW = dy^T a
                dw_ref = torch.stack([out[:16].T @ a[:16], out[16:].T @ a[16:]])
                close = functools.partial(torch.allclose, rtol=5e-2, atol=5e-2 * math.sqrt(16))
                ok = bool(close(out.float(), ref.float())) and bool(close(dw.float(), dw_ref.float()))
            except (RuntimeError, TypeError, NotImplementedError) as e:  # no kernel for this device/dtype
                log.debug("grouped_mm unavailable on %s %s: %s: %s", device.type, dtype, type(e).__name__, e)
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]



def grouped_mm_aligned(dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """grouped_mm (forward and backward) needs every row stride to be a multiple of 16 bytes: the model
    dim and the expert width must be multiples of 4 (fp32) or 8 (bf16/fp16) elements."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(w * size % 16 == 0 for w in widths)

