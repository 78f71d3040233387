"""The fast execution paths against the float64 reference (tests/reference.py): the expert threads of the
loop backend (two intra-op threads, every call threaded), the decode path (one row per expert: mv), and
the compiled backend (torch.compile of the layer, experts as a custom op); forward AND gradients, in
dropless and capacity modes, with empty experts and a single token. Then the reused buffers: poisoned
between calls, they never change a result; nothing a call returns or saves for backward lives in them.

Gradients are checked as in tests/test_backends.py: a directional derivative of the reference (central
differences of ``ref_moe`` along a random direction in (x, parameters)) against the autograd gradients,
and every gradient against the float64 plain-autograd experts (``ffn`` per expert slice).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from devices import DEVICES, on_cpu
from hosts import fake_host
from reference import ref_moe, state_dict64

import moekit.layer.experts as experts_mod
import moekit.layer.kernels.decode as decode_mod
import moekit.layer.kernels.grouped as grouped_mod
import moekit.layer.kernels.rows as rows_mod
import moekit.layer.kernels.select as select_mod
import moekit.layer.kernels.sorted_rows as sorted_rows
import moekit.layer.kernels.threads as threads_mod
from moekit.config import MoEConfig
from moekit.layer.ffn import ffn
from moekit.layer.kernels import compiled_layer
from moekit.layer.kernels.inductor import InductorFn
from moekit.layer.kernels.scratch import SCRATCH, release_scratch
from moekit.layer.kernels.select import select_backend
from moekit.layer.moe import MoE

F64, F32 = torch.float64, torch.float32
D, E, K, FW = 8, 6, 2, 4
MODES = {
    "dropless": dict(),
    "cap-position": dict(capacity_factor=0.75),
    "cap-reroute": dict(capacity_factor=0.75, overflow_policy="reroute"),
}
CASES = {
    # name: (x shape, MoEConfig overrides, router bias or None)
    "generic": ((2, 6), dict(n_shared_experts=1, shared_expert_gate=True, z_loss_coef=1e-2), None),
    # experts 1 and 3 are never chosen by the router
    "empty": ((3, 4), dict(score_func="sigmoid", activation="gelu", aux_loss_coef=0.1),
              [0.0, -40.0, 0.0, -40.0, 0.0, 0.0]),
    "T1": ((1,), dict(z_loss_coef=1e-2), None),
    "bias-clamped": ((2, 5), dict(activation="swiglu_clamped", ffn_bias=True, swiglu_limit=1.5), None),
}


@pytest.fixture
def two_threads(monkeypatch):
    """Two intra-op threads and every call on the expert threads (conftest runs tests single-threaded)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads_mod.EXPERT_THREADS, "min_flops", 0.0)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # every test's layer config compiles afresh, far from the recompile limit
    yield
    torch._dynamo.reset()


def _layer(backend: str, seed: int = 0, dim: int = D, ffn_dim: int = FW, router_bias=None, **kw) -> MoE:
    kw.setdefault("top_k", K)
    cfg = MoEConfig(n_experts=E, expert_ffn_dim=ffn_dim, backend=backend, router_bias=router_bias is not None, **kw)
    torch.manual_seed(seed)
    layer = MoE(dim, cfg)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0.0, (1.5 if name.startswith(("router", "shared_gate")) else 1.0) / math.sqrt(p.shape[-1]))
        if router_bias is not None:
            layer.router.bias.copy_(torch.tensor(router_bias))
    return layer.double()


