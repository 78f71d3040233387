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
  loop      one GEMM pair per expert on its contiguous slice (reads the slice sizes on the host once); on
            the CPU the experts run side by side on worker threads, one intra-op thread each
  grouped   ``torch.nn.functional.grouped_mm`` over all slices at once, no host sync
  padded    rows scattered into an [E, C, D] buffer and run as one batched matmul (static shapes in
            capacity mode; dropless mode pads to the largest expert, one sync)
  compiled  the whole MoE layer through ``torch.compile``, the experts an opaque custom op (the loop
            backend on the CPU, grouped elsewhere where it runs), so routing changes never recompile
loop and grouped share one autograd Function with a hand-written backward (see "execution" below).
Inference on a few tokens (generation) bypasses the backends: ``Experts.decode`` (and the dense MLP for one
token) runs one compiled kernel that reads only the chosen experts' weights (``_DECODE_KERNEL``).
``auto`` picks, and logs: on the CPU the loop for any call of real size (the fastest there, benchmarks/RESULTS.md),
except bf16/fp16 calls large enough for the expert threads on a CPU without AMX, which run ``grouped`` (measured
faster on such a host); otherwise ``grouped`` when one capability check
(a tiny grouped_mm on the device and dtype) passes, else ``loop``. A backend requested explicitly that
cannot run raises.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from moekit.compiled import InductorFn, accumulate_dtype
from moekit.dispatch import DispatchPlan
from moekit.host import probe_host

log = logging.getLogger("moekit")


GATED = ("swiglu", "swiglu_clamped")  # activations whose input projection holds [gate | up]
DECODE_MAX_ROWS = 16  # token-expert rows up to which an inference call skips the dispatch plan (Experts.decode)


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


def experts_decode(x_TD: Tensor, idx_TK: Tensor, weight_TK: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor,
                   b_in_EI: Tensor | None, b_out_ED: Tensor | None, activation: str, limit: float,
                   alpha: float) -> Tensor:
    """out_t = sum_k w_tk expert_{e_tk}(x_t) for a few tokens, written as gathers of the chosen experts' weights
    and multiply-reduce. Compiled, it is one pass over each (token, expert) pair's weights (the gather becomes
    indirect loads inside the reduction, nothing is copied) with fp32 accumulation; an expert chosen by several
    of the tokens is read once per token (an [U, I, T] formulation that reads it once measured slower: inductor
    does not tile it like a GEMM). Run eagerly it copies the chosen weights (same values)."""
    acc = accumulate_dtype(x_TD, w_in_EID)
    x_T11D = x_TD.to(acc)[:, None, None, :]
    h_TKI = (w_in_EID[idx_TK].to(acc) * x_T11D).sum(-1)
    if b_in_EI is not None:
        h_TKI = h_TKI + b_in_EI[idx_TK].to(acc)
    a_TK1F = activate(h_TKI, activation, limit, alpha)[:, :, None, :]
    y_TKD = (w_out_EDF[idx_TK].to(acc) * a_TK1F).sum(-1)
    if b_out_ED is not None:
        y_TKD = y_TKD + b_out_ED[idx_TK].to(acc)
    return (y_TKD * weight_TK.to(acc)[:, :, None]).sum(1).to(x_TD.dtype)


# The few-token inference step (generation) through TorchInductor (moekit/compiled.py). Decoding is bound by
# reading the active experts' weights, and PyTorch's eager CPU matrix-vector products read them slowly
# (torch.mv = MKL sgemv runs on one thread here; bf16 mv converts slowly): on [2816, 512] + [512, 1408]
# weights cycled over 8 experts, torch.mv reads 11 GB/s fp32 and 9 GB/s bf16, an inductor multiply-reduce
# 26 and 19 GB/s (benchmarks/RESULTS.md, "decode"). One compiled call also replaces the ~20 small ops per
# layer of the eager path (host read of the routing, per-expert products, activation, weighted sum).
# Where inductor cannot build (no C++ compiler) it warns once and the eager per-expert path runs instead;
# ``MOEKIT_KERNELS=eager`` selects that path.
# The top-k width K (idx_TK, weight_TK) is static: with a symbolic K inductor generated a single-threaded T=1
# kernel (800 against 510 us, benchmarks/RESULTS.md).
_DECODE_KERNEL = InductorFn(experts_decode, "decode kernel", static_dims={1: (1,), 2: (1,)})


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
        if x.device.type == "cpu" and x.numel() <= _mlp_kernel_rows(x) * x.shape[-1] and not _needs_grad(x, self):
            # a few tokens (generation): the decode kernel, the dense FFN as a one-expert MoE
            out = _decode_one_expert(self, x)
            if out is not None:
                return out
        return ffn(x, self.w_in, self.w_out, self.activation, self.b_in, self.b_out, self.limit, self.alpha)


