"""The dense MLP and E stacked experts, with their execution backends.

Legend: A rows (sorted token-expert assignments), D dim, E experts, F ffn width, I = input-projection width
(2F for SwiGLU, F for GELU), C capacity slots per expert.

What an expert computes is ``moekit.layer.ffn.ffn``; the dense MLP and every expert compute that one function,
so a one-expert MoE is the dense MLP (tested). Expert weights are stacked 3-D tensors ``w_in [E, I, D]`` and
``w_out [E, D, F]``; optional biases ``[E, I]``/``[E, D]``.

Backends (all take rows already sorted by expert, see ``dispatch.py``), their kernels in ``kernels/``:
  loop      one GEMM pair per expert on its contiguous slice (reads the slice sizes on the host once); on
            the CPU the experts run side by side on worker threads, one intra-op thread each
  grouped   ``torch.nn.functional.grouped_mm`` over all slices at once, no host sync
  padded    rows scattered into an [E, C, D] buffer and run as one batched matmul (static shapes in
            capacity mode; dropless mode pads to the largest expert, one sync)
  compiled  the whole MoE layer through ``torch.compile``, the experts an opaque custom op (the loop
            backend on the CPU, grouped elsewhere where it runs), so routing changes never recompile
loop and grouped share one autograd Function with a hand-written backward (``kernels/sorted_rows.py``).
Inference on a few tokens (generation) bypasses the backends: ``Experts.decode`` (and the dense MLP for one
token) runs one compiled kernel that reads only the chosen experts' weights (``kernels/decode.py``).
``auto`` picks, and logs (``kernels/select.py``): on the CPU the loop for any call of real size, except bf16
calls large enough for the expert threads on an AVX-512-BF16 CPU without AMX, which run ``grouped`` (measured
faster on such a host); otherwise ``grouped`` when one capability check (a tiny grouped_mm on the device and
dtype) passes, else ``loop``. A backend requested explicitly that cannot run raises.

Imports: ``moekit.layer.ffn``, ``dispatch`` and ``kernels``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.layer.dispatch import DispatchPlan
from moekit.layer.ffn import activate, compute_dtype, ffn, ffn_in_width, needs_grad
from moekit.layer.kernels.custom_op import experts_ffn_op
from moekit.layer.kernels.decode import (DECODE_KERNEL, decode_eager, decode_one_ffn, decode_rows_limit,
                                         mlp_kernel_rows)
from moekit.layer.kernels.select import select_backend
from moekit.layer.kernels.sorted_rows import ActSpec, Segments, experts_ffn


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
        if x.device.type == "cpu" and x.numel() <= mlp_kernel_rows(x) * x.shape[-1] and not needs_grad(x, self):
            # a few tokens (generation): the decode kernel, the dense FFN as a one-expert MoE
            out = decode_one_ffn(self, x)
            if out is not None:
                return out
        return ffn(x, self.w_in, self.w_out, self.activation, self.b_in, self.b_out, self.limit, self.alpha)



class Experts(nn.Module):
    routed_decode = True  # MoE may run the router and these experts as one decode kernel (ROUTED_DECODE)

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

    def cast_input(self, x: Tensor) -> Tensor:
        """x in the experts' compute dtype (the autocast dtype under autocast): ``MoE`` casts the T token rows
        before copying them to the T * K expert rows, instead of casting the copies."""
        return x.to(compute_dtype(x))

    def forward(self, x_AD: Tensor, plan: DispatchPlan) -> Tensor:
        """Run each expert on its contiguous slice of the sorted rows."""
        dtype = compute_dtype(x_AD)
        x_AD = x_AD.to(dtype).contiguous()
        w_in_EID, w_out_EDF = self.w_in.to(dtype), self.w_out.to(dtype)
        backend = select_backend(self.backend, x_AD.device, dtype, widths=(self.dim, self.ffn_dim), rows=x_AD.shape[0])
        if backend == "loop" and torch.compiler.is_compiling():
            backend = "compiled"  # in a compiled graph (the compiled layer, torch.compile(model)): the opaque op
        if backend == "grouped":
            return self._grouped(x_AD, w_in_EID, w_out_EDF, plan)
        if backend == "padded":
            return self._padded(x_AD, w_in_EID, w_out_EDF, plan)
        if backend == "compiled":
            return self._compiled(x_AD, w_in_EID, w_out_EDF, plan)
        return self._loop(x_AD, w_in_EID, w_out_EDF, plan)

    def _fused(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan, grouped: bool) -> Tensor:
        b_in, b_out = self._biases(x_AD.dtype)
        seg = Segments(plan.rows_per_expert_E, plan.expert_idx_A, grouped)
        act = ActSpec(self.activation, self.limit, self.alpha, self.ffn_dim)
        return experts_ffn(x_AD, w_in_EID, w_out_EDF, b_in, b_out, seg, act)

    def _loop(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan) -> Tensor:
        return self._fused(x_AD, w_in_EID, w_out_EDF, plan, grouped=False)

    def _grouped(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan) -> Tensor:
        return self._fused(x_AD, w_in_EID, w_out_EDF, plan, grouped=True)

    def decode_weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """w_in, w_out, b_in, b_out as the decode kernel reads them: detached, in their stored dtype."""
        return (self.w_in.detach(), self.w_out.detach(), None if self.b_in is None else self.b_in.detach(),
                None if self.b_out is None else self.b_out.detach())

    def decode_eligible(self, x_TD: Tensor, top_k: int) -> bool:
        """Can ``decode`` run this call? A few tokens (generation), no autograd, CPU, loop or auto."""
        if self.backend not in ("auto", "loop") or x_TD.device.type != "cpu":
            return False
        if x_TD.shape[0] * top_k > decode_rows_limit(self.w_in, self.w_out):
            return False
        return not needs_grad(x_TD, self)

    def decode(self, x_TD: Tensor, topk_idx_TK: Tensor, topk_weight_TK: Tensor) -> Tensor:
        """out_TD = sum_k w_tk expert_{e_tk}(x_t) for a few tokens (inference), without a dispatch plan; only
        the active experts' weights are read. The compiled decode kernel (``DECODE_KERNEL``) when available;
        else each active expert runs once on its tokens (matrix-vector products for a single token) and its
        output is added into the token's row with the combine weight as the scale."""
        dtype = compute_dtype(x_TD)
        x_TD = x_TD.detach().to(dtype)
        # the kernel reads the weights in their stored dtype (fp32 weights under bf16 autocast are converted in
        # registers: casting all E experts first would read and write every expert's weights for one token)
        out_TD = DECODE_KERNEL((x_TD, topk_idx_TK, topk_weight_TK, *self.decode_weights()),
                                (self.activation, self.limit, self.alpha))
        if out_TD is not None:
            return out_TD
        b_in, b_out = self._biases(dtype)
        return decode_eager(x_TD, topk_idx_TK, topk_weight_TK, self.w_in.to(dtype), self.w_out.to(dtype), b_in, b_out,
                            ActSpec(self.activation, self.limit, self.alpha, self.ffn_dim))

    def _compiled(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan) -> Tensor:
        """The experts as one custom op (opaque to torch.compile, see "compiled" below)."""
        b_in, b_out = self._biases(x_AD.dtype)
        tensors = (x_AD, w_in_EID, w_out_EDF, b_in, b_out)
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return experts_ffn_op(*tensors, plan.rows_per_expert_E, plan.expert_idx_A, self.activation,
                               float(self.limit), float(self.alpha), keep)[0]

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