def _x(shape, seed: int = 1, dim: int = D) -> torch.Tensor:
    return torch.randn(*shape, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _run(layer: MoE, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    res = layer(x)
    ((res.out * g).sum() + res.aux_loss + res.z_loss).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return res, x.grad, grads


def _autograd_experts(self, x_AD, plan):
    """The experts as plain autograd over ``ffn`` on each expert's slice: the oracle for gradients."""
    w_in, w_out = self.w_in.to(x_AD.dtype), self.w_out.to(x_AD.dtype)
    b_in, b_out = self._biases(x_AD.dtype)
    outs = []
    for e, chunk in enumerate(x_AD.split(plan.rows_per_expert_E.tolist())):
        outs.append(ffn(chunk, w_in[e], w_out[e], self.activation, None if b_in is None else b_in[e],
                        None if b_out is None else b_out[e], self.limit, self.alpha))
    return torch.cat(outs)


def _check(layer64: MoE, layer: MoE, shape, dtype=F64, device: str = "cpu"):
    """Forward vs ref_moe, the directional derivative vs the reference, every gradient vs plain autograd.
    ``layer`` runs on ``device``; the references on the CPU."""
    x64, g64 = _x(shape, dim=layer64.dim), _x(shape, seed=2, dim=layer64.dim)
    ref = ref_moe(x64, state_dict64(layer64), layer64.config)
    res, gx, grads = _run(layer.to(device), x64.to(device, dtype), g64.to(device, dtype))
    res, gx, grads = on_cpu(res), gx.cpu(), {n: g.cpu() for n, g in grads.items()}
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(res.out.double(), ref.out, **tol)
    torch.testing.assert_close(res.aux_loss.double(), ref.aux_loss, **tol)
    torch.testing.assert_close(res.stats.tokens_per_expert.double(), ref.dispatch.tokens_per_expert)

    gen = torch.Generator().manual_seed(3)
    vx = torch.randn(x64.shape, generator=gen, dtype=F64)
    sd = state_dict64(layer64)
    vp = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in layer64.named_parameters()}

    def objective(s: float) -> float:
        sd_s = {k: (v + s * vp[k] if k in vp else v) for k, v in sd.items()}
        r = ref_moe(x64 + s * vx, sd_s, layer64.config)
        return float((r.out * g64).sum() + r.aux_loss + r.z_loss)

    numeric = (objective(1e-5) - objective(-1e-5)) / 2e-5
    analytic = float((gx.double() * vx).sum() + sum((grads[n].double() * vp[n]).sum() for n in vp))
    assert analytic == pytest.approx(numeric, rel=1e-6 if dtype == F64 else 1e-4, abs=1e-7 if dtype == F64 else 1e-4)

    oracle = copy.deepcopy(layer64)
    oracle.experts.backend = "loop"
    oracle.experts.forward = _autograd_experts.__get__(oracle.experts)
    _, gx64, grads64 = _run(oracle, x64, g64)
    torch.testing.assert_close(gx.double(), gx64, **tol)
    for n in grads64:
        torch.testing.assert_close(grads[n].double(), grads64[n], **tol, msg=lambda m, n=n: f"{n}: {m}")
    return res, grads


# ---------------------------------------------------------------------------------------------- expert threads
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", list(MODES))
def test_expert_threads_match_reference(two_threads, mode, case):
    shape, kw, bias = CASES[case]
    layer64 = _layer("loop", router_bias=bias, **kw, **MODES[mode])
    res, grads = _check(layer64, copy.deepcopy(layer64), shape)
    if case == "empty" and mode != "cap-reroute":  # experts nobody chose: exactly zero gradient
        for e in (1, 3):
            assert float(grads["experts.w_in"][e].abs().max()) == 0.0
            assert float(grads["experts.w_out"][e].abs().max()) == 0.0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["dropless", "cap-reroute"])
def test_batched_tails_match_reference_in_float64(monkeypatch, threads, case, mode):
    """The bulk + tail split of the oneDNN dtypes (``experts._Tails``: the experts' < _ROW_BLOCK tail rows in zero-
    padded blocks, one batched GEMM per stage when most experts have a tail ("generic", capacity modes), one GEMM
    per expert's block when few do ("empty", "T1"; one-row experts run as matrix-vector products in the forward),
    before or after the per-expert work), run in float64 with a 10-row block so that bulk-and-tail, tail-only,
    bulk-only and empty experts all occur: the reference's forward and gradients, inline and on the expert threads,
    with biases, shared experts, capacity."""
    monkeypatch.setattr(sorted_rows, "JIT_DTYPES", (torch.float64,))
    monkeypatch.setattr(sorted_rows, "ROW_BLOCK", 10)
    monkeypatch.setattr(threads_mod.EXPERT_THREADS, "min_flops", 0.0 if threads == 2 else math.inf)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, kw, bias = CASES[case]
        shape = (1,) if case == "T1" else (4, 9)
        layer64 = _layer("loop", router_bias=bias, **kw, **MODES[mode])
        _check(layer64, copy.deepcopy(layer64), shape)
        rows = layer64(_x(shape)).stats.tokens_per_expert.tolist()
        if (case, mode) == ("generic", "dropless"):  # all kinds occur: bulk + tail, tail only, bulk only
            assert any(r > 10 and r % 10 for r in rows) and any(0 < r < 10 for r in rows) and 10 in rows, rows
    finally:
        torch.set_num_threads(n)


