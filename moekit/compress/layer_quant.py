"""One layer's weights through a quantization method, and the error each choice costs on the layer's output.

Legend: E experts, I input-projection width (2F for SwiGLU), D dim, F ffn width, N rows of one expert, T tokens,
O output rows.

``quantize_weight`` is the one entry point per weight (``rtn``, ``hqq`` or ``gptq``; GPTQ needs the module's input
rows). ``quantize_experts`` runs a whole stack of E experts at one width, vectorised over experts; under GPTQ each
expert's Hessians come from the rows routed to it (``calibrate_all_experts``: every row, so rarely chosen experts
get statistics too), w_in first, then w_out from the activations of the *quantized* w_in (the paper's sequential
order). ``expert_output_errors`` is the allocator's measured cost: with only expert e quantized, the MoE layer's
output changes by w_te (f_e^q(x_t) - f_e(x_t)) on the tokens routed to it (the router is not quantized, so the
routing does not move), so the layer-output error ||out^q - out||^2 over the calibration rows is
sum_t w_te^2 ||f_e^q(x_t) - f_e(x_t)||^2, computed expert by expert without running the layer E times. This
already weighs the expert by how often (routing frequency) and how strongly (routing weight) it is used;
without calibration rows the weight-space error ||W - Q||^2 stands in.

Imports: ``moekit.compress`` (quantize, hqq, gptq, calibrate) and ``moekit.layer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.compress.calibrate import MoECalibration
from moekit.compress.gptq import hessian, quantize_gptq
from moekit.compress.hqq import HQQConfig, quantize_hqq
from moekit.compress.quantize import QuantizedTensor, QuantSpec, quantize_rtn
from moekit.layer.experts import MLP, Experts
from moekit.layer.ffn import activate, ffn

METHODS = ("rtn", "hqq", "gptq")


@dataclass(frozen=True)
class MethodConfig:
    """A method and its settings; ``spec`` gives the group size and symmetry (its ``bits`` is overridden per call)."""

    method: str = "rtn"
    spec: QuantSpec = field(default_factory=QuantSpec)
    hqq: HQQConfig = field(default_factory=HQQConfig)
    percdamp: float = 0.01
    act_order: bool = False
    calibrate_all_experts: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: unknown value {self.method!r}; expected one of {', '.join(METHODS)}")

    @property
    def needs_inputs(self) -> bool:
        return self.method == "gptq"


def quantize_weight(w: Tensor, bits: int, cfg: MethodConfig, hessian_II: Tensor | None = None,
                    n_rows: Tensor | None = None) -> QuantizedTensor:
    """w [..., O, I] at ``bits`` with ``cfg.method``; GPTQ takes the Hessian [..., I, I] of the weight's inputs."""
    spec = cfg.spec.with_bits(bits)
    if cfg.method == "rtn":
        return quantize_rtn(w, spec)
    if cfg.method == "hqq":
        return quantize_hqq(w, spec, cfg.hqq)
    if hessian_II is None:
        raise ValueError("gptq: needs calibration inputs (pass calib=... to compress)")
    return quantize_gptq(w, hessian_II, spec, cfg.percdamp, cfg.act_order, n_rows)


def _act(experts: Experts | MLP, h: Tensor) -> Tensor:
    return activate(h, experts.activation, experts.limit, experts.alpha)


def quantize_experts(experts: Experts, bits: int, cfg: MethodConfig,
                     cal: MoECalibration | None = None) -> tuple[QuantizedTensor, QuantizedTensor]:
    """(w_in [E, I, D], w_out [E, D, F]) of every expert at ``bits``."""
    w_in, w_out = experts.w_in.detach(), experts.w_out.detach()
    if not cfg.needs_inputs:
        return quantize_weight(w_in, bits, cfg), quantize_weight(w_out, bits, cfg)
    if cal is None:
        raise ValueError("gptq: needs calibration inputs (pass calib=... to compress)")
    E = experts.n_experts
    rows = [cal.routed(e, cfg.calibrate_all_experts)[0] for e in range(E)]
    n_E = torch.tensor([r.shape[0] for r in rows])
    H_in = torch.stack([hessian(r) for r in rows])
    q_in = quantize_weight(w_in, bits, cfg, H_in, n_E)
    w_in_q = q_in.dequantize(torch.float32)
    b_in = None if experts.b_in is None else experts.b_in.detach().float()
    acts = []
    for e in range(E):  # the quantized w_in's activations are w_out's inputs (sequential GPTQ)
        h = rows[e].float() @ w_in_q[e].t()
        acts.append(_act(experts, h if b_in is None else h + b_in[e]))
    H_out = torch.stack([hessian(a) for a in acts])
    return q_in, quantize_weight(w_out, bits, cfg, H_out, n_E)


