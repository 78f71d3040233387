"""Feed-forward networks: the dense MLP and E stacked experts with their execution backends.

Legend: A rows (sorted token-expert assignments), D dim, E experts, F ffn width,
I = input-projection width (2F for SwiGLU: gate rows then up rows, as HF's fused ``gate_up_proj``;
F for GELU), C capacity slots per expert.

Activations: "swiglu" (Shazeer 2020), "gelu", and "swiglu_clamped", gpt-oss's variant
(reference doc section 1.7; HF ``GptOssExperts._apply_gate``): gate clamped above at ``limit``,
up clamped to [-limit, limit], out = (up + 1) * gate * sigmoid(alpha * gate). gpt-oss stores gate and
up interleaved (even/odd columns); moekit keeps the [gate | up] row layout and converts on load/export
(``moekit/hf/weights.py``), so every activation shares this one code path. Optional biases
(``b_in [I]``/``b_out [D]`` per FFN, ``[E, I]``/``[E, D]`` for the experts) serve gpt-oss and Llama's
``mlp_bias``.

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


GATED = ("swiglu", "swiglu_clamped")  # activations whose input projection holds [gate | up]


def ffn_in_width(ffn_dim: int, activation: str) -> int:
    return 2 * ffn_dim if activation in GATED else ffn_dim


def activate(h_AI: Tensor, activation: str, limit: float = 7.0, alpha: float = 1.702) -> Tensor:
    """SwiGLU: silu(gate) * up (Shazeer 2020), gate = first half; GELU: gelu(h);
    clamped SwiGLU (gpt-oss): (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)."""
    if activation == "swiglu":
        gate, up = h_AI.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "swiglu_clamped":
        gate, up = h_AI.chunk(2, dim=-1)
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
        return (up + 1) * (gate * torch.sigmoid(alpha * gate))
    return F.gelu(h_AI)


def ffn(x_AD: Tensor, w_in_ID: Tensor, w_out_DF: Tensor, activation: str, b_in_I: Tensor | None = None,
        b_out_D: Tensor | None = None, limit: float = 7.0, alpha: float = 1.702) -> Tensor:
    """One feed-forward network: w_out(act(w_in x + b_in)) + b_out."""
    return F.linear(activate(F.linear(x_AD, w_in_ID, b_in_I), activation, limit, alpha), w_out_DF, b_out_D)


class MLP(nn.Module):
    """The dense FFN (also the shared expert)."""

    def __init__(self, dim: int, ffn_dim: int, activation: str = "swiglu", bias: bool = False,
                 swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702):
        super().__init__()
        self.activation = activation
        self.limit, self.alpha = swiglu_limit, swiglu_alpha
        self.w_in = nn.Parameter(torch.empty(ffn_in_width(ffn_dim, activation), dim))
        self.w_out = nn.Parameter(torch.empty(dim, ffn_dim))
        self.b_in = nn.Parameter(torch.zeros(ffn_in_width(ffn_dim, activation))) if bias else None
        self.b_out = nn.Parameter(torch.zeros(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std or std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: Tensor) -> Tensor:
        return ffn(x, self.w_in, self.w_out, self.activation, self.b_in, self.b_out, self.limit, self.alpha)


class Experts(nn.Module):
    def __init__(self, n_experts: int, dim: int, ffn_dim: int, activation: str = "swiglu", backend: str = "auto",
                 bias: bool = False, swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702):
        super().__init__()
        self.n_experts, self.dim, self.ffn_dim = n_experts, dim, ffn_dim
        self.activation = activation
        self.limit, self.alpha = swiglu_limit, swiglu_alpha
        self.backend = backend
        self.w_in = nn.Parameter(torch.empty(n_experts, ffn_in_width(ffn_dim, activation), dim))
        self.w_out = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))
        # per-expert biases (gpt-oss gate_up_proj_bias [E, 2F] / down_proj_bias [E, D])
        self.b_in = nn.Parameter(torch.zeros(n_experts, ffn_in_width(ffn_dim, activation))) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n_experts, dim)) if bias else None
        self.expert_offset: int | None = None  # set by shard_: these are experts [offset, offset + n_experts)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std or std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    @torch.no_grad()
    def shard_(self, offset: int, count: int) -> None:
        """Keep only experts [offset, offset + count) (expert parallelism, ``moekit.parallel``).

        Every parameter is stacked over experts on dim 0; the plans this module then receives number
        experts locally (0 .. count-1). Parameters are replaced: build optimizers afterwards.
        """
        if self.expert_offset is not None or not 0 <= offset < offset + count <= self.n_experts:
            raise ValueError(f"shard_: cannot keep experts [{offset}, {offset + count}) of {self.n_experts} "
                             f"(already sharded: {self.expert_offset is not None})")
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p[offset:offset + count].clone(), requires_grad=p.requires_grad))
        self.n_experts, self.expert_offset = count, offset

    def _act(self, h: Tensor) -> Tensor:
        return activate(h, self.activation, self.limit, self.alpha)

    def _biases(self, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        return (None if self.b_in is None else self.b_in.to(dtype),
                None if self.b_out is None else self.b_out.to(dtype))

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
        b_in, b_out = self._biases(x_AD.dtype)
        outs = [ffn(chunk, w_in_EID[e], w_out_EDF[e], self.activation,
                    None if b_in is None else b_in[e], None if b_out is None else b_out[e], self.limit, self.alpha)
                if n else chunk
                for e, (chunk, n) in enumerate(zip(chunks, sizes))]
        return torch.cat(outs) if outs else x_AD

    def _grouped(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan) -> Tensor:
        offs_E = torch.cumsum(plan.rows_per_expert_E, 0).to(torch.int32)
        h_AI = F.grouped_mm(x_AD, w_in_EID.transpose(1, 2), offs=offs_E)
        b_in, b_out = self._biases(x_AD.dtype)
        if b_in is not None:
            h_AI = h_AI + b_in[plan.expert_idx_A]
        y_AD = F.grouped_mm(self._act(h_AI), w_out_EDF.transpose(1, 2), offs=offs_E)
        return y_AD if b_out is None else y_AD + b_out[plan.expert_idx_A]

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
        b_in, b_out = self._biases(x_AD.dtype)
        if b_in is not None:
            h_ECI = h_ECI + b_in[:, None, :]
        y_ECD = torch.bmm(self._act(h_ECI), w_out_EDF.transpose(1, 2))
        if b_out is not None:
            y_ECD = y_ECD + b_out[:, None, :]
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