def test_expert_threads_carry_inference_and_grad_mode(two_threads):
    layer = _layer("loop")
    x = _x((8, 10))  # past the few-token decode path (decode_rows_limit): the expert threads run
    with torch.no_grad():
        ref = layer(x).out
    with torch.inference_mode():  # buffers made in inference mode are written by the workers
        out = layer(x).out
    assert torch.equal(out, ref)
    assert out.is_inference()


def test_scratch_made_under_inference_mode_serves_training_later(two_threads):
    """A reused buffer first allocated inside torch.inference_mode (compare measures prefill that way) must
    still be writable by a later training step outside it."""
    release_scratch()
    layer = _layer("loop")
    x = _x((8, 10))  # past the few-token decode path (decode_rows_limit), which needs no scratch
    with torch.inference_mode():
        layer(x)  # allocates the forward's scratch
    assert SCRATCH.buffers and not any(b.is_inference() for b in SCRATCH.buffers.values())
    xg = x.clone().requires_grad_()
    layer(xg).out.sum().backward()  # the backward's scratch, and the forward's again, outside inference mode
    with torch.no_grad():
        torch.testing.assert_close(layer(x).out, ref_moe(x, state_dict64(layer), layer.config).out)


def test_single_row_experts_use_the_decode_path(two_threads):
    """T=1: every active expert has one row (torch.mv); also one token per expert at T=3 (rows differ)."""
    for shape in [(1,), (1, 1, 3)]:
        layer64 = _layer("loop", n_shared_experts=1)
        _check(layer64, copy.deepcopy(layer64), shape)