def _mlp_kernel_rows(x: Tensor) -> int:
    """Rows up to which the dense MLP runs through the decode kernel on the CPU: one in bf16/fp16 (oneDNN's small
    GEMMs are fast), up to 8 in fp32/fp64, where MKL's GEMM with 2-8 rows is slower than reading the weights once
    per row (*ad hoc*, [2816, 512] + [512, 1408] fp32 cycled over 4 FFNs: T=2 1202 against 374 us, T=8 1306
    against 1049 us; bf16 T=3 234 against 400 us)."""
    return 8 if compute_dtype(x) in (torch.float32, torch.float64) else 1


def _needs_grad(x: Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _decode_one_expert(mlp: MLP, x: Tensor) -> Tensor | None:
    x_TD = x.detach().reshape(-1, x.shape[-1]).to(compute_dtype(x))  # weights stay in their dtype (Experts.decode)
    T = x_TD.shape[0]
    one_T1 = torch.ones(T, 1, dtype=x_TD.dtype)
    zero_T1 = torch.zeros(T, 1, dtype=torch.long)
    b_in = None if mlp.b_in is None else mlp.b_in.detach()[None]
    b_out = None if mlp.b_out is None else mlp.b_out.detach()[None]
    out = _DECODE_KERNEL((x_TD, zero_T1, one_T1, mlp.w_in.detach()[None], mlp.w_out.detach()[None], b_in, b_out),
                         (mlp.activation, mlp.limit, mlp.alpha))
    return None if out is None else out.view(*x.shape[:-1], -1)


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
            backend = "compiled"  # in a compiled graph (moekit.moe._AutoCompile, torch.compile(model)): the opaque op
        if backend == "grouped":
            return self._grouped(x_AD, w_in_EID, w_out_EDF, plan)
        if backend == "padded":
            return self._padded(x_AD, w_in_EID, w_out_EDF, plan)
        if backend == "compiled":
            return self._compiled(x_AD, w_in_EID, w_out_EDF, plan)
        return self._loop(x_AD, w_in_EID, w_out_EDF, plan)

    def _fused(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan, grouped: bool) -> Tensor:
        b_in, b_out = self._biases(x_AD.dtype)
        seg = _Segments(plan.rows_per_expert_E, plan.expert_idx_A, grouped)
        act = _ActSpec(self.activation, self.limit, self.alpha, self.ffn_dim)
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
        if self.backend not in ("auto", "loop") or x_TD.device.type != "cpu" or x_TD.shape[0] * top_k > DECODE_MAX_ROWS:
            return False
        return not _needs_grad(x_TD, self)

    def decode(self, x_TD: Tensor, topk_idx_TK: Tensor, topk_weight_TK: Tensor) -> Tensor:
        """out_TD = sum_k w_tk expert_{e_tk}(x_t) for a few tokens (inference), without a dispatch plan; only
        the active experts' weights are read. The compiled decode kernel (``_DECODE_KERNEL``) when available;
        else each active expert runs once on its tokens (matrix-vector products for a single token) and its
        output is added into the token's row with the combine weight as the scale."""
        dtype = compute_dtype(x_TD)
        x_TD = x_TD.detach().to(dtype)
        # the kernel reads the weights in their stored dtype (fp32 weights under bf16 autocast are converted in
        # registers: casting all E experts first would read and write every expert's weights for one token)
        out_TD = _DECODE_KERNEL((x_TD, topk_idx_TK, topk_weight_TK, *self.decode_weights()),
                                (self.activation, self.limit, self.alpha))
        if out_TD is not None:
            return out_TD
        w_in_EID, w_out_EDF = self.w_in.to(dtype), self.w_out.to(dtype)
        b_in, b_out = self._biases(dtype)
        # eager: each active expert once on its tokens
        slots: dict[int, list[tuple[int, float]]] = {}
        # the one host read (indices and weights together); on the CPU it waits for nothing
        for t, (row, w_row) in enumerate(zip(topk_idx_TK.tolist(), topk_weight_TK.tolist())):
            for e, w in zip(row, w_row):
                slots.setdefault(e, []).append((t, w))
        act = _ActSpec(self.activation, self.limit, self.alpha, self.ffn_dim)
        out_TD = x_TD.new_zeros(x_TD.shape[0], self.dim)

        def expert(e: int, tw: list[tuple[int, float]]) -> None:
            if len(tw) == 1:
                (t, w), = tw
                h_1I = torch.mv(w_in_EID[e], x_TD[t]).unsqueeze(0)
            else:
                t_idx = [t for t, _ in tw]
                h_1I = x_TD[t_idx] @ w_in_EID[e].t()
            if b_in is not None:
                h_1I += b_in[e]
            a_1F = h_1I.new_empty(h_1I.shape[0], self.ffn_dim)
            act.forward_into(h_1I, a_1F, None)
            if len(tw) == 1:
                y_D = torch.mv(w_out_EDF[e], a_1F[0])
                if b_out is not None:
                    y_D += b_out[e]
                out_TD[t].add_(y_D, alpha=w)
            else:
                y_ND = a_1F @ w_out_EDF[e].t()
                if b_out is not None:
                    y_ND += b_out[e]
                y_ND.mul_(torch.tensor([w for _, w in tw], dtype=torch.float64).to(dtype).unsqueeze(1))
                out_TD.index_add_(0, torch.tensor(t_idx), y_ND)

        # inline, not on the expert threads: a handful of matrix-vector products split over the cores
        # (mv is memory bound) beat single-threaded ones handed to two workers (thread wake-up and the GIL
        # cost more than the ~0.2 ms the products take; benchmarks/RESULTS.md, "decode")
        for e, tw in slots.items():
            expert(e, tw)
        return out_TD

    def _compiled(self, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, plan: DispatchPlan) -> Tensor:
        """The experts as one custom op (opaque to torch.compile, see "compiled" below)."""
        b_in, b_out = self._biases(x_AD.dtype)
        tensors = (x_AD, w_in_EID, w_out_EDF, b_in, b_out)
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return _experts_ffn_op(*tensors, plan.rows_per_expert_E, plan.expert_idx_A, self.activation,
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


# ---------------------------------------------------------------------------------------------- execution
#
# The sorted-rows experts are ONE autograd Function (``_ExpertsFFN``) with the backward written out:
#   forward   h = x W_in^T  (per expert)      a = act(h)       y = a W_out^T  (per expert)
#   backward  dA = dy W_out   dW_out = dy^T a   dh = act'(h, dA)   dx = dh W_in   dW_in = dh^T x
# Against autograd over ``ffn`` this saves, per call: the [A, I] ``cat`` that ``chunk``'s backward
# builds (dg and du are written into the two halves of one dh buffer), zero-filled gradient buffers
# (each expert's weight gradient is written once, by its GEMM; only an expert without rows is zeroed),
# and fresh [A, F] / [A, I] temporaries (dA, dh, and an inference forward's h, a come from
# ``_SCRATCH``). Two flavours run the same maths:
#   loop     per expert: its whole FFN (GEMMs and activation) on its contiguous rows. On the CPU the
#            experts run side by side on ``torch.get_num_threads()`` worker threads with ONE intra-op
#            thread each (``_EXPERT_THREADS``): no barrier per GEMM, each expert's rows stay in its
#            core's cache between the GEMMs and the activation. One host read of the row counts.
#   grouped  stage by stage over all rows, every GEMM a ``grouped_mm`` with device offsets: no host
#            sync (CUDA graphs, expert parallelism); on CUDA one grouped GEMM kernel per stage.


class _Segments:
    """Where each expert's rows are: ``spans`` (expert, start, rows) on the host for the loop flavour,
    largest first, experts without rows left out; or device offsets ``offs_E`` for grouped_mm."""

    __slots__ = ("n_experts", "expert_idx_A", "offs_E", "spans")

    def __init__(self, rows_E: Tensor, expert_idx_A: Tensor, grouped: bool):
        self.n_experts = rows_E.shape[0]
        self.expert_idx_A = expert_idx_A
        self.offs_E, self.spans = None, None
        if grouped:
            self.offs_E = torch.cumsum(rows_E, 0).to(torch.int32)  # offs[-1] == A: every row is computed
        else:
            sizes = rows_E.tolist()  # the one host read of the loop flavour
            starts = [0, *itertools.accumulate(sizes)]
            # largest expert first: the threads then finish close together (longest-processing-time order)
            self.spans = sorted(((e, starts[e], n) for e, n in enumerate(sizes) if n), key=lambda s: -s[2])

    def empty_experts(self) -> list[int]:
        have = {e for e, _, _ in self.spans}
        return [e for e in range(self.n_experts) if e not in have]


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


_SCRATCH = _ScratchPool()


def release_scratch() -> None:
    """Free this thread's reused expert buffers (each is kept at the size of the largest call so far)."""
    _SCRATCH.buffers.clear()


class _ExpertThreads:
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


_EXPERT_THREADS = _ExpertThreads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_EXPERT_THREADS.reset_after_fork)


class _ActSpec:
    """The activation of one experts call, computed into given buffers, with its hand-written backward
    for SwiGLU and GELU (any other activation: a vector-Jacobian product of ``activate`` alone)."""

    __slots__ = ("name", "limit", "alpha", "F")

    def __init__(self, name: str, limit: float, alpha: float, ffn_dim: int):
        self.name, self.limit, self.alpha, self.F = name, limit, alpha, ffn_dim

    def forward_into(self, h_AI: Tensor, a_AF: Tensor, s_AF: Tensor | None) -> None:
        """a = act(h); for SwiGLU also s = silu(gate) when the backward will need it."""
        Fw = self.F
        if self.name == "swiglu":  # the ops of ``activate``: a one-expert MoE is the dense MLP
            if s_AF is None:
                torch.ops.aten.silu.out(h_AI[:, :Fw], out=a_AF)
                a_AF.mul_(h_AI[:, Fw:])
            else:
                torch.ops.aten.silu.out(h_AI[:, :Fw], out=s_AF)
                torch.mul(s_AF, h_AI[:, Fw:], out=a_AF)
        elif self.name == "gelu":
            torch.ops.aten.gelu.out(h_AI, out=a_AF)
        else:
            a_AF.copy_(activate(h_AI, self.name, self.limit, self.alpha))

    def backward_into(self, dA_AF: Tensor, h_AI: Tensor, s_AF: Tensor | None, dh_AI: Tensor) -> None:
        """dh from dA = dL/da. dA is scratch and gets overwritten."""
        Fw = self.F
        if self.name == "swiglu":
            torch.mul(dA_AF, s_AF, out=dh_AI[:, Fw:])                   # du = dA * silu(g)
            dA_AF.mul_(h_AI[:, Fw:])                                    # dA * u ...
            torch.ops.aten.silu_backward.grad_input(dA_AF, h_AI[:, :Fw], grad_input=dh_AI[:, :Fw])  # ... silu'(g)
        elif self.name == "gelu":
            torch.ops.aten.gelu_backward.grad_input(dA_AF, h_AI, grad_input=dh_AI)
        else:  # torch.func.vjp, not autograd.grad: it also works inside the custom op (below the autograd keys)
            _, vjp = torch.func.vjp(lambda h: activate(h, self.name, self.limit, self.alpha), h_AI.detach())
            dh_AI.copy_(vjp(dA_AF)[0])


# bf16/fp16 GEMMs on the CPU are oneDNN primitives built (JIT-compiled) for each exact shape and cached
# (1024 shapes by default). An expert's row count changes every step, so a GEMM over all n rows builds a new
# primitive almost every call: ~1.2 ms against ~0.13 ms for a cached [1024, 192] x [192, 512] (measured,
# benchmarks/RESULTS.md). Splitting the rows into a multiple of _ROW_BLOCK and a tail of < _ROW_BLOCK rows
# keeps the distinct shapes to a few dozen per GEMM. The tail is copied into a zero-padded [_ROW_BLOCK, K] scratch
# block, so it is always the same shape too: with tails of their own size (1..31 rows, each GEMM kind) the cache
# held ~500 MB of compiled GEMMs after 60 training steps of the small preset, and kept growing (measured: process
# RSS 1.68 GB against 1.15 GB with the cache off). fp32 goes to MKL, which compiles nothing per shape.
_ROW_BLOCK = 32
_JIT_DTYPES = (torch.bfloat16, torch.float16)


def _bulk_rows(n: int, t: Tensor) -> int:
    return n - n % _ROW_BLOCK if t.dtype in _JIT_DTYPES and t.device.type == "cpu" else n


def _mm_rows(a_nK: Tensor, w_KN: Tensor, out_nN: Tensor) -> None:
    """out = a @ w over one expert's bulk rows (its tail: ``_Tails``)."""
    bulk = _bulk_rows(a_nK.shape[0], a_nK)
    if bulk:
        torch.mm(a_nK[:bulk], w_KN, out=out_nN[:bulk])


def _mm_weight(a_nM: Tensor, b_nN: Tensor, out_MN: Tensor) -> None:
    """out = a^T b over one expert's bulk rows: a weight gradient (its tail is added by ``_Tails``)."""
    bulk = _bulk_rows(a_nM.shape[0], a_nM)
    if bulk:
        torch.mm(a_nM[:bulk].t(), b_nN[:bulk], out=out_MN)
    else:
        out_MN.zero_()


class _Tails:
    """The < _ROW_BLOCK tail rows of the experts, gathered into one zero-padded [U, _ROW_BLOCK, K] scratch block
    per stage (block u: the u-th expert with a tail), so every tail GEMM has one shape whatever the routing (one
    oneDNN primitive). When at least 3/4 of the E experts have a tail (training sizes) the blocks are all E,
    indexed by expert, and each stage is ONE batched GEMM on the stacked weights in place: one call instead of E
    small GEMMs (*ad hoc*, preset small's shapes in bf16: the E small GEMMs per stage cost ~3 ms per layer
    fwd+bwd). When fewer do (a few tokens over many experts) each runs its own GEMM on its block: a batched GEMM
    would compute and read every expert, or a gathered copy of the weights (*ad hoc*: 3 of 8 experts, bf16, 32 rows
    on [512, 2816] weights: 884 us as 3 GEMMs, 3100 us batched over all 8, 6073 us gathered + batched). Each
    stage's tails run before or after the per-expert work, wherever their inputs are ready."""

    __slots__ = ("src", "dst", "experts", "U")

    def __init__(self, src: Tensor, dst: Tensor, experts: list[int] | None, U: int):
        self.src, self.dst, self.experts, self.U = src, dst, experts, U

    @staticmethod
    def of(seg: _Segments, t: Tensor, single_rows: bool = True) -> _Tails | None:
        """``single_rows=False``: leave out experts with one row (the forward runs those as matrix-vector
        products: no 32x padding)."""
        spans = seg.spans if single_rows else [s for s in seg.spans if s[2] > 1]
        tails = [(e, start + n - r, r) for e, start, n in spans if (r := n - _bulk_rows(n, t))]
        if not tails:
            return None
        E = seg.n_experts
        few = 4 * len(tails) < 3 * E
        src: list[int] = []
        dst: list[int] = []
        for u, (e, start, r) in enumerate(tails):
            block = u if few else e
            src.extend(range(start, start + r))
            dst.extend(range(block * _ROW_BLOCK, block * _ROW_BLOCK + r))
        return _Tails(torch.tensor(src, device=t.device), torch.tensor(dst, device=t.device),
                      [e for e, _, _ in tails] if few else None, len(tails) if few else E)

    def block(self, name: str, rows_AK: Tensor) -> Tensor:
        """The tails of rows_AK in a zero-padded [U, _ROW_BLOCK, K] scratch block."""
        K = rows_AK.shape[1]
        block = _SCRATCH.get(name, (self.U * _ROW_BLOCK, K), rows_AK.dtype, rows_AK.device).zero_()
        return block.index_copy_(0, self.dst, rows_AK.index_select(0, self.src)).view(self.U, _ROW_BLOCK, K)

    def mm(self, a_AK: Tensor, w_EKN: Tensor, out_AN: Tensor) -> None:
        """out[tail rows of e] = a[tail rows of e] @ w[e] for every expert with a tail."""
        a_UBK = self.block("tail_a", a_AK)
        if self.experts is None:
            res_UBN = torch.bmm(a_UBK, w_EKN)
        else:
            res_UBN = a_UBK.new_empty(self.U, _ROW_BLOCK, w_EKN.shape[2])
            for u, e in enumerate(self.experts):
                torch.mm(a_UBK[u], w_EKN[e], out=res_UBN[u])
        out_AN.index_copy_(0, self.src, res_UBN.view(self.U * _ROW_BLOCK, -1).index_select(0, self.dst))

    def add_weight(self, a_AM: Tensor, b_AN: Tensor, out_EMN: Tensor) -> None:
        """out[e] += a[tail rows of e]^T b[tail rows of e] (the padding rows are zero in both operands)."""
        a_UMB, b_UBN = self.block("tail_a", a_AM).transpose(1, 2), self.block("tail_b", b_AN)
        if self.experts is None:
            out_EMN.baddbmm_(a_UMB, b_UBN)
        else:
            for u, e in enumerate(self.experts):
                out_EMN[e].addmm_(a_UMB[u], b_UBN[u])


def _thread_flops(device: torch.device, A: int, w_in_EID: Tensor, w_out_EDF: Tensor) -> float:
    """The forward GEMM FLOPs of a call, as ``_ExpertThreads`` weighs them; 0 (inline) off the CPU, where the
    kernels queue on the device's stream and host threads would only add hand-overs."""
    if device.type != "cpu":
        return 0.0
    return 2.0 * A * (w_in_EID.shape[1] * w_in_EID.shape[2] + w_out_EDF.shape[1] * w_out_EDF.shape[2])


def _experts_forward(x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, b_in_EI: Tensor | None,
                     b_out_ED: Tensor | None, seg: _Segments, act: _ActSpec, keep: bool):
    """y = W_out act(W_in x + b_in) + b_out per expert. ``keep``: h, a (and s) are saved for a backward,
    so they are fresh tensors; otherwise they are scratch."""
    A, I, Fw = x_AD.shape[0], w_in_EID.shape[1], w_out_EDF.shape[2]
    dev, dt = x_AD.device, x_AD.dtype
    a_AF = x_AD.new_empty(A, Fw) if keep else _SCRATCH.get("a", (A, Fw), dt, dev)
    s_AF = x_AD.new_empty(A, Fw) if keep and act.name == "swiglu" else None
    if seg.spans is None:  # grouped
        h_AI = _grouped_mm(x_AD, w_in_EID.transpose(1, 2), offs=seg.offs_E)
        if b_in_EI is not None:
            h_AI += b_in_EI.index_select(0, seg.expert_idx_A)
        act.forward_into(h_AI, a_AF, s_AF)
        y_AD = _grouped_mm(a_AF, w_out_EDF.transpose(1, 2), offs=seg.offs_E)
        if b_out_ED is not None:
            y_AD += b_out_ED.index_select(0, seg.expert_idx_A)
        return y_AD, h_AI, a_AF, s_AF

    h_AI = x_AD.new_empty(A, I) if keep else _SCRATCH.get("h", (A, I), dt, dev)
    y_AD = x_AD.new_empty(A, w_out_EDF.shape[1])
    tails = _Tails.of(seg, x_AD, single_rows=False)
    if tails is not None:
        tails.mm(x_AD, w_in_EID.transpose(1, 2), h_AI)

    def expert(e: int, start: int, n: int) -> None:
        rows = slice(start, start + n)
        if n == 1:  # one row: a matrix-vector product (bf16 mv reads ~1.3x faster than mm)
            torch.mv(w_in_EID[e], x_AD[start], out=h_AI[start])
        else:
            _mm_rows(x_AD[rows], w_in_EID[e].t(), h_AI[rows])
        h = h_AI[rows]
        if b_in_EI is not None:
            h += b_in_EI[e]
        act.forward_into(h, a_AF[rows], None if s_AF is None else s_AF[rows])
        if n == 1:
            torch.mv(w_out_EDF[e], a_AF[start], out=y_AD[start])
        else:
            _mm_rows(a_AF[rows], w_out_EDF[e].t(), y_AD[rows])

    _EXPERT_THREADS.map(expert, seg.spans, _thread_flops(dev, A, w_in_EID, w_out_EDF))
    if tails is not None:
        tails.mm(a_AF, w_out_EDF.transpose(1, 2), y_AD)
    if b_out_ED is not None:
        y_AD += b_out_ED.index_select(0, seg.expert_idx_A)
    return y_AD, h_AI, a_AF, s_AF


def _experts_backward(dy_AD: Tensor, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, h_AI: Tensor, a_AF: Tensor,
                      s_AF: Tensor | None, seg: _Segments, act: _ActSpec, needs: tuple[bool, ...]):
    """Gradients (x, w_in, w_out, b_in, b_out); ``needs`` says which are wanted."""
    A, Fw = a_AF.shape
    dev, dt = dy_AD.device, dy_AD.dtype
    dh_AI = _SCRATCH.get("dh", tuple(h_AI.shape), dt, dev)
    if seg.spans is None:  # grouped
        dA_AF = _grouped_mm(dy_AD, w_out_EDF, offs=seg.offs_E)
        dw_out = _grouped_mm(dy_AD.t(), a_AF, offs=seg.offs_E) if needs[2] else None  # zeros for empty experts
        act.backward_into(dA_AF, h_AI, s_AF, dh_AI)
        dx = _grouped_mm(dh_AI, w_in_EID, offs=seg.offs_E) if needs[0] else None
        dw_in = _grouped_mm(dh_AI.t(), x_AD, offs=seg.offs_E) if needs[1] else None
        E = seg.n_experts
        db_in = dh_AI.new_zeros(E, dh_AI.shape[1]).index_add_(0, seg.expert_idx_A, dh_AI) if needs[3] else None
        db_out = dy_AD.new_zeros(E, dy_AD.shape[1]).index_add_(0, seg.expert_idx_A, dy_AD) if needs[4] else None
        return dx, dw_in, dw_out, db_in, db_out

    dA_AF = _SCRATCH.get("dA", (A, Fw), dt, dev)
    dx = x_AD.new_empty(x_AD.shape) if needs[0] else None
    dw_in = w_in_EID.new_empty(w_in_EID.shape) if needs[1] else None
    dw_out = w_out_EDF.new_empty(w_out_EDF.shape) if needs[2] else None
    db_in = dh_AI.new_empty(seg.n_experts, dh_AI.shape[1]) if needs[3] else None
    db_out = dy_AD.new_empty(seg.n_experts, dy_AD.shape[1]) if needs[4] else None
    for e in seg.empty_experts():  # an expert that received no row: exact zero gradients
        for g in (dw_in, dw_out, db_in, db_out):
            if g is not None:
                g[e].zero_()

    tails = _Tails.of(seg, dy_AD)
    if tails is not None:
        tails.mm(dy_AD, w_out_EDF, dA_AF)

    def expert(e: int, start: int, n: int) -> None:
        rows = slice(start, start + n)
        dy, dA = dy_AD[rows], dA_AF[rows]
        _mm_rows(dy, w_out_EDF[e], dA)
        if dw_out is not None:
            _mm_weight(dy, a_AF[rows], dw_out[e])
        dh = dh_AI[rows]
        act.backward_into(dA, h_AI[rows], None if s_AF is None else s_AF[rows], dh)
        if dx is not None:
            _mm_rows(dh, w_in_EID[e], dx[rows])
        if dw_in is not None:
            _mm_weight(dh, x_AD[rows], dw_in[e])
        if db_in is not None:
            torch.sum(dh, 0, out=db_in[e])
        if db_out is not None:
            torch.sum(dy, 0, out=db_out[e])

    _EXPERT_THREADS.map(expert, seg.spans, 2 * _thread_flops(dev, A, w_in_EID, w_out_EDF))
    if tails is not None:
        if dw_out is not None:
            tails.add_weight(dy_AD, a_AF, dw_out)
        if dx is not None:
            tails.mm(dh_AI, w_in_EID, dx)
        if dw_in is not None:
            tails.add_weight(dh_AI, x_AD, dw_in)
    return dx, dw_in, dw_out, db_in, db_out


class _ExpertsFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD, w_in_EID, w_out_EDF, b_in_EI, b_out_ED, seg, act):
        y_AD, h_AI, a_AF, s_AF = _experts_forward(x_AD, w_in_EID, w_out_EDF, b_in_EI, b_out_ED, seg, act, keep=True)
        ctx.seg, ctx.act = seg, act
        ctx.save_for_backward(x_AD, w_in_EID, w_out_EDF, h_AI, a_AF, s_AF)
        return y_AD

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_AD):
        x_AD, w_in_EID, w_out_EDF, h_AI, a_AF, s_AF = ctx.saved_tensors
        grads = _experts_backward(dy_AD.contiguous(), x_AD, w_in_EID, w_out_EDF, h_AI, a_AF, s_AF, ctx.seg, ctx.act,
                                  ctx.needs_input_grad[:5])
        return (*grads, None, None)


