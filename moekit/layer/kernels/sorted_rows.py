"""The experts on rows sorted by expert: ONE autograd Function with a hand-written backward, in two flavours
(``loop``: a GEMM pair per expert slice, on the expert threads; ``grouped``: grouped_mm over all slices).

Legend: A rows (sorted token-expert assignments), D dim, E experts, F ffn width, I input-projection width
(2F for SwiGLU), U experts with a tail block, B = ``ROW_BLOCK`` rows.

The maths is ``moekit.layer.ffn.ffn`` per expert (tests/layer/test_backends.py checks every flavour against
the float64 reference, forward and gradients). Imports: ``moekit.layer.ffn`` and the other kernels.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.layer.ffn import activate
from moekit.layer.kernels.grouped import grouped_mm
from moekit.layer.kernels.scratch import SCRATCH
from moekit.layer.kernels.threads import EXPERT_THREADS

# ---------------------------------------------------------------------------------------------- execution
#
# The sorted-rows experts are ONE autograd Function (``ExpertsFFN``) with the backward written out:
#   forward   h = x W_in^T  (per expert)      a = act(h)       y = a W_out^T  (per expert)
#   backward  dA = dy W_out   dW_out = dy^T a   dh = act'(h, dA)   dx = dh W_in   dW_in = dh^T x
# Against autograd over ``ffn`` this saves, per call: the [A, I] ``cat`` that ``chunk``'s backward
# builds (dg and du are written into the two halves of one dh buffer), zero-filled gradient buffers
# (each expert's weight gradient is written once, by its GEMM; only an expert without rows is zeroed),
# and fresh [A, F] / [A, I] temporaries (dA, dh, and an inference forward's h, a come from
# ``SCRATCH``). Two flavours run the same maths:
#   loop     per expert: its whole FFN (GEMMs and activation) on its contiguous rows. On the CPU the
#            experts run side by side on ``torch.get_num_threads()`` worker threads with ONE intra-op
#            thread each (``EXPERT_THREADS``): no barrier per GEMM, each expert's rows stay in its
#            core's cache between the GEMMs and the activation. One host read of the row counts.
#   grouped  stage by stage over all rows, every GEMM a ``grouped_mm`` with device offsets: no host
#            sync (CUDA graphs, expert parallelism); on CUDA one grouped GEMM kernel per stage.


class Segments:
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



class ActSpec:
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
# benchmarks/RESULTS.md). Splitting the rows into a multiple of ROW_BLOCK and a tail of < ROW_BLOCK rows
# keeps the distinct shapes to a few dozen per GEMM. The tail is copied into a zero-padded [ROW_BLOCK, K] scratch
# block, so it is always the same shape too: with tails of their own size (1..31 rows, each GEMM kind) the cache
# held ~500 MB of compiled GEMMs after 60 training steps of the small preset, and kept growing (measured: process
# RSS 1.68 GB against 1.15 GB with the cache off). fp32 goes to MKL, which compiles nothing per shape.
ROW_BLOCK = 32
JIT_DTYPES = (torch.bfloat16, torch.float16)


def _bulk_rows(n: int, t: Tensor) -> int:
    return n - n % ROW_BLOCK if t.dtype in JIT_DTYPES and t.device.type == "cpu" else n


def _mm_rows(a_nK: Tensor, w_KN: Tensor, out_nN: Tensor) -> None:
    """out = a @ w over one expert's bulk rows (its tail: ``Tails``)."""
    bulk = _bulk_rows(a_nK.shape[0], a_nK)
    if bulk:
        torch.mm(a_nK[:bulk], w_KN, out=out_nN[:bulk])


def _mm_weight(a_nM: Tensor, b_nN: Tensor, out_MN: Tensor) -> None:
    """out = a^T b over one expert's bulk rows: a weight gradient (its tail is added by ``Tails``)."""
    bulk = _bulk_rows(a_nM.shape[0], a_nM)
    if bulk:
        torch.mm(a_nM[:bulk].t(), b_nN[:bulk], out=out_MN)
    else:
        out_MN.zero_()