def test_threads_fp32_close_to_float64(two_threads):
    layer64 = _layer("loop", n_shared_experts=1, dim=16, ffn_dim=8)
    _check(layer64, copy.deepcopy(layer64).float(), (3, 7), dtype=F32)


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_row_blocks_match_fp32(monkeypatch, threads):
    """bf16 GEMMs split each expert's rows into a multiple of _ROW_BLOCK and a tail (bulk, tail and
    tail-only experts all occur here): close to the same layer in fp32, forward and every gradient."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    monkeypatch.setattr(threads_mod.EXPERT_THREADS, "min_flops", 0.0)
    try:
        layer = _layer("loop", dim=16, ffn_dim=8, n_shared_experts=1, ffn_bias=True).float()
        x, g = _x((5, 23), dim=16).float(), _x((5, 23), seed=2, dim=16).float()
        res32, gx32, grads32 = _run(layer, x, g)
        rows = res32.stats.tokens_per_expert
        assert float(rows.max()) > sorted_rows.ROW_BLOCK and float(rows.min()) < sorted_rows.ROW_BLOCK
        layer16 = copy.deepcopy(layer).to(torch.bfloat16)
        res16, gx16, grads16 = _run(layer16, x.bfloat16(), g.bfloat16())

        def rel(a, b):
            return float((a.float() - b).norm() / b.norm())

        assert rel(res16.out, res32.out) < 2e-2
        assert rel(gx16, gx32) < 3e-2
        for name in ("experts.w_in", "experts.w_out", "experts.b_in", "experts.b_out"):
            assert rel(grads16[name], grads32[name]) < 3e-2, name
    finally:
        torch.set_num_threads(n)


def test_auto_prefers_the_loop_backend_on_cpu_for_real_sizes():
    cpu = torch.device("cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert select_backend("auto", cpu, F32, widths=(512, 1408), rows=8192) == "loop"
        assert select_backend("auto", cpu, F32, widths=(8, 4), rows=10) == "grouped"  # tiny: not worth threads
        assert select_backend("auto", cpu, F32, widths=(512, 1408)) == "grouped"  # rows unknown
        torch.set_num_threads(1)  # inline, but still the loop flavour (its bf16 GEMM shapes stay cached)
        assert select_backend("auto", cpu, F32, widths=(512, 1408), rows=8192) == "loop"
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("kind", ["AMX", "AVX-512-BF16", "AVX2"])
def test_auto_bf16_large_calls_pick_grouped_only_with_avx512_bf16_without_amx(monkeypatch, kind):
    """bf16 on a CPU with AVX-512-BF16 but no AMX: calls big enough for the expert threads run grouped_mm
    (measured faster there); smaller calls, fp32, CPUs with AMX and CPUs that emulate bf16 keep the loop."""
    monkeypatch.setattr(select_mod, "probe_host", lambda: fake_host(kind))
    cpu, BF16 = torch.device("cpu"), torch.bfloat16
    large = select_backend("auto", cpu, BF16, widths=(512, 1408), rows=8192)
    grouped = kind == "AVX-512-BF16" and grouped_mod.grouped_mm_available(cpu, BF16)
    assert large == ("grouped" if grouped else "loop")
    assert select_backend("auto", cpu, BF16, widths=(192, 256), rows=8192) == "loop"  # preset small: inline
    assert select_backend("auto", cpu, F32, widths=(512, 1408), rows=8192) == "loop"
    assert select_backend("auto", cpu, BF16, widths=(512, 1404), rows=8192) == "loop"  # not 16-byte aligned


@pytest.mark.parametrize("kernel", ["compiled", "eager"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["generic", "empty", "T1", "bias-clamped"])
def test_decode_path_matches_reference_and_general_path(monkeypatch, kernel, threads, case):
    """Inference on <= DECODE_MAX_ROWS rows skips the dispatch plan (``MoE._decode``): same output, losses
    and statistics as the general path and the reference; with the compiled decode kernel and without it
    (the eager per-expert path, also what runs where inductor cannot build)."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    monkeypatch.setattr(threads_mod.EXPERT_THREADS, "min_flops", 0.0)
    monkeypatch.setattr(decode_mod.DECODE_KERNEL, "enabled", kernel == "compiled")
    kernel_ran = []
    original_kernel = InductorFn.__call__

    def spy(self, *a):
        out = original_kernel(self, *a)
        if self is decode_mod.DECODE_KERNEL:
            kernel_ran.append(out is not None)
        return out

    monkeypatch.setattr(InductorFn, "__call__", spy)
    try:
        shape, kw, bias = CASES[case]
        layer = _layer("loop", router_bias=bias, **kw)
        calls = []
        original = MoE._decode
        monkeypatch.setattr(MoE, "_decode", lambda self, *a: calls.append(1) or original(self, *a))
        for T in (1, 3, 8):
            x = _x((T,), seed=T)
            calls.clear()
            with torch.no_grad():
                fast = layer(x)
            assert calls, "the decode path did not run"
            assert kernel_ran and all(r == (kernel == "compiled") for r in kernel_ran)
            kernel_ran.clear()
            general = layer(x)  # grad enabled: the general path
            ref = ref_moe(x, state_dict64(layer), layer.config)
            torch.testing.assert_close(fast.out, ref.out, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(fast.out, general.out.detach(), rtol=1e-12, atol=1e-13)
            for name in ("aux_loss", "z_loss"):
                torch.testing.assert_close(getattr(fast, name), getattr(general, name).detach())
            for f in ("tokens_per_expert", "routed_per_expert", "load_imbalance", "dropped_frac", "router_entropy",
                      "dead_experts", "lb_loss"):
                torch.testing.assert_close(getattr(fast.stats, f), getattr(general.stats, f), msg=f)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("case", ["generic", "empty", "bias-clamped"])
def test_decode_path_aux_false_same_output(monkeypatch, case):
    """aux=False (generation) skips losses and statistics only: the same output on the decode path (T <= 8)
    and the general path (T = 24 rows > DECODE_MAX_ROWS)."""
    shape, kw, bias = CASES[case]
    layer = _layer("loop", router_bias=bias, **kw)
    for T in (1, 3, 24):
        x = _x((T,), seed=T)
        with torch.no_grad():
            full, lean = layer(x), layer(x, aux=False)
        assert lean.aux_loss is None and lean.z_loss is None and lean.stats is None
        # T <= 8: router and experts in one compiled kernel (other fusion, other rounding) against two calls
        torch.testing.assert_close(lean.out, full.out, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(lean.out, ref_moe(x, state_dict64(layer), layer.config).out, rtol=1e-9, atol=1e-10)


ROUTINGS = {
    "softmax": dict(),
    "softmax-after-topk": dict(softmax_after_topk=True, top_k=3),
    "sigmoid-groups-bias": dict(score_func="sigmoid", expert_bias=True, n_groups=3, topk_groups=2,
                                norm_topk_prob=True, routed_scaling_factor=2.5),
    "router-bias-gelu-shared": dict(activation="gelu", ffn_bias=True, n_shared_experts=1, shared_expert_gate=True),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_routed_decode_kernel_matches_reference(monkeypatch, routing, seed):
    """Generation (aux=False, T*K <= DECODE_MAX_ROWS) runs the router and the experts as one compiled kernel
    (``kernels.decode.ROUTED_DECODE``): the float64 reference's output for every routing option, T = 1, 3, 8."""
    kw = dict(ROUTINGS[routing])
    top_k = kw.pop("top_k", K)
    ran = []
    original = InductorFn.__call__
    monkeypatch.setattr(InductorFn, "__call__",
                        lambda self, *a: ran.append(self) or original(self, *a))
    layer = _layer("loop", seed=seed, router_bias=[0.3, -0.2, 0.0, 0.1, -0.4, 0.2] if "bias" in routing else None,
                   **kw)
    layer.config.top_k = layer.router.config.top_k = top_k
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(seed), dtype=F64))
    for T in (1, 3, 5):
        x = _x((T,), seed=seed * 10 + T)
        ran.clear()
        with torch.no_grad():
            lean = layer(x, aux=False).out
        # the routed experts: the fused kernel, once (a shared expert may run the one-token MLP kernel after it)
        assert ran[0] is decode_mod.ROUTED_DECODE and ran.count(decode_mod.ROUTED_DECODE) == 1
        torch.testing.assert_close(lean, ref_moe(x, state_dict64(layer), layer.config).out, rtol=1e-9, atol=1e-10)


def test_routed_decode_kernel_fallbacks(monkeypatch):
    """Where the fused kernel cannot run (disabled, as after a failed build) the router and the experts run
    separately with the same result; a router adding training noise never takes the fused kernel."""
    layer = _layer("loop", input_jitter_eps=0.1)
    x = _x((3,), seed=4)
    with torch.no_grad():
        fused = layer.eval()(x, aux=False).out
        monkeypatch.setattr(decode_mod.ROUTED_DECODE, "enabled", False)
        separate = layer(x, aux=False).out
        torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-13)
        monkeypatch.setattr(decode_mod.ROUTED_DECODE, "enabled", True)
        monkeypatch.setattr(MoE, "_routed_decode", lambda *a: pytest.fail("fused kernel with a noisy router"))
        layer.train()(x, aux=False)  # training mode under no_grad: jitter on, the separate path


