"""Expert backends ("loop", "grouped", "padded"): forward AND gradients against the float64 reference in dropless
and capacity modes, with empty experts and a single token; "auto" selection; no silent fallback; bf16 autocast.

Gradients are checked two ways: (1) a directional derivative of the reference (central differences of
tests/reference.py along a random direction in (x, parameters)) against the backend's autograd gradients, and
(2) every gradient against the float64 loop backend (itself gradchecked in test_moe.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from devices import DEVICES, needs_cuda, on_cpu
from reference import ref_moe, state_dict64

from moekit.config import MoEConfig
from moekit.layer.experts import Experts
from moekit.layer.kernels.grouped import grouped_mm_available
from moekit.layer.kernels.select import select_backend
from moekit.layer.moe import MoE

F64, F32 = torch.float64, torch.float32
BACKENDS = ["loop", "grouped", "padded"]
MODES = {
    "dropless": dict(),
    "cap-position": dict(capacity_factor=0.75),
    "cap-probs": dict(capacity_factor=0.75, drop_policy="probs"),
    "cap-reroute": dict(capacity_factor=0.75, overflow_policy="reroute"),
}
CASES = {
    # name: (x shape, MoEConfig overrides, router bias or None)
    "generic": ((2, 6), dict(n_shared_experts=1, shared_expert_gate=True, z_loss_coef=1e-2, seq_aux_loss_coef=1e-2),
                None),
    # experts 1 and 3 are never chosen by the router
    "empty": ((3, 4), dict(score_func="sigmoid", activation="gelu", aux_loss_coef=0.1),
              [0.0, -40.0, 0.0, -40.0, 0.0, 0.0]),
    "T1": ((1,), dict(z_loss_coef=1e-2), None),
}
D, E, K, FW = 8, 6, 2, 4  # fp32 grouped_mm needs widths that are multiples of 4

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: the intra-op thread pool only adds wake-up latency on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dtype(backend: str) -> torch.dtype:
    return F32 if backend == "grouped" else F64  # grouped_mm has no float64


def _layer(backend: str, seed: int = 0, dim: int = D, ffn: int = FW, router_bias=None, **kw) -> MoE:
    cfg = MoEConfig(n_experts=E, top_k=K, expert_ffn_dim=ffn, backend=backend, router_bias=router_bias is not None,
                    **kw)
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
    """Forward + backward of <g, out> + aux + z; returns (result, x.grad, {param: grad})."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    res = layer(x)
    loss = (res.out * g).sum() + res.aux_loss + res.z_loss
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return res, x.grad, grads


