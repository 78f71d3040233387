"""What an expert computes: the feed-forward network and its activations, as plain PyTorch math.

Legend: A rows, D dim, I = input-projection width (2F for SwiGLU: gate rows then up rows, as HF's fused
``gate_up_proj``; F for GELU), F ffn width.

Activations: "swiglu" (Shazeer 2020), "gelu", and "swiglu_clamped", gpt-oss's variant (reference doc section
1.7; HF ``GptOssExperts._apply_gate``): gate clamped above at ``limit``, up clamped to [-limit, limit],
out = (up + 1) * gate * sigmoid(alpha * gate). gpt-oss stores gate and up interleaved (even/odd columns);
moekit keeps the [gate | up] row layout and converts on load/export (``moekit/formats/hf/weights.py``), so every
activation shares this one code path. Optional biases (``b_in [I]``/``b_out [D]``) serve gpt-oss and Llama's
``mlp_bias``.

The dense MLP, the shared experts and every routed expert compute this ``ffn``; the kernels in
``moekit/layer/kernels/`` compute the same function faster (tested against it). Imports: torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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



def compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (grouped_mm is not on autocast's op lists), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def needs_grad(x: Tensor, module: nn.Module) -> bool:
    """Will autograd need this call's graph (x or the module's parameters require grad)?"""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