def test_decode_path_not_taken_with_capacity_or_grad():
    layer = _layer("loop", capacity_factor=1.0)
    x = _x((1,))
    with torch.no_grad():
        assert layer.experts.decode_eligible(x, K)  # the experts could, but capacity mode keeps the plan
        torch.testing.assert_close(layer(x).out, ref_moe(x, state_dict64(layer), layer.config).out)
    assert not layer.experts.decode_eligible(x, K)  # parameters need gradients
    layer.experts.backend = "grouped"
    with torch.no_grad():
        assert not layer.experts.decode_eligible(x, K)  # an explicit backend is honoured


# ---------------------------------------------------------------------------------------------- compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,mode", [("generic", "dropless"), ("empty", "cap-position"), ("T1", "dropless"),
                                       ("bias-clamped", "cap-reroute")])
def test_compiled_backend_matches_reference(fresh_dynamo, case, mode, device):
    shape, kw, bias = CASES[case]
    layer64 = _layer("loop", router_bias=bias, **kw, **MODES[mode])
    layer = copy.deepcopy(layer64)
    layer.experts.backend = "compiled"
    _check(layer64, layer, shape, device=device)


def test_compiled_backend_does_not_recompile_when_routing_changes(fresh_dynamo):
    layer = _layer("compiled").float()
    layer(_x((4, 6)).float().requires_grad_()).out.sum().backward()  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2, 6):  # other tokens, other expert loads (incl. empty experts), same T
            x = (_x((4, 6), seed=seed) * (1 + seed)).float().requires_grad_()
            res = layer(x)
            res.out.sum().backward()
            assert float(res.stats.tokens_per_expert.sum()) == 4 * 6 * K


