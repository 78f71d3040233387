"""GPTQ (Frantar et al. 2022): quantize a weight column by column, each column's rounding error pushed onto the
columns not yet quantized through the inverse Hessian of the layer's reconstruction error.

Legend: E experts (or 1), O output rows, I input columns, N calibration rows, G groups per row, g group size,
C columns of one block.

For a linear layer y = W x the error ||W X - Q X||^2 over calibration inputs X [N, I] has the Hessian
H = 2 X^T X / N (paper eq. 1-2; the 1/N keeps the damping's scale independent of N). The algorithm (paper
Algorithm 1): dampen H += lambda mean(diag H) I (``percdamp`` lambda, default 0.01), take the upper Cholesky factor
U of H^-1, then for each column i: q_i = quant(w_i), err = (w_i - q_i) / U_ii, w_{i+1:} -= err U_{i, i+1:}. Columns
run in blocks of C = 128 with the updates to later blocks applied once per block (lazy batch updates, paper
section "Step 2"). Scales and zeros are those of round-to-nearest taken over each group's *current* (already
compensated) weights when the group's first column is reached, as the reference ``gptq.py`` does.

``act_order`` quantizes columns in order of decreasing diag(H) (the reference's "desc_act"). The stored groups
are contiguous in the original column order, so with act-order every group's scale and zero are fixed before the
columns run, from the original weights (AutoGPTQ's ``static_groups``). Columns whose Hessian diagonal is zero (no
calibration signal) keep their weights and get diag 1 (the reference zeroes them, which would wipe the weights of
an expert that saw no calibration token); an expert without any calibration rows is given H = I, under which GPTQ
is round-to-nearest.

Every step is batched over the leading (expert) dim: E experts run the column loop together, each with its own H.

Imports: ``moekit.compress.quantize``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.compress.quantize import QuantizedTensor, QuantSpec, from_codes, group_view, rtn_params

BLOCK = 128  # columns per lazy batch update (the paper's B = 128)


def hessian(x_NI: Tensor, weight_N: Tensor | None = None) -> Tensor:
    """H = 2 X^T X / N in float64 (``weight_N`` scales each row's contribution; N = 0 gives H = 0). The identity
    stands in for an input without rows in :func:`quantize_gptq` (see the module docstring)."""
    x = x_NI.detach().to(torch.float64)
    if weight_N is not None:
        x = x * weight_N.detach().to(torch.float64).sqrt()[:, None]
    return 2 * x.t() @ x / max(1, x.shape[0])


def _damped_inverse_factor(H_EII: Tensor, percdamp: float) -> Tensor:
    """The upper Cholesky factor of (H + lambda mean(diag H) I)^-1, [E, I, I]; more damping if H is not positive
    definite in floating point."""
    E, I, _ = H_EII.shape
    eye = torch.eye(I, dtype=H_EII.dtype, device=H_EII.device)
    diag_EI = torch.diagonal(H_EII, dim1=-2, dim2=-1)
    mean_E = diag_EI.mean(-1).clamp_min(1e-12)
    damp = percdamp
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H_EII + damp * mean_E[:, None, None] * eye)
        if not info.any():
            break
        damp *= 10
    else:
        raise ValueError(f"gptq: the Hessian is not positive definite even with damping {damp:g}")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def _fix_dead(H_EII: Tensor, n_rows_E: Tensor | None) -> Tensor:
    """Zero-diagonal columns get diag 1; an expert with no calibration rows gets the identity (plain RTN)."""
    H = H_EII.clone()
    I = H.shape[-1]
    eye = torch.eye(I, dtype=H.dtype, device=H.device)
    if n_rows_E is not None:
        H = torch.where((n_rows_E == 0)[:, None, None], eye, H)
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    diag += (diag == 0).to(H.dtype)
    return H


def quantize_gptq(w: Tensor, H: Tensor, spec: QuantSpec, percdamp: float = 0.01, act_order: bool = False,
                  n_rows: Tensor | None = None) -> QuantizedTensor:
    """GPTQ of w [..., O, I] (one leading dim at most: [E, O, I]) with Hessians H [..., I, I] (``hessian``).
    ``n_rows`` [E]: calibration rows behind each H (experts with none fall back to round-to-nearest)."""
    if not 0 <= percdamp < 1:
        raise ValueError(f"percdamp: must be in [0, 1), got {percdamp}")
    if w.dim() not in (2, 3) or H.shape != (*w.shape[:-2], w.shape[-1], w.shape[-1]):
        raise ValueError(f"gptq: expected w [O, I] or [E, O, I] and H [.., I, I], got {list(w.shape)} and "
                         f"{list(H.shape)}")
    shape = tuple(w.shape)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().reshape(-1, *shape[-2:]).to(acc).clone()  # [E, O, I]
    E, O, I = W.shape
    H_EII = _fix_dead(H.detach().reshape(E, I, I).to(torch.float64), None if n_rows is None else n_rows.reshape(E))
    g = spec.group_for(I)
    G = math.ceil(I / g)
    maxq = (1 << spec.bits) - 1
    perm_EI = None
    if act_order:
        perm_EI = torch.argsort(torch.diagonal(H_EII, dim1=-2, dim2=-1), dim=-1, descending=True)
        # static groups: every group's scale/zero from the original weights, before any column moves
        scale_EOG, zero_EOG = rtn_params(group_view(W, g), spec.bits, spec.symmetric)
        W = W.gather(2, perm_EI[:, None, :].expand(E, O, I))
        H_EII = H_EII.gather(1, perm_EI[:, :, None].expand(E, I, I)).gather(2, perm_EI[:, None, :].expand(E, I, I))
        group_EI = perm_EI // g
    else:
        scale_EOG = torch.empty(E, O, G, dtype=torch.float16, device=W.device)
        zero_EOG = None if spec.symmetric else torch.empty_like(scale_EOG)
    U_EII = _damped_inverse_factor(H_EII, percdamp).to(acc)
    codes_EOI = torch.empty(E, O, I, dtype=torch.uint8, device=W.device)
    half = float(1 << (spec.bits - 1))
    for i1 in range(0, I, BLOCK):  # blocks of columns; the column loop is GPTQ's sequential core
        i2 = min(i1 + BLOCK, I)
        W1 = W[:, :, i1:i2].clone()
        U1 = U_EII[:, i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if perm_EI is None and c % g == 0:  # a new group: its RTN range over the current weights
                span = W1[:, :, i:i + g] if c + g <= i2 else torch.cat([W1[:, :, i:], W[:, :, i2:c + g]], dim=2)
                s, z = rtn_params(span[:, :, None, :], spec.bits, spec.symmetric)
                scale_EOG[:, :, c // g] = s[..., 0]
                if zero_EOG is not None:
                    zero_EOG[:, :, c // g] = z[..., 0]
            if perm_EI is None:
                s_EO = scale_EOG[:, :, c // g].to(acc)
                z_EO = half if zero_EOG is None else zero_EOG[:, :, c // g].to(acc)
            else:
                gi = group_EI[:, c][:, None, None].expand(E, O, 1)
                s_EO = scale_EOG.gather(2, gi)[..., 0].to(acc)
                z_EO = half if zero_EOG is None else zero_EOG.gather(2, gi)[..., 0].to(acc)
            w_EO = W1[:, :, i]
            q_EO = torch.round(w_EO / s_EO + z_EO).clamp(0, maxq)
            codes_EOI[:, :, c] = q_EO.to(torch.uint8)
            err_EO = (w_EO - s_EO * (q_EO - z_EO)) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err_EO[:, :, None] * U1[:, i, i:][:, None, :]
            Err1[:, :, i] = err_EO
        W[:, :, i2:] -= Err1 @ U_EII[:, i1:i2, i2:]
    if perm_EI is not None:  # codes back to the original column order
        codes_EOI = torch.empty_like(codes_EOI).scatter_(2, perm_EI[:, None, :].expand(E, O, I), codes_EOI)
    if G * g > I:
        codes_EOI = torch.nn.functional.pad(codes_EOI, (0, G * g - I))
    codes = codes_EOI.view(E, O, G, g)
    qt = from_codes(codes, scale_EOG, zero_EOG, spec, (E, *shape[-2:]))
    return qt if len(shape) == 3 else qt.select(0)

