"""Moving rows between token order and expert order: the gather before the experts and the weighted combine
after them, each an autograd Function with its own backward and, on the CPU, one inductor-compiled pass.

Legend: T tokens, K top-k, A = T*K rows (sorted by expert), D dim.

``inverse_A`` lists, in (token, k) order, where each token's k-th row sits among the sorted rows; ``token_idx_A``
is the token of each sorted row (``moekit.layer.dispatch.DispatchPlan``). Imports: ``moekit.layer.kernels.inductor``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.layer.kernels.inductor import InductorFn, accumulate_dtype


class GatherRows(torch.autograd.Function):
    """x_AD = x_TD[token_idx_A]. Autograd's backward of an index would zero-fill [T, D] and
    ``index_put_(accumulate=True)`` the A rows (about 10x slower on the CPU, benchmarks/RESULTS.md); here
    the K row gradients of each token are summed by ``sum_rows_per_token``."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_idx_A: Tensor, inverse_A: Tensor, K: int) -> Tensor:
        ctx.save_for_backward(inverse_A)
        ctx.K = K
        return x_TD.index_select(0, token_idx_A)

    @staticmethod
    def backward(ctx, g_AD: Tensor):
        (inverse_A,) = ctx.saved_tensors
        return sum_rows_per_token(g_AD, inverse_A, g_AD.shape[0] // ctx.K, ctx.K), None, None, None


def sum_rows_per_token(v_AD: Tensor, inverse_A: Tensor, T: int, K: int) -> Tensor:
    """out_t = the sum of the K rows of token t: the rows gathered in (t, k) order, then K - 1 adds. No
    atomics (deterministic on every device); ``index_add_`` is slower on the CPU (benchmarks/RESULTS.md).
    On the CPU one compiled pass (``SUM_ROWS``: gather and sum in fp32) where it builds."""
    if v_AD.device.type == "cpu" and v_AD.shape[0] and K > 1:
        out_TD = SUM_ROWS((v_AD, inverse_A), (K,))
        if out_TD is not None:
            return out_TD
    v_TKD = v_AD.index_select(0, inverse_A).view(T, K, -1)
    out_TD = v_TKD[:, 0].clone() if K == 1 else v_TKD[:, 0] + v_TKD[:, 1]
    for k in range(2, K):
        out_TD += v_TKD[:, k]
    return out_TD


def _sum_rows_kernel(v_AD: Tensor, inverse_A: Tensor, K: int) -> Tensor:
    """K - 1 adds of gathered rows, not a sum over a K dim (vectorised along D; see ``moe._combine_kernel``)."""
    idx_TK = inverse_A.view(-1, K)
    out_TD = v_AD[idx_TK[:, 0]].to(accumulate_dtype(v_AD))
    for k in range(1, K):
        out_TD = out_TD + v_AD[idx_TK[:, k]]
    return out_TD.to(v_AD.dtype)


SUM_ROWS = InductorFn(_sum_rows_kernel, "row-sum kernel")


def _combine_kernel(y_AD: Tensor, weight_A: Tensor, inverse_A: Tensor, K: int) -> Tensor:
    """out_t = sum_k w_tk y_tk, gathered through inverse_A and accumulated in fp32 (float64 for float64).
    The K terms are written as K - 1 adds, not a sum over a K dim: inductor vectorises a reduction over a
    dim of 8 along that dim, gathering from K rows per lane (*ad hoc*, T=4096, K=8, D=512 bf16: 32.6 ms,
    against the adds' vectors along D; benchmarks/RESULTS.md "What changed", item 10)."""
    idx_TK = inverse_A.view(-1, K)
    acc = accumulate_dtype(y_AD, weight_A)

    def term_TD(k: int) -> Tensor:
        rows_T = idx_TK[:, k]
        return y_AD[rows_T].to(acc) * weight_A[rows_T].to(acc).unsqueeze(-1)

    out_TD = term_TD(0)
    for k in range(1, K):
        out_TD = out_TD + term_TD(k)
    return out_TD.to(y_AD.dtype)


def _combine_backward_kernel(g_TD: Tensor, y_AD: Tensor, weight_A: Tensor,
                             token_idx_A: Tensor) -> tuple[Tensor, Tensor]:
    """dy_a = w_a g_t(a) and dw_a = <y_a, g_t(a)>, from one gather of g, accumulated in fp32."""
    acc = accumulate_dtype(g_TD, y_AD, weight_A)
    g_AD = g_TD[token_idx_A].to(acc)
    dw_A = (y_AD.to(acc) * g_AD).sum(-1).to(weight_A.dtype)
    return (g_AD * weight_A.to(acc).unsqueeze(-1)).to(y_AD.dtype), dw_A


# The gather, products and sum of combine, and of its backward, as one pass each: eagerly they are 4-5 passes
# over [T*K, D] (*ad hoc*, preset small's shapes in bf16: forward 306 -> 107 us, backward 840 -> 174 us per
# layer; +0.5 to +3.9 points of training tokens/s against the dense twin in interleaved runs, benchmarks/RESULTS.md
# "What changed", item 7). Any failure to build: the eager ops below, as before.
COMBINE = InductorFn(_combine_kernel, "combine kernel")
COMBINE_BACKWARD = InductorFn(_combine_backward_kernel, "combine backward kernel")


def combine_forward(y_AD: Tensor, weight_A: Tensor, inverse_A: Tensor, T: int, K: int) -> Tensor:
    if y_AD.device.type == "cpu" and y_AD.shape[0]:
        out_TD = COMBINE((y_AD.detach(), weight_A.detach(), inverse_A), (K,))
        if out_TD is not None:
            return out_TD
    return _weighted_sum(y_AD.index_select(0, inverse_A).view(T, K, -1), weight_A[inverse_A].view(T, K))


def _weighted_sum(y_TKD: Tensor, w_TK: Tensor) -> Tensor:
    """sum_k w_tk y_tk as K multiply-adds in y's dtype (a [T, 1, K] x [T, K, D] bmm costs more on the CPU)."""
    w_TK = w_TK.to(y_TKD.dtype)
    out_TD = y_TKD[:, 0] * w_TK[:, :1]
    for k in range(1, y_TKD.shape[1]):
        out_TD.addcmul_(y_TKD[:, k], w_TK[:, k:k + 1])
    return out_TD


class Combine(torch.autograd.Function):
    """``combine`` with a backward that stays in sorted-row order: dy_a = w_a g_t(a) and dw_a = <y_a, g_t(a)>
    from one gather of g, instead of autograd's [T, K, D] temporaries and zero-filled ``index_put_``."""

    @staticmethod
    def forward(ctx, y_AD, weight_A, token_idx_A, inverse_A, T, K):
        ctx.save_for_backward(y_AD, weight_A, token_idx_A)
        return combine_forward(y_AD, weight_A, inverse_A, T, K)

    @staticmethod
    def backward(ctx, g_TD):
        y_AD, weight_A, token_idx_A = ctx.saved_tensors
        if all(ctx.needs_input_grad[:2]) and g_TD.device.type == "cpu" and y_AD.shape[0]:
            grads = COMBINE_BACKWARD((g_TD, y_AD.detach(), weight_A.detach(), token_idx_A))
            if grads is not None:
                return grads[0], grads[1], None, None, None, None
        g_AD = g_TD.to(y_AD.dtype).index_select(0, token_idx_A)
        dw_A = None
        if ctx.needs_input_grad[1]:
            # products and sum in y's dtype (the sum accumulates in fp32); an fp32 upcast of [A, D] costs more
            dw_A = (y_AD * g_AD).sum(-1).to(weight_A.dtype)
        dy_AD = g_AD.mul_(weight_A.to(g_AD.dtype).unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return dy_AD, dw_A, None, None, None, None