def _ref_objective(x, sd, cfg, g) -> float:
    r = ref_moe(x, sd, cfg)
    return float((r.out * g).sum() + r.aux_loss + r.z_loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, mode, case, device):
    shape, kw, bias = CASES[case]
    layer64 = _layer("loop", router_bias=bias, **kw, **MODES[mode])
    x64 = _x(shape)
    g64 = _x(shape, seed=2)
    ref = ref_moe(x64, state_dict64(layer64), layer64.config)

    dtype = _dtype(backend)
    dev = torch.device(device)
    if backend == "grouped" and not grouped_mm_available(dev, dtype):
        # (a GPU whose torch has no fp32 grouped_mm: auto then runs the loop, an explicit request says why)
        assert select_backend("auto", dev, dtype, widths=(D, FW)) == "loop"
        with pytest.raises(RuntimeError, match="grouped"):
            select_backend("grouped", dev, dtype, widths=(D, FW))
        return
    layer = copy.deepcopy(layer64).to(dev, dtype)
    layer.experts.backend = backend
    res, gx, grads = _run(layer, x64.to(dev, dtype), g64.to(dev, dtype))
    res, gx, grads = on_cpu(res), gx.cpu(), {n: g.cpu() for n, g in grads.items()}
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)

    # forward
    assert res.out.dtype == dtype and res.out.shape == x64.shape
    torch.testing.assert_close(res.out.double(), ref.out, **tol)
    torch.testing.assert_close(res.aux_loss.double(), ref.aux_loss, **tol)
    torch.testing.assert_close(res.z_loss.double(), ref.z_loss, **tol)
    torch.testing.assert_close(res.stats.tokens_per_expert.double(), ref.dispatch.tokens_per_expert)
    torch.testing.assert_close(res.stats.routed_per_expert.double(), ref.dispatch.routed_per_expert)
    torch.testing.assert_close(res.stats.dropped_frac.double(), torch.tensor(ref.dispatch.dropped_frac, dtype=F64),
                               rtol=0, atol=1e-7)
    if mode != "dropless" and case != "T1":  # the case exercises what the mode is about
        assert ref.dispatch.dropped_frac > 0 or mode == "cap-reroute"  # capacity really binds
        if mode == "cap-reroute":
            assert bool((ref.dispatch.expert != ref.routing.topk_idx).any())  # some assignment moved
        if mode == "cap-probs":  # dropping by weight keeps other assignments than dropping by position
            position_cfg = dataclasses.replace(layer64.config, drop_policy="position")
            by_position = ref_moe(x64, state_dict64(layer64), position_cfg)
            assert bool((by_position.dispatch.kept != ref.dispatch.kept).any())
    if case == "empty":
        assert float(ref.dispatch.routed_per_expert[1]) == 0 and float(ref.dispatch.routed_per_expert[3]) == 0
        assert int(res.stats.dead_experts) >= 2
        if mode != "cap-reroute":  # no token reaches experts 1 and 3: their weights get exactly zero gradient
            for e in (1, 3):
                assert float(grads["experts.w_in"][e].abs().max()) == 0.0
                assert float(grads["experts.w_out"][e].abs().max()) == 0.0

    # gradients (1): directional derivative of the reference along a random direction
    gen = torch.Generator().manual_seed(3)
    vx = torch.randn(x64.shape, generator=gen, dtype=F64)
    sd = state_dict64(layer64)
    vp = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in layer64.named_parameters()}
    eps = 1e-5

    def shifted(s: float):
        sd_s = {k: (v + s * vp[k] if k in vp else v) for k, v in sd.items()}
        return _ref_objective(x64 + s * vx, sd_s, layer64.config, g64)

    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    analytic = float((gx.double() * vx).sum() + sum((grads[n].double() * vp[n]).sum() for n in vp))
    assert analytic == pytest.approx(numeric, rel=1e-6 if dtype == F64 else 1e-4, abs=1e-7 if dtype == F64 else 1e-4)

    # gradients (2): every gradient against the float64 loop backend
    _, gx64, grads64 = _run(layer64, x64, g64)
    torch.testing.assert_close(gx.double(), gx64, **tol)
    assert set(grads) == set(grads64)
    for n in grads64:
        torch.testing.assert_close(grads[n].double(), grads64[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- selection


def _spy(monkeypatch):
    calls = []
    for name in ("_loop", "_grouped", "_padded"):
        orig = getattr(Experts, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name[1:])
            return _orig(self, *a, **k)

        monkeypatch.setattr(Experts, name, wrapped)
    return calls


def test_auto_picks_grouped_for_fp32_and_loop_for_float64(monkeypatch):
    cpu = torch.device("cpu")
    assert grouped_mm_available(cpu, F32)  # torch 2.13 has grouped_mm on the CPU
    assert not grouped_mm_available(cpu, F64)
    assert select_backend("auto", cpu, F32, widths=(D, FW)) == "grouped"
    assert select_backend("auto", cpu, F64, widths=(D, FW)) == "loop"

    calls = _spy(monkeypatch)
    layer = _layer("auto")
    layer(_x((5,)))
    assert calls == ["loop"]
    calls.clear()
    layer.float()(_x((5,)).float())
    assert calls == ["grouped"]
    calls.clear()
    for backend in ("loop", "padded", "grouped"):  # explicit choices are honoured
        layer.experts.backend = backend
        layer(_x((5,)).float())
    assert calls == ["loop", "padded", "grouped"]


def test_explicit_grouped_in_float64_raises():
    layer = _layer("grouped")  # float64
    with pytest.raises(RuntimeError, match="grouped"):
        layer(_x((4,)))
    with pytest.raises(RuntimeError, match="grouped"):
        select_backend("grouped", torch.device("cpu"), F64)


def test_torch_without_grouped_mm_runs_the_loop(monkeypatch):
    """A torch with neither torch.nn.functional.grouped_mm nor torch._grouped_mm: no grouped backend, auto runs the
    loop (same result), an explicit request says why."""
    import moekit.layer.kernels.grouped as grouped_mod

    monkeypatch.setattr(grouped_mod, "grouped_mm", None)
    monkeypatch.setattr(grouped_mod, "_GROUPED_OK", {})
    cpu = torch.device("cpu")
    assert not grouped_mm_available(cpu, F32)
    assert select_backend("auto", cpu, F32, widths=(D, FW)) == "loop"
    with pytest.raises(RuntimeError, match="no working grouped_mm"):
        select_backend("grouped", cpu, F32, widths=(D, FW))
    calls = _spy(monkeypatch)
    layer = _layer("auto").float()
    x = _x((5,)).float()
    out = layer(x).out
    assert calls == ["loop"]
    torch.testing.assert_close(out.double(), ref_moe(x.double(), state_dict64(layer), layer.config).out,
                               rtol=2e-5, atol=2e-5)


def test_grouped_unaligned_widths(monkeypatch):
    """grouped_mm needs 16-byte row strides: auto falls back to loop, an explicit 'grouped' raises."""
    calls = _spy(monkeypatch)
    for dim, ffn in [(6, 8), (8, 6)]:
        layer = _layer("auto", dim=dim, ffn=ffn).float()
        x = _x((2, 3), dim=dim).float().requires_grad_()
        layer(x).out.sum().backward()
        assert calls[-1] == "loop"
        layer.experts.backend = "grouped"
        with pytest.raises(RuntimeError, match="grouped"):
            layer(x)


@pytest.mark.skipif(**needs_cuda)
@pytest.mark.parametrize("mode", ["dropless", "cap-position"])
def test_grouped_layer_never_waits_for_the_host_on_cuda(mode):
    """What auto runs on CUDA (grouped, bf16): routing, dispatch plan, experts, combine, losses and statistics,
    forward and backward, queue their kernels without one host synchronisation (no .item(), no boolean-mask
    shapes, no row counts read back), so the GPU never idles waiting for Python."""
    dim, ffn = 16, 8
    cuda = torch.device("cuda")
    layer = _layer("auto", dim=dim, ffn=ffn, z_loss_coef=1e-2, **MODES[mode]).to(cuda, torch.bfloat16)
    assert select_backend("auto", cuda, torch.bfloat16, widths=(dim, ffn), rows=64) == "grouped"
    x = _x((4, 8), dim=dim).to(cuda, torch.bfloat16).requires_grad_()
    for step in range(2):  # the first call warms up (capability probe, library handles)
        if step:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            res = layer(x)
            (res.out.float().square().sum() + res.aux_loss + res.z_loss).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.grad).all() and float(res.stats.tokens_per_expert.sum()) > 0


# ---------------------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_close_to_fp32(backend, device):
    dim, ffn = 16, 8  # bf16 grouped_mm needs widths that are multiples of 8
    layer = _layer(backend, dim=dim, ffn=ffn, n_shared_experts=1, shared_expert_gate=True).to(device, F32)
    x = _x((3, 5), dim=dim, seed=4).to(device, F32)
    g = _x((3, 5), dim=dim, seed=5).to(device, F32)
    res32, gx32, grads32 = _run(layer, x, g)
    with torch.autocast(device, dtype=torch.bfloat16):
        res16, gx16, grads16 = _run(layer, x, g)
    assert res16.out.dtype == F32  # the layer returns the input dtype
    # routing runs in fp32 under autocast: identical expert choices
    torch.testing.assert_close(res16.stats.routed_per_expert, res32.stats.routed_per_expert, rtol=0, atol=0)
    scale = float(res32.out.detach().abs().max())
    assert float((res16.out - res32.out).detach().abs().max()) < 3e-2 * scale
    assert torch.isfinite(gx16).all()

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    assert rel(gx16, gx32) < 5e-2
    for n in grads32:
        assert grads16[n].dtype == F32  # parameters keep fp32 gradients
        assert rel(grads16[n], grads32[n]) < 5e-2, n
