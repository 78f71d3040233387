"""HQQ, half-quadratic quantization (Badri & Shaji 2023): calibration-free, the zero (and optionally the scale) of
every group fitted to the weights under a sparsity-promoting l_p error, p < 1.

Legend: O output rows, G groups per row, g group size (any leading dims before O: stacked experts).

The problem per group is  min_z  phi(w - s (Q_z(w) - z)),  phi(e) = sum |e|^p,  Q_z(w) = clamp(round(w / s + z)).
Half-quadratic splitting adds the error as its own variable w_e and alternates two closed-form steps
(the HQQ write-up, "Optimization"):

    w_e <- shrink_p(w - s (Q_z(w) - z), beta)     shrink_p(x) = sign(x) relu(|x| - |x|^(p-1) / beta)
    z   <- mean_g(Q_z(w) - (w - w_e) / s)          the least-squares zero given w_e
    beta <- kappa beta

with the paper's defaults p = 0.7, beta = 10, kappa = 1.01, 20 iterations. The shrinkage lets a few large errors
(outliers) stay large so that the rest fit tightly. Each group keeps the zero of its lowest error seen (the
reference stops the whole tensor at the first increase; per group is the same rule, vectorised). With
``optimize_scale`` the scale gets its least-squares step too, s <- <w - w_e, q - z> / |q - z|^2; a symmetric weight
(fixed zero) optimises only its scale. The zero is a float (stored fp16), the codes are recomputed with the stored
fp16 scale and zero, so the tensor reproduces exactly what was measured.

Imports: ``moekit.compress.quantize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.compress.quantize import (SCALE_DTYPE, QuantizedTensor, QuantSpec, encode, from_codes, group_view,
                                      rtn_params)


@dataclass(frozen=True)
class HQQConfig:
    """The solver's settings (the paper's defaults)."""

    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    optimize_scale: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.p < 1:
            raise ValueError(f"p: the l_p error needs 0 < p < 1, got {self.p}")
        if self.beta <= 0 or self.kappa < 1:
            raise ValueError(f"beta/kappa: need beta > 0 and kappa >= 1, got {self.beta}, {self.kappa}")
        if self.iters < 1:
            raise ValueError(f"iters: must be >= 1, got {self.iters}")


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """The generalised soft-thresholding operator of the l_p (p < 1) proximal step (HQQ eq. for w_e)."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


def lp_error(e_XOGg: Tensor, p: float) -> Tensor:
    """phi per group: sum |e|^p over the group, [..., O, G]."""
    return e_XOGg.abs().pow(p).sum(-1)


def quantize_hqq(w: Tensor, spec: QuantSpec, cfg: HQQConfig | None = None) -> QuantizedTensor:
    """HQQ group-wise quantization of w [..., O, I], vectorised over every leading dim and group."""
    cfg = cfg or HQQConfig()
    if w.dim() < 2:
        raise ValueError(f"quantize: a weight is [..., out, in], got shape {list(w.shape)}")
    g = spec.group_for(w.shape[-1])
    w_XOGg = group_view(w, g)
    acc = w_XOGg.dtype
    maxq = (1 << spec.bits) - 1
    # the start is round-to-nearest's own scale and zero: as the best per group is kept, HQQ's l_p error is never
    # above RTN's
    scale_XOG, zero_XOG = rtn_params(w_XOGg, spec.bits, spec.symmetric)
    scale_XOG = scale_XOG.to(acc)
    zero_XOG = (torch.full_like(scale_XOG, float(1 << (spec.bits - 1))) if zero_XOG is None else zero_XOG.to(acc))
    fit_zero, fit_scale = not spec.symmetric, cfg.optimize_scale or spec.symmetric

    def stored(s: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:  # what the tensor will hold: fp16 values
        return s.to(SCALE_DTYPE).clamp_min(2.0**-24).to(acc), z.to(SCALE_DTYPE).to(acc)

    def error(s: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        s, z = stored(s, z)
        q = torch.round(w_XOGg / s[..., None] + z[..., None]).clamp(0, maxq)
        return q, lp_error(w_XOGg - s[..., None] * (q - z[..., None]), cfg.p)

    q, best_err = error(scale_XOG, zero_XOG)
    best_s, best_z = scale_XOG.clone(), zero_XOG.clone()
    beta = cfg.beta
    for _ in range(cfg.iters):  # iterations of the solver; groups and experts are vectorised
        s, z = scale_XOG[..., None], zero_XOG[..., None]
        w_e = shrink_lp(w_XOGg - s * (q - z), beta, cfg.p)
        target = w_XOGg - w_e
        if fit_zero:
            zero_XOG = (q - target / s).mean(-1)
        if fit_scale:
            d = q - zero_XOG[..., None]
            den = (d * d).sum(-1)
            scale_XOG = torch.where(den > 0, (target * d).sum(-1) / den.clamp_min(1e-20), scale_XOG).abs()
            scale_XOG = scale_XOG.clamp_min(1e-8)
        beta *= cfg.kappa
        q, err = error(scale_XOG, zero_XOG)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, scale_XOG, best_s), torch.where(better, zero_XOG, best_z)
    s16 = best_s.to(SCALE_DTYPE).clamp_min(2.0**-24)
    z16 = None if spec.symmetric else best_z.to(SCALE_DTYPE)
    return from_codes(encode(w_XOGg, s16, z16, spec.bits), s16, z16, spec, tuple(w.shape))