class Tails:
    """The < ROW_BLOCK tail rows of the experts, gathered into one zero-padded [U, ROW_BLOCK, K] scratch block
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
    def of(seg: Segments, t: Tensor, single_rows: bool = True) -> Tails | None:
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
            dst.extend(range(block * ROW_BLOCK, block * ROW_BLOCK + r))
        return Tails(torch.tensor(src, device=t.device), torch.tensor(dst, device=t.device),
                      [e for e, _, _ in tails] if few else None, len(tails) if few else E)

    def block(self, name: str, rows_AK: Tensor) -> Tensor:
        """The tails of rows_AK in a zero-padded [U, ROW_BLOCK, K] scratch block."""
        K = rows_AK.shape[1]
        block = SCRATCH.get(name, (self.U * ROW_BLOCK, K), rows_AK.dtype, rows_AK.device).zero_()
        return block.index_copy_(0, self.dst, rows_AK.index_select(0, self.src)).view(self.U, ROW_BLOCK, K)

    def mm(self, a_AK: Tensor, w_EKN: Tensor, out_AN: Tensor) -> None:
        """out[tail rows of e] = a[tail rows of e] @ w[e] for every expert with a tail."""
        a_UBK = self.block("tail_a", a_AK)
        if self.experts is None:
            res_UBN = torch.bmm(a_UBK, w_EKN)
        else:
            res_UBN = a_UBK.new_empty(self.U, ROW_BLOCK, w_EKN.shape[2])
            for u, e in enumerate(self.experts):
                torch.mm(a_UBK[u], w_EKN[e], out=res_UBN[u])
        out_AN.index_copy_(0, self.src, res_UBN.view(self.U * ROW_BLOCK, -1).index_select(0, self.dst))

    def add_weight(self, a_AM: Tensor, b_AN: Tensor, out_EMN: Tensor) -> None:
        """out[e] += a[tail rows of e]^T b[tail rows of e] (the padding rows are zero in both operands)."""
        a_UMB, b_UBN = self.block("tail_a", a_AM).transpose(1, 2), self.block("tail_b", b_AN)
        if self.experts is None:
            out_EMN.baddbmm_(a_UMB, b_UBN)
        else:
            for u, e in enumerate(self.experts):
                out_EMN[e].addmm_(a_UMB[u], b_UBN[u])


def _thread_flops(device: torch.device, A: int, w_in_EID: Tensor, w_out_EDF: Tensor) -> float:
    """The forward GEMM FLOPs of a call, as ``ExpertThreads`` weighs them; 0 (inline) off the CPU, where the
    kernels queue on the device's stream and host threads would only add hand-overs."""
    if device.type != "cpu":
        return 0.0
    return 2.0 * A * (w_in_EID.shape[1] * w_in_EID.shape[2] + w_out_EDF.shape[1] * w_out_EDF.shape[2])


def experts_forward(x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, b_in_EI: Tensor | None,
                     b_out_ED: Tensor | None, seg: Segments, act: ActSpec, keep: bool):
    """y = W_out act(W_in x + b_in) + b_out per expert. ``keep``: h, a (and s) are saved for a backward,
    so they are fresh tensors; otherwise they are scratch."""
    A, I, Fw = x_AD.shape[0], w_in_EID.shape[1], w_out_EDF.shape[2]
    dev, dt = x_AD.device, x_AD.dtype
    a_AF = x_AD.new_empty(A, Fw) if keep else SCRATCH.get("a", (A, Fw), dt, dev)
    s_AF = x_AD.new_empty(A, Fw) if keep and act.name == "swiglu" else None
    if seg.spans is None:  # grouped
        h_AI = grouped_mm(x_AD, w_in_EID.transpose(1, 2), offs=seg.offs_E)
        if b_in_EI is not None:
            h_AI += b_in_EI.index_select(0, seg.expert_idx_A)
        act.forward_into(h_AI, a_AF, s_AF)
        y_AD = grouped_mm(a_AF, w_out_EDF.transpose(1, 2), offs=seg.offs_E)
        if b_out_ED is not None:
            y_AD += b_out_ED.index_select(0, seg.expert_idx_A)
        return y_AD, h_AI, a_AF, s_AF

    h_AI = x_AD.new_empty(A, I) if keep else SCRATCH.get("h", (A, I), dt, dev)
    y_AD = x_AD.new_empty(A, w_out_EDF.shape[1])
    tails = Tails.of(seg, x_AD, single_rows=False)
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

    EXPERT_THREADS.map(expert, seg.spans, _thread_flops(dev, A, w_in_EID, w_out_EDF))
    if tails is not None:
        tails.mm(a_AF, w_out_EDF.transpose(1, 2), y_AD)
    if b_out_ED is not None:
        y_AD += b_out_ED.index_select(0, seg.expert_idx_A)
    return y_AD, h_AI, a_AF, s_AF