def _spy_compiled_forward(monkeypatch, fail: bool = False) -> list[int]:
    """Count the layer calls that go through the compiled layer (``compiled_layer.compiled``; or make them fail, as
    a missing compiler)."""
    calls: list[int] = []
    real = compiled_layer.compiled

    def spy(forward):
        fn = real(forward)

        def run(layer, x, aux):
            calls.append(x.numel())
            if fail:
                raise RuntimeError("no C++ compiler (simulated)")
            return fn(layer, x, aux)
        return run
    monkeypatch.setattr(compiled_layer, "compiled", spy)
    return calls


def test_auto_trains_large_cpu_calls_through_the_compiled_layer(fresh_dynamo, monkeypatch):
    """backend="auto": training calls the loop would run (CPU, grad, training mode, >= min_flops) go through the
    compiled layer, in one graph (no graph break: the experts are the custom op, the InductorFn kernels step
    aside), with the loop layer's outputs and gradients; inference, small calls and explicit backends do not."""
    monkeypatch.setattr(compiled_layer.AUTO_COMPILE, "enabled", True)
    monkeypatch.setattr(compiled_layer.AUTO_COMPILE, "min_flops", 1e5)
    calls = _spy_compiled_forward(monkeypatch)
    auto = _layer("auto", dim=16, ffn_dim=8, z_loss_coef=1e-2)
    loop = copy.deepcopy(auto)
    loop.experts.backend = "loop"
    shape = (4, 40)  # 160 tokens, 320 rows: the loop's size on the CPU (select_backend)
    assert select_backend("auto", torch.device("cpu"), F64, widths=(16, 8), rows=320) == "loop"
    x, g = _x(shape, dim=16), _x(shape, seed=2, dim=16)
    torch._dynamo.utils.counters.clear()
    res, gx, grads = _run(auto, x, g)
    assert calls == [x.numel()] and not torch._dynamo.utils.counters["graph_break"]
    ref, gx_ref, grads_ref = _run(loop, x, g)
    assert len(calls) == 1  # an explicit backend stays eager
    torch.testing.assert_close(res.out, ref.out, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.aux_loss, ref.aux_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.z_loss, ref.z_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.stats.tokens_per_expert, ref.stats.tokens_per_expert)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-10)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-9, atol=1e-10, msg=n)

    with torch.no_grad():
        auto(x)  # inference: the eager paths
    auto.eval()
    auto(x.requires_grad_())  # eval mode, even with gradients
    auto.train()
    _run(auto, x[:1, :8], g[:1, :8])  # 8 tokens: below min_flops
    assert len(calls) == 1