def experts_ffn(x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, b_in_EI: Tensor | None, b_out_ED: Tensor | None,
                seg: _Segments, act: _ActSpec) -> Tensor:
    """y_AD: every expert's FFN on its rows (``_ExpertsFFN``; without autograd, straight to the forward)."""
    tensors = (x_AD, w_in_EID, w_out_EDF, b_in_EI, b_out_ED)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _ExpertsFFN.apply(*tensors, seg, act)
    return _experts_forward(*tensors, seg, act, keep=False)[0]


# ---------------------------------------------------------------------------------------------- compiled
# backend="compiled": the MoE layer's forward goes through torch.compile (``moekit.moe``). The experts are
# one opaque custom op there, ``moekit::experts_ffn`` (the loop flavour above on the CPU, grouped on other
# devices where grouped_mm runs the dtype), so the compiled graph never sees the per-expert row counts: its
# shapes depend on T only and it does not recompile when the routing changes. Inductor fuses the router,
# dispatch and combine around it.


def _op_segments(rows_E: Tensor, expert_idx_A: Tensor, x_AD: Tensor, w_out_EDF: Tensor) -> _Segments:
    """grouped off the CPU where grouped_mm runs this dtype and these widths (no host sync); else the loop."""
    grouped = (x_AD.device.type != "cpu" and grouped_mm_available(x_AD.device, x_AD.dtype)
               and grouped_mm_aligned(x_AD.dtype, tuple(w_out_EDF.shape[1:])))
    return _Segments(rows_E, expert_idx_A, grouped=grouped)