def expert_output_errors(experts: Experts, q_in: QuantizedTensor, q_out: QuantizedTensor,
                         cal: MoECalibration) -> Tensor:
    """[E] float64: sum over routed tokens of w_te^2 ||f_e^q(x_t) - f_e(x_t)||^2 (the layer-output error with
    only expert e quantized; see the module docstring)."""
    wi, wo = q_in.dequantize(torch.float64), q_out.dequantize(torch.float64)
    err = torch.zeros(experts.n_experts, dtype=torch.float64)
    for e in range(experts.n_experts):
        x, w = cal.routed(e)
        if x.shape[0] == 0:
            continue
        x = x.double()
        b_in = None if experts.b_in is None else experts.b_in[e].detach().double()
        b_out = None if experts.b_out is None else experts.b_out[e].detach().double()
        args = (experts.activation, b_in, b_out, experts.limit, experts.alpha)
        ref = ffn(x, experts.w_in[e].detach().double(), experts.w_out[e].detach().double(), *args)
        got = ffn(x, wi[e], wo[e], *args)
        err[e] = ((got - ref) * w.double()[:, None]).pow(2).sum()
    return err


def weight_errors(w: Tensor, q: QuantizedTensor) -> Tensor:
    """Squared weight-space error per leading index (per expert for [E, O, I]; a scalar for [O, I])."""
    d = (q.dequantize(torch.float64) - w.detach().double()).pow(2)
    return d.sum((-2, -1))


def quantize_mlp(mlp: MLP, bits: int, cfg: MethodConfig,
                 x_ND: Tensor | None = None) -> tuple[QuantizedTensor, QuantizedTensor]:
    """(w_in [I, D], w_out [D, F]) of a dense FFN or shared expert at ``bits`` (GPTQ: inputs x [N, D])."""
    w_in, w_out = mlp.w_in.detach(), mlp.w_out.detach()
    if not cfg.needs_inputs:
        return quantize_weight(w_in, bits, cfg), quantize_weight(w_out, bits, cfg)
    if x_ND is None:
        raise ValueError("gptq: needs calibration inputs (pass calib=... to compress)")
    q_in = quantize_weight(w_in, bits, cfg, hessian(x_ND))
    h = x_ND.float() @ q_in.dequantize(torch.float32).t()
    if mlp.b_in is not None:
        h = h + mlp.b_in.detach().float()
    return q_in, quantize_weight(w_out, bits, cfg, hessian(_act(mlp, h)))


def mlp_output_error(mlp: MLP, q_in: QuantizedTensor, q_out: QuantizedTensor, x_ND: Tensor,
                     gate_N: Tensor | None = None) -> float:
    """||gate (f^q(x) - f(x))||^2 over the rows (the shared expert's term in the MoE output)."""
    x = x_ND.double()
    b_in = None if mlp.b_in is None else mlp.b_in.detach().double()
    b_out = None if mlp.b_out is None else mlp.b_out.detach().double()
    args = (mlp.activation, b_in, b_out, mlp.limit, mlp.alpha)
    d = ffn(x, q_in.dequantize(torch.float64), q_out.dequantize(torch.float64), *args) - ffn(
        x, mlp.w_in.detach().double(), mlp.w_out.detach().double(), *args)
    if gate_N is not None:
        d = d * gate_N.double()[:, None]
    return float(d.pow(2).sum())


def quantize_linear(weight_OI: Tensor, bits: int, cfg: MethodConfig, x_NI: Tensor | None = None) -> QuantizedTensor:
    """An attention projection's weight [O, I] at ``bits`` (GPTQ: its inputs x [N, I])."""
    if cfg.needs_inputs and x_NI is None:
        raise ValueError("gptq: needs calibration inputs (pass calib=... to compress)")
    return quantize_weight(weight_OI, bits, cfg, None if x_NI is None else hessian(x_NI))