def test_auto_compile_failure_warns_once_and_trains_eagerly(fresh_dynamo, monkeypatch, caplog):
    monkeypatch.setattr(compiled_layer.AUTO_COMPILE, "enabled", True)
    monkeypatch.setattr(compiled_layer.AUTO_COMPILE, "min_flops", 1e5)
    calls = _spy_compiled_forward(monkeypatch, fail=True)
    auto = _layer("auto", dim=16, ffn_dim=8)
    loop = copy.deepcopy(auto)
    loop.experts.backend = "loop"
    x, g = _x((4, 40), dim=16), _x((4, 40), seed=2, dim=16)
    with caplog.at_level("WARNING", logger="moekit"):
        res, gx, _ = _run(auto, x, g)
        _run(auto, x, g)
    assert len(calls) == 1 and not compiled_layer.AUTO_COMPILE.enabled  # tried once
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1
    ref, gx_ref, _ = _run(loop, x, g)
    torch.testing.assert_close(res.out, ref.out, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


def test_kernels_env_switch_keeps_training_eager(monkeypatch):
    monkeypatch.setenv("MOEKIT_KERNELS", "eager")
    assert not compiled_layer.AutoCompile().enabled
    monkeypatch.delenv("MOEKIT_KERNELS")
    assert compiled_layer.AutoCompile().enabled


# ---------------------------------------------------------------------------------------------- buffers
def _poison_scratch(value: float = float("nan")) -> int:
    for buf in SCRATCH.buffers.values():
        buf.fill_(value)
    return len(SCRATCH.buffers)


@pytest.mark.parametrize("backend", ["loop", "loop-threads", "grouped", "compiled"])
def test_poisoned_buffers_never_change_results(request, backend):
    if backend == "loop-threads":
        request.getfixturevalue("two_threads")
    if backend == "compiled":
        request.getfixturevalue("fresh_dynamo")
    real = "loop" if backend == "loop-threads" else backend
    layer = _layer(real, n_shared_experts=1, dim=16, ffn_dim=8).float()
    x, g = _x((3, 7), dim=16).float(), _x((3, 7), seed=2, dim=16).float()
    release_scratch()
    first, gx1, grads1 = _run(layer, x, g)
    with torch.no_grad():
        inf1 = layer(x).out
    assert _poison_scratch() >= 1  # the backward used the pool
    second, gx2, grads2 = _run(layer, x, g)
    _poison_scratch()
    with torch.no_grad():
        inf2 = layer(x).out
    _poison_scratch(1e30)
    # results of earlier calls are not views of the pool either: poisoning did not touch them
    for a, b in [(first.out, second.out), (gx1, gx2), (inf1, inf2)] + [(grads1[n], grads2[n]) for n in grads1]:
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_buffers_shrinking_and_growing_calls(two_threads):
    """A large call leaves large buffers; a smaller call after it (and a larger again) must not read stale rows."""
    layer = _layer("loop", dim=16, ffn_dim=8).float()
    xs = [_x(s, seed=i, dim=16).float() for i, s in enumerate([(40,), (3,), (1,), (64,)])]
    fresh = []
    for x in xs:
        release_scratch()
        fresh.append(_run(layer, x, torch.ones_like(x)))
    for x, (res, gx, grads) in zip(xs, fresh):
        _poison_scratch()
        r, g2, gr = _run(layer, x, torch.ones_like(x))
        assert torch.equal(r.out, res.out) and torch.equal(g2, gx)
        assert all(torch.equal(gr[n], grads[n]) for n in grads)


def test_two_graphs_alive_share_no_saved_tensors(two_threads):
    """Gradient accumulation: two forwards before their backwards; the first graph's saved tensors must
    survive the second forward and backward (nothing saved for backward lives in the pool)."""
    layer = _layer("loop", dim=16, ffn_dim=8).float()
    xa, xb = _x((5, 3), dim=16).float(), _x((5, 3), seed=7, dim=16).float()
    ref = {}
    for name, x in (("a", xa), ("b", xb)):
        layer.zero_grad(set_to_none=True)
        layer(x).out.sum().backward()
        ref[name] = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    out_a, out_b = layer(xa).out, layer(xb).out
    out_b.sum().backward()
    _poison_scratch()
    out_a.sum().backward()
    for n, p in layer.named_parameters():
        if n in ref["a"]:
            torch.testing.assert_close(p.grad, ref["a"][n] + ref["b"][n], rtol=1e-5, atol=1e-6)


def test_release_scratch_frees_the_pool():
    layer = _layer("loop", dim=16, ffn_dim=8).float()
    x = _x((4,), dim=16).float().requires_grad_()
    layer(x).out.sum().backward()
    assert SCRATCH.buffers
    release_scratch()
    assert not SCRATCH.buffers


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True), ("swiglu_clamped", True)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_dense_mlp_few_rows_decode_kernel(monkeypatch, activation, bias, rows):
    """A few rows without autograd (generation) run the dense MLP through the decode kernel (a one-expert MoE):
    the same values as ``ffn``, in float64 and fp32 (up to 8 rows) and under bf16 autocast (one row; more rows
    take oneDNN's GEMMs, same values)."""
    ran = []
    original = InductorFn.__call__
    monkeypatch.setattr(InductorFn, "__call__", lambda self, *a: ran.append(self) or original(self, *a))
    torch.manual_seed(0)
    mlp = experts_mod.MLP(D, 12, activation, bias=bias, swiglu_limit=1.5).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.5)
    x = _x((1, rows))
    ref = ffn(x, mlp.w_in, mlp.w_out, activation, mlp.b_in, mlp.b_out, 1.5).detach()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-12, atol=1e-12)
        assert ran
        ran.clear()
        torch.testing.assert_close(mlp.float()(x.float()), ref.float(), rtol=1e-5, atol=1e-5)
        assert ran
        ran.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = mlp(x.float())
        assert y16.dtype == torch.bfloat16
        assert bool(ran) == (rows == 1)
        torch.testing.assert_close(y16.float(), ref.float(), rtol=3e-2, atol=3e-2)
    ran.clear()
    mlp(x.float())  # parameters need gradients: the plain path, no kernel
    assert not ran
    with torch.no_grad():
        mlp(_x((1, 9)).float())  # more rows than the kernel takes
    assert not ran


