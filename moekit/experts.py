"""Feed-forward networks: the dense MLP and E stacked experts with their execution backends.

Legend: A rows (sorted token-expert assignments), D dim, E experts, F ffn width,
I = input-projection width (2F for SwiGLU: gate rows then up rows, as HF's fused ``gate_up_proj``;
F for GELU), C capacity slots per expert.

The dense MLP and every expert compute the same ``ffn`` function, so a one-expert MoE is the dense
MLP (tested). Expert weights are stacked 3-D tensors ``w_in [E, I, D]`` and ``w_out [E, D, F]``.

Backends (all take rows already sorted by expert, see ``dispatch.py``):
  loop     one GEMM pair per expert on its contiguous slice (syncs once for the slice sizes)
  grouped  ``torch.nn.functional.grouped_mm`` over all slices at once, no host sync
  padded   rows scattered into an [E, C, D] buffer and run as one batched matmul (static shapes in
           capacity mode; dropless mode pads to the largest expert, one sync)
``auto`` picks ``grouped`` when one capability check (a tiny grouped_mm on the device and dtype)
passes, else ``loop``, and logs the choice. A backend requested explicitly that cannot run raises.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.dispatch import DispatchPlan

log = logging.getLogger("moekit")


def ffn_in_width(ffn_dim: int, activation: str) -> int:
    return 2 * ffn_dim if activation == "swiglu" else ffn_dim


def activate(h_AI: Tensor, activation: str) -> Tensor:
    """SwiGLU: silu(gate) * up (Shazeer 2020), gate = first half; GELU: gelu(h)."""
    if activation == "swiglu":
        gate, up = h_AI.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_AI)


def ffn(x_AD: Tensor, w_in_ID: Tensor, w_out_DF: Tensor, activation: str) -> Tensor:
    """One feed-forward network: w_out(act(w_in x))."""
    return F.linear(activate(F.linear(x_AD, w_in_ID), activation), w_out_DF)


class MLP(nn.Module):
    """The dense FFN (also the shared expert)."""

    def __init__(self, dim: int, ffn_dim: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(ffn_in_width(ffn_dim, activation), dim))
        self.w_out = nn.Parameter(torch.empty(dim, ffn_dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std or std)

    def forward(self, x: Tensor) -> Tensor:
        return ffn(x, self.w_in, self.w_out, self.activation)


class Experts(nn.Module):
    def __init__(self, n_experts: int, dim: int, ffn_dim: int, activation: str = "swiglu", backend: str = "auto"):
        super().__init__()
        self.n_experts, self.dim, self.ffn_dim = n_experts, dim, ffn_dim
        self.activation = activation
        self.backend = backend
        self.w_in = nn.Parameter(torch.empty(n_experts, ffn_in_width(ffn_dim, activation), dim))
        self.w_out = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std or std)

    def forward(self, x_AD: Tensor, plan: DispatchPlan) -> Tensor:
        """Run each expert on its contiguous slice of the sorted rows."""
        dtype = _compute_dtype(x_AD)
        x_AD = x_AD.to(dtype)
        w_in_EID, w_out_EDF = self.w_in.to(dtype), self.w_out.to(dtype)
        backend = select_backend(self.backend, x_AD.device, dtype, widths=(self.dim, self.ffn_dim))
        if backend == "grouped":
            return self._grouped(x_AD, w_in_EID, w_out_EDF, plan)
        if backend == "padded":
            return self._padded(x_AD, w_in_EID, w_out_EDF, plan)
        return self._loop(x_AD, w_in_EID, w_out_EDF, plan)

    def _loop(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan) -> Tensor:
        sizes = plan.rows_per_expert_E.tolist()  # one host sync for the slice sizes
        chunks = x_AD.split(sizes)
        outs = [ffn(chunk, w_in_EID[e], w_out_EDF[e], self.activation) if n else chunk
                for e, (chunk, n) in enumerate(zip(chunks, sizes))]
        return torch.cat(outs) if outs else x_AD

    def _grouped(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan) -> Tensor:
        offs_E = torch.cumsum(plan.rows_per_expert_E, 0).to(torch.int32)
        h_AI = F.grouped_mm(x_AD, w_in_EID.transpose(1, 2), offs=offs_E)
        return F.grouped_mm(activate(h_AI, self.activation), w_out_EDF.transpose(1, 2), offs=offs_E)

    def _padded(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan) -> Tensor:
        E, D = self.n_experts, self.dim
        rows_E = plan.rows_per_expert_E
        if plan.slot_A is None:  # dropless: pad every expert to the largest one
            C = int(rows_E.max())
            start_E = torch.cumsum(rows_E, 0) - rows_E
            slot_A = torch.arange(x_AD.shape[0], device=x_AD.device) - start_E[plan.expert_idx_A]
        else:
            C, slot_A = plan.capacity, plan.slot_A
        # dropped rows go to one trash slot past the end and read back zeros
        dest_A = torch.where(slot_A >= 0, plan.expert_idx_A * C + slot_A, torch.full_like(slot_A, E * C))
        buf_XD = x_AD.new_zeros(E * C + 1, D).index_copy(0, dest_A, x_AD)
        h_ECI = torch.bmm(buf_XD[: E * C].view(E, C, D), w_in_EID.transpose(1, 2))
        y_ECD = torch.bmm(activate(h_ECI, self.activation), w_out_EDF.transpose(1, 2))
        y_XD = torch.cat([y_ECD.reshape(E * C, D), y_ECD.new_zeros(1, D)])
        return y_XD[dest_A]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (grouped_mm is not on autocast's op lists), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}
_LOGGED: set[tuple[str, str, torch.dtype, str]] = set()


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """The one capability check: does a tiny grouped_mm run and give the right answer here?"""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(F, "grouped_mm") and dtype in (torch.float32, torch.bfloat16, torch.float16)
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(32, 16, generator=g).to(device, dtype)
                b = torch.randn(2, 16, 16, generator=g).to(device, dtype)
                offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
                out = F.grouped_mm(a, b.transpose(1, 2), offs=offs)
                ref = torch.cat([a[:16] @ b[0].T, a[16:] @ b[1].T])
                ok = bool(torch.allclose(out.float(), ref.float(), rtol=5e-2, atol=5e-2 * math.sqrt(16)))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


def grouped_mm_aligned(dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """grouped_mm (forward and backward) needs every row stride to be a multiple of 16 bytes: the model
    dim and the expert width must be multiples of 4 (fp32) or 8 (bf16/fp16) elements."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(w * size % 16 == 0 for w in widths)


def select_backend(requested: str, device: torch.device, dtype: torch.dtype, widths: tuple[int, ...] = ()) -> str:
    """``widths``: the feature widths the experts multiply (dim, expert ffn width), for grouped_mm's alignment."""
    aligned = grouped_mm_aligned(dtype, widths)
    if requested == "auto":
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
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("moekit experts backend: %s (requested %s, %s, %s)", chosen, requested, device.type, dtype)
    return chosen
