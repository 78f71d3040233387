"""``moekit::experts_ffn``: the sorted-rows experts as one opaque custom op, for the compiled layer.

Imports: ``moekit.layer.kernels.sorted_rows`` and ``grouped``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.layer.kernels.grouped import grouped_mm_aligned, grouped_mm_available
from moekit.layer.kernels.sorted_rows import ActSpec, Segments, experts_backward, experts_forward

# ---------------------------------------------------------------------------------------------- compiled
# backend="compiled": the MoE layer's forward goes through torch.compile (``moekit.layer.moe``). The experts are
# one opaque custom op there, ``moekit::experts_ffn`` (the loop flavour above on the CPU, grouped on other
# devices where grouped_mm runs the dtype), so the compiled graph never sees the per-expert row counts: its
# shapes depend on T only and it does not recompile when the routing changes. Inductor fuses the router,
# dispatch and combine around it.


def _op_segments(rows_E: Tensor, expert_idx_A: Tensor, x_AD: Tensor, w_out_EDF: Tensor) -> Segments:
    """grouped off the CPU where grouped_mm runs this dtype and these widths (no host sync); else the loop."""
    grouped = (x_AD.device.type != "cpu" and grouped_mm_available(x_AD.device, x_AD.dtype)
               and grouped_mm_aligned(x_AD.dtype, tuple(w_out_EDF.shape[1:])))
    return Segments(rows_E, expert_idx_A, grouped=grouped)


@torch.library.custom_op("moekit::experts_ffn", mutates_args=(), schema=(
    "(Tensor x, Tensor w_in, Tensor w_out, Tensor? b_in, Tensor? b_out, Tensor rows_E, Tensor expert_idx, "
    "str activation, float limit, float alpha, bool keep) -> (Tensor, Tensor, Tensor, Tensor)"))
def experts_ffn_op(x, w_in, w_out, b_in, b_out, rows_E, expert_idx, activation, limit, alpha, keep):
    act = ActSpec(activation, limit, alpha, w_out.shape[2])
    y, h, a, s = experts_forward(x, w_in, w_out, b_in, b_out, _op_segments(rows_E, expert_idx, x, w_out), act, keep)
    if not keep:  # h and a are scratch: never hand them out
        return y, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return y, h, a, x.new_empty(0) if s is None else s


@experts_ffn_op.register_fake
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
    act = ActSpec(activation, limit, alpha, w_out.shape[2])
    grads = experts_backward(dy.contiguous(), x, w_in, w_out, h, a, s if s.numel() else None,
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


experts_ffn_op.register_autograd(_experts_ffn_grad, setup_context=_experts_ffn_setup)