@torch.library.custom_op("moekit::experts_ffn", mutates_args=(), schema=(
    "(Tensor x, Tensor w_in, Tensor w_out, Tensor? b_in, Tensor? b_out, Tensor rows_E, Tensor expert_idx, "
    "str activation, float limit, float alpha, bool keep) -> (Tensor, Tensor, Tensor, Tensor)"))
def _experts_ffn_op(x, w_in, w_out, b_in, b_out, rows_E, expert_idx, activation, limit, alpha, keep):
    act = _ActSpec(activation, limit, alpha, w_out.shape[2])
    y, h, a, s = _experts_forward(x, w_in, w_out, b_in, b_out, _op_segments(rows_E, expert_idx, x, w_out), act, keep)
    if not keep:  # h and a are scratch: never hand them out
        return y, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return y, h, a, x.new_empty(0) if s is None else s


@_experts_ffn_op.register_fake
def _(x, w_in, w_out, b_in, b_out, rows_E, expert_idx, activation, limit, alpha, keep):
    A, Fw = x.shape[0], w_out.shape[2]
    if not keep:
        return x.new_empty(A, w_out.shape[1]), x.new_empty(0), x.new_empty(0), x.new_empty(0)
    s = x.new_empty(A, Fw) if activation == "swiglu" else x.new_empty(0)
    return x.new_empty(A, w_out.shape[1]), x.new_empty(A, w_in.shape[1]), x.new_empty(A, Fw), s