def test_decode_under_bf16_autocast_matches_general_path():
    """fp32 weights under bf16 autocast (how ``compare`` measures decode): the decode kernel reads the fp32
    weights as they are; the output has x's dtype, as the general path's, and is close to it."""
    layer = _layer("loop", n_shared_experts=1).float()
    x = _x((1, 3)).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        general = layer(x).out
        with torch.no_grad():
            fast = layer(x, aux=False).out
    assert fast.dtype == general.dtype == x.dtype
    torch.testing.assert_close(fast.float(), general.detach().float(), rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------------- compiled combine and row-sum kernels
def _kernels():
    return rows_mod.COMBINE, rows_mod.COMBINE_BACKWARD, rows_mod.SUM_ROWS


@pytest.mark.parametrize("top_k", [2, 5])
@pytest.mark.parametrize("dtype", ["float64", "bf16"])
@pytest.mark.parametrize("mode", ["dropless", "cap-position"])
def test_combine_and_row_sum_kernels_match_eager_ops(monkeypatch, dtype, mode, top_k):
    """The training path's compiled kernels (combine forward and backward, the gather's row sums) build, run,
    and give what the eager ops give: outputs and every gradient, in float64 (to rounding) and under bf16
    autocast (the kernels accumulate in fp32, the eager ops in bf16: to bf16 rounding); top-2 and top-5 (the
    kernels unroll their sums over k)."""
    layer = _layer("loop", top_k=top_k, **MODES[mode])
    x, g = _x((4, 9)), _x((4, 9), seed=2)
    if dtype == "bf16":
        layer, x, g = layer.float(), x.float(), g.float()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return _run(layer, x, g)

    for fn in _kernels():
        fn.clear()
    res, gx, grads = run()
    for fn in _kernels():
        assert fn.enabled and fn._compiled, f"{fn.name} did not build or did not run"
    for fn in _kernels():
        monkeypatch.setattr(fn, "enabled", False)
    res0, gx0, grads0 = run()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == "float64" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(res.out, res0.out, **tol)
    torch.testing.assert_close(gx, gx0, **tol)
    for n in grads0:
        torch.testing.assert_close(grads[n], grads0[n], **tol, msg=lambda m, n=n: f"{n}: {m}")
    assert any(float(grads[n].abs().max()) > 0 for n in ("router.weight", "experts.w_in"))


def test_kernels_env_switch(monkeypatch):
    """MOEKIT_KERNELS=eager turns every compiled kernel off (MOEKIT_DECODE_KERNEL=eager is its older name)."""
    for var in ("MOEKIT_KERNELS", "MOEKIT_DECODE_KERNEL"):
        monkeypatch.setenv(var, "eager")
        assert not InductorFn(lambda t: t + 1, "env").enabled
        monkeypatch.delenv(var)
    assert InductorFn(lambda t: t + 1, "env").enabled


def test_zero_aux_coefficient_logs_the_balance_loss_without_a_graph():
    """aux_loss_coef=0 (aux-loss-free balancing): the Switch loss is still reported, but nothing backpropagates
    through it; with a coefficient it does."""
    res = _layer("loop", aux_loss_coef=0.0, expert_bias=True)(_x((2, 5)))
    assert not res.aux_loss.requires_grad and float(res.aux_loss) == 0.0
    assert math.isfinite(float(res.stats.lb_loss)) and float(res.stats.lb_loss) > 0  # still logged
    res = _layer("loop", aux_loss_coef=0.1)(_x((2, 5)))
    assert res.aux_loss.requires_grad
