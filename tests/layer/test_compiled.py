"""InductorFn: functions compiled once per input signature, called without TorchDynamo (kernels/inductor.py)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from moekit.layer.kernels.inductor import InductorFn


def _affine(x_TD: torch.Tensor, w_ND: torch.Tensor, b_N: torch.Tensor | None, scale: float) -> torch.Tensor:
    y_TN = F.linear(x_TD.to(torch.float32), w_ND.to(torch.float32), b_N)
    return (y_TN.relu() * scale).to(x_TD.dtype)


def _args(T: int, D: int, N: int, seed: int = 0, dtype=torch.float32, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = torch.randn(N, D, generator=g)
    return x, w, torch.randn(N, generator=g) if bias else None


def test_one_build_serves_every_size_and_sizes_of_one_build_again():
    """Sizes are symbols (no duck sizing: equal example sizes do not tie), so one build serves other shapes;
    a size of 1 is specialised while tracing and makes its own signature."""
    fn = InductorFn(_affine, "test affine")
    for T, D, N in [(3, 8, 8), (5, 16, 7), (2, 12, 40)]:
        x, w, b = _args(T, D, N, seed=T)
        torch.testing.assert_close(fn((x, w, b), (0.5,)), _affine(x, w, b, 0.5))
    assert len(fn._compiled) == 1
    x, w, b = _args(1, 8, 8)
    torch.testing.assert_close(fn((x, w, b), (0.5,)), _affine(x, w, b, 0.5))
    assert len(fn._compiled) == 2
    x, w, b = _args(4, 8, 8)
    torch.testing.assert_close(fn((x, w, b), (2.0,)), _affine(x, w, b, 2.0))  # another constant: another build
    assert len(fn._compiled) == 3


def _pair_sums(v_AD: torch.Tensor, inverse_A: torch.Tensor, K: int) -> torch.Tensor:
    """out_t = sum of the K rows of token t, as moekit's row-sum and combine kernels: T = A // K is derived from
    an input's size, so the signature (which sees A) cannot tell T = 1 from T = 3."""
    idx_TK = inverse_A.view(-1, K)
    out_TD = v_AD[idx_TK[:, 0]]
    for k in range(1, K):
        out_TD = out_TD + v_AD[idx_TK[:, k]]
    return out_TD


@pytest.mark.parametrize("first_T", [1, 3])
def test_what_a_trace_assumed_about_derived_sizes_is_checked_on_every_layout(first_T):
    """Traced at T = 1 the kernel holds only for T = 1 (the trace's shape guards say so): other T get a kernel of
    their own under the same signature, and each size gives the eager function's answer whichever came first."""
    fn = InductorFn(_pair_sums, "test pair sums")
    g = torch.Generator().manual_seed(0)
    for T in (first_T, 4 - first_T, 8, 1):
        v, inv = torch.randn(2 * T, 5, generator=g, dtype=torch.float64), torch.randperm(2 * T, generator=g)
        torch.testing.assert_close(fn((v, inv), (2,)), _pair_sums(v, inv, 2), rtol=0, atol=0)
    assert len(fn._compiled) == 1 and len(next(iter(fn._compiled.values()))) == 2


def test_none_arguments_dtypes_and_layouts_make_their_own_signatures():
    fn = InductorFn(_affine, "test affine")
    x, w, _ = _args(4, 8, 6, bias=False)
    torch.testing.assert_close(fn((x, w, None), (1.0,)), _affine(x, w, None, 1.0))
    xb = x.to(torch.bfloat16)
    out = fn((xb, w, None), (1.0,))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _affine(xb, w, None, 1.0))
    wt = torch.randn(8, 6).t()  # a transposed (non-contiguous) weight
    torch.testing.assert_close(fn((x, wt, None), (1.0,)), _affine(x, wt, None, 1.0))
    assert len(fn._compiled) == 3


def test_autocast_at_call_time_changes_nothing():
    """Traced without autocast and run as compiled: the function's own dtypes hold under bf16 autocast (the
    router's fp32 logits in the routed decode kernel)."""
    fn = InductorFn(_affine, "test affine")
    x, w, b = _args(3, 16, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn((x, w, b), (1.0,))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _affine(x, w, b, 1.0), rtol=1e-6, atol=1e-6)


def test_inference_mode_inputs_and_outputs():
    fn = InductorFn(_affine, "test affine")
    x, w, b = _args(3, 8, 4)
    with torch.inference_mode():
        out = fn((x, w, b), (1.0,))
    torch.testing.assert_close(out, _affine(x, w, b, 1.0))
    torch.testing.assert_close(fn((x, w, b), (1.0,)), _affine(x, w, b, 1.0))  # the same build, outside


def test_a_failed_build_warns_once_and_returns_none(caplog):
    def through_numpy(x_T: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x_T.numpy() * 2)  # leaves torch: cannot be traced

    fn = InductorFn(through_numpy, "test failing")
    with caplog.at_level(logging.WARNING, logger="moekit"):
        assert fn((torch.randn(4),)) is None
        assert fn((torch.randn(4),)) is None
    assert not fn.enabled
    assert sum("could not build" in r.getMessage() for r in caplog.records) == 1


def test_eager_environment_variable(monkeypatch):
    monkeypatch.setenv("MOEKIT_DECODE_KERNEL", "eager")
    fn = InductorFn(_affine, "test affine")
    assert fn(_args(2, 4, 4), (1.0,)) is None and not fn._compiled


@pytest.mark.parametrize("seed", [0, 1])
def test_wrong_shapes_are_refused_by_the_compiled_code(seed):
    """Inputs that break a traced relation (here x's D against w's D) fail the kernel's shape guards, and the
    trace of their own raises as the eager function would, instead of reading out of bounds."""
    fn = InductorFn(_affine, "test affine")
    x, w, b = _args(3, 8, 4, seed=seed)
    fn((x, w, b), (1.0,))
    with pytest.raises(Exception):  # noqa: B017 (inductor raises AssertionError or RuntimeError)
        fn((torch.randn(3, 9), w, b), (1.0,))


def test_static_dims_join_the_signature():
    """A dim kept static (the decode kernels' top-k width) builds once per size; the others stay symbols."""
    fn = InductorFn(_affine, "test affine", static_dims={1: (0,)})
    for T, D, N in [(3, 8, 4), (5, 16, 4), (3, 8, 6), (4, 12, 6)]:
        x, w, b = _args(T, D, N, seed=T + N)
        torch.testing.assert_close(fn((x, w, b), (1.0,)), _affine(x, w, b, 1.0))
    assert len(fn._compiled) == 2


def test_steps_aside_inside_a_torch_compile_graph():
    """Called while TorchDynamo traces (a layer through torch.compile), the function returns None, so the caller's
    eager ops join the graph: no graph break (fullgraph=True would raise on one), nothing built."""
    fn = InductorFn(_affine, "test affine")
    x, w, b = _args(3, 8, 8)

    def layer(x, w, b):
        y = fn((x, w, b), (2.0,))
        return _affine(x, w, b, 2.0) + 1 if y is None else y

    out = torch.compile(layer, fullgraph=True, backend="eager")(x, w, b)
    torch.testing.assert_close(out, _affine(x, w, b, 2.0) + 1)
    assert not fn._compiled
    torch.testing.assert_close(fn((x, w, b), (2.0,)), _affine(x, w, b, 2.0))  # outside: compiled and run