@torch.library.custom_op("moekit::experts_ffn_backward", mutates_args=(), schema=(
    "(Tensor dy, Tensor x, Tensor w_in, Tensor w_out, Tensor h, Tensor a, Tensor s, Tensor rows_E, "
    "Tensor expert_idx, str activation, float limit, float alpha, bool[] needs) -> Tensor[]"))
def _experts_ffn_backward_op(dy, x, w_in, w_out, h, a, s, rows_E, expert_idx, activation, limit, alpha, needs):
    act = _ActSpec(activation, limit, alpha, w_out.shape[2])
    grads = _experts_backward(dy.contiguous(), x, w_in, w_out, h, a, s if s.numel() else None,
                              _op_segments(rows_E, expert_idx, x, w_out), act, tuple(needs))
    return [x.new_empty(0) if g is None else g for g in grads]


@_experts_ffn_backward_op.register_fake
def _(dy, x, w_in, w_out, h, a, s, rows_E, expert_idx, activation, limit, alpha, needs):
    E = w_in.shape[0]
    shapes = [x.shape, w_in.shape, w_out.shape, (E, h.shape[1]), (E, dy.shape[1])]
    return [x.new_empty(shape) if need else x.new_empty(0) for shape, need in zip(shapes, needs)]


def _experts_ffn_setup(ctx, inputs, output):
    x, w_in, w_out, b_in, b_out, rows_E, expert_idx, activation, limit, alpha, keep = inputs
    _, h, a, s = output
    ctx.save_for_backward(x, w_in, w_out, h, a, s, rows_E, expert_idx)
    ctx.act = (activation, limit, alpha)
    ctx.has_b = (b_in is not None, b_out is not None)


