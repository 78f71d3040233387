"""Activations wider than the weights: fp32 compute over 16-bit weights, for CPUs without bf16 instructions.

Without AVX-512-BF16 or AMX, PyTorch's bf16 GEMMs are emulated (oneDNN converts inside its reference kernels):
a 512-token prompt pass ran 61 tokens/s in bf16 against 328 in fp32 on a 2-core AVX2 host (issue 24). Holding the
weights in fp32 instead doubles the memory and the bytes every decode token reads. So a model keeps its 16-bit
weights and runs with an fp32 residual stream (``Transformer.forward(activation_dtype=torch.float32)``): each
linear layer converts its weight to fp32 for the call (a copy of one [O, D] matrix, small against the GEMM over a
prompt chunk), the experts convert theirs as they already do for any compute dtype (``Experts.forward``), and the
decode step reads the 16-bit weights directly in its kernels (``moekit.model.decode``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class WideLinear(TorchFunctionMode):
    """``F.linear(x, w, b)`` with ``w`` narrower than ``x`` runs as ``F.linear(x, w.to(x.dtype), b.to(x.dtype))``;
    every other call is untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            if x.is_floating_point() and w.is_floating_point() and x.dtype.itemsize > w.dtype.itemsize:
                b = args[2] if len(args) > 2 else kwargs.get("bias")
                return func(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        return func(*args, **kwargs)


def activation_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The residual stream's dtype for inference on ``model``: fp32 where it holds 16-bit weights on a CPU that has
    no native bf16 (``moekit.host.native_bf16``; fp16 on any CPU: PyTorch's CPU fp16 GEMMs are emulated on all but
    a few server CPUs), None (the weights' own dtype) elsewhere."""
    from moekit.host import native_bf16

    w = next(model.parameters())
    if w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float16):
        return None
    if w.dtype == torch.bfloat16 and native_bf16(w.device):
        return None
    return torch.float32
