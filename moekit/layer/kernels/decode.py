"""Few-token inference (generation): the chosen experts' weights read once, no dispatch plan.

Legend: T tokens (a few), D dim, E experts, K top-k, I input-projection width, F ffn width.

``DECODE_KERNEL`` (``experts_decode`` through inductor), the dense FFN as a one-expert MoE for one token
(``decode_one_ffn``), the eager per-expert fallback (``decode_eager``) where inductor cannot build, and
``ROUTED_DECODE``, the router and the experts in one call. Same values as the general path
(tests/layer/test_perf_paths.py). Imports: ``moekit.layer.ffn``, ``router`` and the other kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.layer.ffn import activate, compute_dtype
from moekit.layer.kernels import matvec
from moekit.layer.kernels.inductor import InductorFn, accumulate_dtype
from moekit.layer.kernels.sorted_rows import ActSpec
from moekit.layer.router import RouteSpec, route, router_logits

DECODE_MAX_ROWS = 16  # token-expert rows up to which an inference call skips the dispatch plan (Experts.decode)
# ... and up to which it does so when all of a layer's experts fit CACHED_EXPERT_BYTES: the kernel reads an expert
# once per (token, expert) pair, which costs last-level-cache bandwidth there, not DRAM, while the dispatch plan's
# per-expert GEMMs cost 30-50 us each in MKL's small-matrix overhead on an AMD EPYC AVX2 host (preset small, 16
# sequences decoding together: 6.0 against 18.9 ms a step, benchmarks/RESULTS.md "Serving")
DECODE_MAX_ROWS_CACHED = 64
CACHED_EXPERT_BYTES = 16 * 2**20


def decode_rows_limit(w_in_EID: Tensor, w_out_EDF: Tensor) -> int:
    """Token-expert rows up to which few-token inference runs the decode kernel for these expert weights."""
    nbytes = w_in_EID.numel() * w_in_EID.element_size() + w_out_EDF.numel() * w_out_EDF.element_size()
    return DECODE_MAX_ROWS_CACHED if nbytes <= CACHED_EXPERT_BYTES else DECODE_MAX_ROWS


def experts_decode(x_TD: Tensor, idx_TK: Tensor, weight_TK: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor,
                   b_in_EI: Tensor | None, b_out_ED: Tensor | None, activation: str, limit: float,
                   alpha: float) -> Tensor:
    """out_t = sum_k w_tk expert_{e_tk}(x_t) for a few tokens, written as gathers of the chosen experts' weights
    and multiply-reduce. Compiled, it is one pass over each (token, expert) pair's weights (the gather becomes
    indirect loads inside the reduction, nothing is copied) with fp32 accumulation; an expert chosen by several
    of the tokens is read once per token (an [U, I, T] formulation that reads it once measured slower: inductor
    does not tile it like a GEMM). Run eagerly it copies the chosen weights (same values)."""
    acc = accumulate_dtype(x_TD, w_in_EID)
    T, K = idx_TK.shape
    x_TD_acc = x_TD.to(acc)
    if matvec.applies(x_TD_acc, w_in_EID) and matvec.applies(x_TD_acc, w_out_EDF):
        # the hand-written products (matvec.py): each chosen expert's rows read once per token, 4 FMA chains
        idx_R = idx_TK.reshape(-1)
        h_RI = torch.ops.moekit.experts_matvec(x_TD_acc, w_in_EID, idx_R)
        if b_in_EI is not None:
            h_RI = h_RI + b_in_EI[idx_R].to(acc)
        a_RF = activate(h_RI, activation, limit, alpha)
        y_RD = torch.ops.moekit.experts_matvec(a_RF, w_out_EDF, idx_R)
        if b_out_ED is not None:
            y_RD = y_RD + b_out_ED[idx_R].to(acc)
        return (y_RD.view(T, K, -1) * weight_TK.to(acc)[:, :, None]).sum(1).to(x_TD.dtype)
    x_T11D = x_TD_acc[:, None, None, :]
    h_TKI = (w_in_EID[idx_TK].to(acc) * x_T11D).sum(-1)
    if b_in_EI is not None:
        h_TKI = h_TKI + b_in_EI[idx_TK].to(acc)
    a_TK1F = activate(h_TKI, activation, limit, alpha)[:, :, None, :]
    y_TKD = (w_out_EDF[idx_TK].to(acc) * a_TK1F).sum(-1)
    if b_out_ED is not None:
        y_TKD = y_TKD + b_out_ED[idx_TK].to(acc)
    return (y_TKD * weight_TK.to(acc)[:, :, None]).sum(1).to(x_TD.dtype)


# The few-token inference step (generation) through TorchInductor (inductor.py). Decoding is bound by
# reading the active experts' weights, and PyTorch's eager CPU matrix-vector products read them slowly
# (torch.mv = MKL sgemv runs on one thread here; bf16 mv converts slowly): on [2816, 512] + [512, 1408]
# weights cycled over 8 experts, torch.mv reads 11 GB/s fp32 and 9 GB/s bf16, an inductor multiply-reduce
# 26 and 19 GB/s (benchmarks/RESULTS.md, "decode"). One compiled call also replaces the ~20 small ops per
# layer of the eager path (host read of the routing, per-expert products, activation, weighted sum).
# Where inductor cannot build (no C++ compiler) it warns once and the eager per-expert path runs instead;
# ``MOEKIT_KERNELS=eager`` selects that path.
# The top-k width K (idx_TK, weight_TK) is static: with a symbolic K inductor generated a single-threaded T=1
# kernel (800 against 510 us, benchmarks/RESULTS.md).
DECODE_KERNEL = InductorFn(experts_decode, "decode kernel", static_dims={1: (1,), 2: (1,)})


def mlp_kernel_rows(x: Tensor) -> int:
    """Rows up to which the dense MLP runs through the decode kernel on the CPU: one in bf16/fp16 (oneDNN's small
    GEMMs are fast), up to 8 in fp32/fp64, where MKL's GEMM with 2-8 rows is slower than reading the weights once
    per row (*ad hoc*, [2816, 512] + [512, 1408] fp32 cycled over 4 FFNs: T=2 1202 against 374 us, T=8 1306
    against 1049 us; bf16 T=3 234 against 400 us)."""
    return 8 if compute_dtype(x) in (torch.float32, torch.float64) else 1



def decode_one_ffn(mlp: nn.Module, x: Tensor) -> Tensor | None:
    """The dense FFN ``mlp`` (``moekit.layer.experts.MLP``) on a few tokens as a one-expert MoE: the decode kernel,
    or None where it cannot run."""
    x_TD = x.detach().reshape(-1, x.shape[-1]).to(compute_dtype(x))  # weights stay in their dtype (Experts.decode)
    T = x_TD.shape[0]
    one_T1 = torch.ones(T, 1, dtype=x_TD.dtype)
    zero_T1 = torch.zeros(T, 1, dtype=torch.long)
    b_in = None if mlp.b_in is None else mlp.b_in.detach()[None]
    b_out = None if mlp.b_out is None else mlp.b_out.detach()[None]
    out = DECODE_KERNEL((x_TD, zero_T1, one_T1, mlp.w_in.detach()[None], mlp.w_out.detach()[None], b_in, b_out),
                         (mlp.activation, mlp.limit, mlp.alpha))
    return None if out is None else out.view(*x.shape[:-1], -1)


def decode_eager(x_TD: Tensor, topk_idx_TK: Tensor, topk_weight_TK: Tensor, w_in_EID: Tensor, w_out_EDF: Tensor,
                 b_in: Tensor | None, b_out: Tensor | None, act: ActSpec) -> Tensor:
    """``experts_decode`` run eagerly, where the kernel cannot: each active expert once on its tokens
    (matrix-vector products for a single token), its output added into the token's row with the combine
    weight as the scale. Weights and ``x_TD`` are in the compute dtype."""
    dtype = x_TD.dtype
    slots: dict[int, list[tuple[int, float]]] = {}
    # the one host read (indices and weights together); on the CPU it waits for nothing
    for t, (row, w_row) in enumerate(zip(topk_idx_TK.tolist(), topk_weight_TK.tolist())):
        for e, w in zip(row, w_row):
            slots.setdefault(e, []).append((t, w))
    out_TD = x_TD.new_zeros(x_TD.shape[0], w_out_EDF.shape[1])

    def expert(e: int, tw: list[tuple[int, float]]) -> None:
        if len(tw) == 1:
            (t, w), = tw
            h_1I = torch.mv(w_in_EID[e], x_TD[t]).unsqueeze(0)
        else:
            t_idx = [t for t, _ in tw]
            h_1I = x_TD[t_idx] @ w_in_EID[e].t()
        if b_in is not None:
            h_1I += b_in[e]
        a_1F = h_1I.new_empty(h_1I.shape[0], act.F)
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


def route_and_decode(x_TD: Tensor, router_w_ED: Tensor, router_b_E: Tensor | None, expert_bias_E: Tensor | None,
                      w_in_EID: Tensor, w_out_EDF: Tensor, b_in_EI: Tensor | None, b_out_ED: Tensor | None,
                      spec: RouteSpec, dtype: torch.dtype, activation: str, limit: float,
                      alpha: float) -> tuple[Tensor, Tensor]:
    """Route (``Router`` without training noise) and run the chosen experts (``experts.experts_decode``)
    for a few tokens: the same values as the two run separately; compiled, one call per MoE layer. Returns the
    output and the chosen experts ``topk_idx_TK`` (for a caller that counts the expert load)."""
    routing = route(router_logits(x_TD, router_w_ED, router_b_E), spec, expert_bias_E)
    out_TD = experts_decode(x_TD.to(dtype), routing.topk_idx_TK, routing.topk_weight_TK, w_in_EID, w_out_EDF,
                            b_in_EI, b_out_ED, activation, limit, alpha)
    return out_TD, routing.topk_idx_TK


# one call per MoE layer and generated token: torch.compile's own per-call cost would be as large as the router
ROUTED_DECODE = InductorFn(route_and_decode, "routed decode kernel")