def _experts_ffn_grad(ctx, dy, *_unused):
    x, w_in, w_out, h, a, s, rows_E, expert_idx = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]] + [ctx.has_b[0] and bool(ctx.needs_input_grad[3]),
                                                          ctx.has_b[1] and bool(ctx.needs_input_grad[4])]
    grads = _experts_ffn_backward_op(dy, x, w_in, w_out, h, a, s, rows_E, expert_idx, *ctx.act, needs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None, None, None, None, None)


_experts_ffn_op.register_autograd(_experts_ffn_grad, setup_context=_experts_ffn_setup)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (grouped_mm is not on autocast's op lists), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# torch.nn.functional.grouped_mm (torch >= 2.10), else its private predecessor torch._grouped_mm (same signature;
# CUDA from 2.8, the CPU from 2.9), else None: no grouped backend
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}
_LOGGED: set[tuple[str, str, torch.dtype, str]] = set()


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """The one capability check: does a tiny grouped_mm run and give the right answer here, in both forms the
    grouped backend uses (rows x stacked weights, and the weight gradients' transposed rows x rows)?"""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        ok = _grouped_mm is not None and dtype in (torch.float32, torch.bfloat16, torch.float16)
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(32, 16, generator=g).to(device, dtype)
                b = torch.randn(2, 16, 16, generator=g).to(device, dtype)
                offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
                out = _grouped_mm(a, b.transpose(1, 2), offs=offs)
                ref = torch.cat([a[:16] @ b[0].T, a[16:] @ b[1].T])
                dw = _grouped_mm(out.t(), a, offs=offs)  # [2, 16, 16]: per group out^T a, as dW = dy^T a
                dw_ref = torch.stack([out[:16].T @ a[:16], out[16:].T @ a[16:]])
                close = functools.partial(torch.allclose, rtol=5e-2, atol=5e-2 * math.sqrt(16))
                ok = bool(close(out.float(), ref.float())) and bool(close(dw.float(), dw_ref.float()))
            except (RuntimeError, TypeError, NotImplementedError) as e:  # no kernel for this device/dtype
                log.debug("grouped_mm unavailable on %s %s: %s: %s", device.type, dtype, type(e).__name__, e)
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


