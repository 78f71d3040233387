"""The hand-written few-row products (``moekit.layer.kernels.matvec``) against a float64 reference: bf16 and fp32
weights, widths that are not multiples of the vector loop (the scalar tail), several rows, several seeds; each
expert row reads only its own expert; and the callers' multiply-reduce where the kernel is not available."""

from __future__ import annotations

import pytest
import torch

from moekit.layer.kernels import matvec
from moekit.layer.kernels.decode import experts_decode

needs_kernel = pytest.mark.skipif(not matvec.available(), reason="the C++ products need x86 with AVX2 and a C++ "
                                                                   "compiler (elsewhere callers use inductor)")


def tol(w: torch.Tensor, D: int) -> float:
    return 1e-5 * D ** 0.5 * 4


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,O,D", [(1, 33, 70), (3, 64, 1024), (8, 5, 8), (2, 17, 31), (1, 1, 1)])
def test_rows_matvec_equals_the_float64_product(seed, wdtype, T, O, D):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, D, generator=g).to(wdtype)
    x = torch.randn(T, D, generator=g)
    out = torch.ops.moekit.rows_matvec(x, w)
    ref = x.double() @ w.double().t()
    assert out.dtype == torch.float32 and out.shape == (T, O)
    assert (out.double() - ref).abs().max() < tol(w, D)


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_experts_matvec_reads_each_rows_own_expert(seed, wdtype):
    g = torch.Generator().manual_seed(seed)
    E, O, D, T, K = 6, 40, 97, 3, 2
    w = torch.randn(E, O, D, generator=g).to(wdtype)
    idx_TK = torch.randint(0, E, (T, K), generator=g)
    x_TD = torch.randn(T, D, generator=g)
    out = torch.ops.moekit.experts_matvec(x_TD, w, idx_TK.reshape(-1))  # x per token, K experts each
    ref = torch.stack([w[e].double() @ x_TD[t].double() for t in range(T) for e in idx_TK[t].tolist()])
    assert (out.double() - ref).abs().max() < tol(w, D)
    x_RD = torch.randn(T * K, D, generator=g)  # one x row per expert row
    out = torch.ops.moekit.experts_matvec(x_RD, w, idx_TK.reshape(-1))
    ref = torch.stack([w[e].double() @ x_RD[r].double() for r, e in enumerate(idx_TK.reshape(-1).tolist())])
    assert (out.double() - ref).abs().max() < tol(w, D)
    with pytest.raises(ValueError, match="5 expert rows are not a multiple of 2 input rows"):
        torch.ops.moekit.experts_matvec(x_RD[:2], w, torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("available", [True, False])
def test_the_decode_kernel_math_is_the_same_with_and_without_the_products(monkeypatch, available):
    """``experts_decode`` (the few-token MoE kernel's function) through the products and through the
    multiply-reduce it falls back to, against the float64 eager experts."""
    if available and not matvec.available():
        pytest.skip("the C++ products are not available here")
    monkeypatch.setattr(matvec, "available", lambda: available)
    g = torch.Generator().manual_seed(3)
    E, D, F, T, K = 5, 48, 24, 2, 2
    w_in = torch.randn(E, 2 * F, D, generator=g).to(torch.bfloat16)
    w_out = torch.randn(E, D, F, generator=g).to(torch.bfloat16)
    x = torch.randn(T, D, generator=g)
    idx = torch.tensor([[4, 1], [1, 0]])
    wt = torch.rand(T, K, generator=g)
    out = experts_decode(x, idx, wt, w_in, w_out, None, None, "swiglu", 7.0, 1.702)
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            h = w_in[e].double() @ x[t].double()
            a = torch.nn.functional.silu(h[:F]) * h[F:]
            ref[t] += wt[t, k].double() * (w_out[e].double() @ a)
    assert (out.double() - ref).abs().max() < 1e-4