def experts_backward(dy_AD: Tensor, x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, h_AI: Tensor, a_AF: Tensor,
                      s_AF: Tensor | None, seg: Segments, act: ActSpec, needs: tuple[bool, ...]):
    """Gradients (x, w_in, w_out, b_in, b_out); ``needs`` says which are wanted."""
    A, Fw = a_AF.shape
    dev, dt = dy_AD.device, dy_AD.dtype
    dh_AI = SCRATCH.get("dh", tuple(h_AI.shape), dt, dev)
    if seg.spans is None:  # grouped
        dA_AF = grouped_mm(dy_AD, w_out_EDF, offs=seg.offs_E)
        dw_out = grouped_mm(dy_AD.t(), a_AF, offs=seg.offs_E) if needs[2] else None  # zeros for empty experts
        act.backward_into(dA_AF, h_AI, s_AF, dh_AI)
        dx = grouped_mm(dh_AI, w_in_EID, offs=seg.offs_E) if needs[0] else None
        dw_in = grouped_mm(dh_AI.t(), x_AD, offs=seg.offs_E) if needs[1] else None
        E = seg.n_experts
        db_in = dh_AI.new_zeros(E, dh_AI.shape[1]).index_add_(0, seg.expert_idx_A, dh_AI) if needs[3] else None
        db_out = dy_AD.new_zeros(E, dy_AD.shape[1]).index_add_(0, seg.expert_idx_A, dy_AD) if needs[4] else None
        return dx, dw_in, dw_out, db_in, db_out

    dA_AF = SCRATCH.get("dA", (A, Fw), dt, dev)
    dx = x_AD.new_empty(x_AD.shape) if needs[0] else None
    dw_in = w_in_EID.new_empty(w_in_EID.shape) if needs[1] else None
    dw_out = w_out_EDF.new_empty(w_out_EDF.shape) if needs[2] else None
    db_in = dh_AI.new_empty(seg.n_experts, dh_AI.shape[1]) if needs[3] else None
    db_out = dy_AD.new_empty(seg.n_experts, dy_AD.shape[1]) if needs[4] else None
    for e in seg.empty_experts():  # an expert that received no row: exact zero gradients
        for g in (dw_in, dw_out, db_in, db_out):
            if g is not None:
                g[e].zero_()

    tails = Tails.of(seg, dy_AD)
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

    EXPERT_THREADS.map(expert, seg.spans, 2 * _thread_flops(dev, A, w_in_EID, w_out_EDF))
    if tails is not None:
        if dw_out is not None:
            tails.add_weight(dy_AD, a_AF, dw_out)
        if dx is not None:
            tails.mm(dh_AI, w_in_EID, dx)
        if dw_in is not None:
            tails.add_weight(dh_AI, x_AD, dw_in)
    return dx, dw_in, dw_out, db_in, db_out


class ExpertsFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD, w_in_EID, w_out_EDF, b_in_EI, b_out_ED, seg, act):
        y_AD, h_AI, a_AF, s_AF = experts_forward(x_AD, w_in_EID, w_out_EDF, b_in_EI, b_out_ED, seg, act, keep=True)
        ctx.seg, ctx.act = seg, act
        ctx.save_for_backward(x_AD, w_in_EID, w_out_EDF, h_AI, a_AF, s_AF)
        return y_AD

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_AD):
        x_AD, w_in_EID, w_out_EDF, h_AI, a_AF, s_AF = ctx.saved_tensors
        grads = experts_backward(dy_AD.contiguous(), x_AD, w_in_EID, w_out_EDF, h_AI, a_AF, s_AF, ctx.seg, ctx.act,
                                  ctx.needs_input_grad[:5])
        return (*grads, None, None)


def experts_ffn(x_AD: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor, b_in_EI: Tensor | None, b_out_ED: Tensor | None,
                seg: Segments, act: ActSpec) -> Tensor:
    """y_AD: every expert's FFN on its rows (``ExpertsFFN``; without autograd, straight to the forward)."""
    tensors = (x_AD, w_in_EID, w_out_EDF, b_in_EI, b_out_ED)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ExpertsFFN.apply(*tensors, seg, act)
    return experts_forward(*tensors, seg, act, keep=False)[0]