def _cpu_bf16_without_amx() -> bool:
    """Native bf16 through oneDNN's AVX-512-BF16 kernels, without AMX tiles (``moekit.host``): the host kind on
    which grouped_mm measured faster than the threaded loop for large bf16 calls."""
    return probe_host().kind == "AVX-512-BF16"


def grouped_mm_aligned(dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """grouped_mm (forward and backward) needs every row stride to be a multiple of 16 bytes: the model
    dim and the expert width must be multiples of 4 (fp32) or 8 (bf16/fp16) elements."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(w * size % 16 == 0 for w in widths)


def select_backend(requested: str, device: torch.device, dtype: torch.dtype, widths: tuple[int, ...] = (),
                   rows: int | None = None) -> str:
    """``widths``: the feature widths the experts multiply (dim, expert ffn width), for grouped_mm's alignment;
    ``rows``: the sorted rows of the call (None: unknown).

    auto: on the CPU, the loop backend for any call of real size (bf16 GEMM shapes the oneDNN cache keeps,
    see _ROW_BLOCK; the expert threads for large calls, see _ExpertThreads): benchmarks/RESULTS.md measures
    it fastest there. Otherwise grouped where grouped_mm works (CUDA: one grouped GEMM per stage, no host
    sync), else loop. Where this returns loop for a large CPU training call, the MoE layer around it runs
    through torch.compile (``moekit.moe._AutoCompile``) and the loop as the compiled backend's opaque op.
    """
    aligned = grouped_mm_aligned(dtype, widths)
    if requested == "auto":
        # (SwiGLU FLOPs of the call; below, e.g. the tests' toy layers, grouped_mm's single call is cheaper)
        flops = 6.0 * rows * widths[0] * widths[1] if rows is not None and len(widths) >= 2 else 0.0
        if device.type == "cpu" and flops >= 2e5:
            chosen = "loop"
            if (dtype in _JIT_DTYPES and flops >= _ExpertThreads.min_flops and _cpu_bf16_without_amx() and aligned
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
