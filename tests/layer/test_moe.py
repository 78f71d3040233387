"""The MoE layer against the float64 reference (tests/reference.py), gradcheck, the dense and soft-mixture
special cases, and the routing statistics (values, tensor-ness, no host syncs)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from reference import ref_moe, state_dict64
from torch.func import functional_call

from moekit.config import MoEConfig
from moekit.layer.experts import MLP
from moekit.layer.moe import MoE, MoEStats

F64 = torch.float64

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: the intra-op thread pool only adds wake-up latency on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_layer(dim: int, seed: int, dtype: torch.dtype = F64, **kw) -> MoE:
    """A layer with weights large enough that routing is decisive (no near-ties) and experts differ."""
    cfg = MoEConfig(**kw)
    torch.manual_seed(seed)
    layer = MoE(dim, cfg)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            fan_in = p.shape[-1]
            std = 1.5 / math.sqrt(fan_in) if name.startswith(("router", "shared_gate")) else 1.0 / math.sqrt(fan_in)
            p.normal_(0.0, std)
    return layer.to(dtype)


def rand(*shape, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 + seed), dtype=F64).to(dtype)


# option mixes: (name, dim, MoEConfig overrides)
OPTIONS = [
    ("softmax-top2", 8, dict(n_experts=4, top_k=2, expert_ffn_dim=12)),
    ("softmax-top1-noshared", 8, dict(n_experts=4, top_k=1, expert_ffn_dim=12)),
    ("softmax-nonorm", 8, dict(n_experts=6, top_k=3, expert_ffn_dim=4, norm_topk_prob=False)),
    ("softmax-after-topk", 8, dict(n_experts=5, top_k=2, expert_ffn_dim=8, softmax_after_topk=True)),
    ("sigmoid-scaled", 8, dict(n_experts=8, top_k=2, expert_ffn_dim=4, score_func="sigmoid",
                               routed_scaling_factor=2.5)),
    ("sigmoid-groups", 8, dict(n_experts=8, top_k=2, expert_ffn_dim=4, score_func="sigmoid", n_groups=4,
                               topk_groups=2)),
    ("shared-nogate", 8, dict(n_experts=4, top_k=2, expert_ffn_dim=4, n_shared_experts=1)),
    ("shared-gate", 8, dict(n_experts=4, top_k=2, expert_ffn_dim=4, n_shared_experts=2, shared_expert_gate=True)),
    ("shared-gate-sigmoid-width", 8, dict(n_experts=4, top_k=2, expert_ffn_dim=4, n_shared_experts=1,
                                          shared_expert_ffn_dim=20, shared_expert_gate=True, score_func="sigmoid")),
    ("gelu", 8, dict(n_experts=4, top_k=2, expert_ffn_dim=12, activation="gelu")),
    ("gelu-shared-finegrained", 12, dict(n_experts=8, top_k=3, expert_ffn_dim=4, activation="gelu",
                                         n_shared_experts=1, shared_expert_ffn_dim=24)),
    ("router-bias-losses", 8, dict(n_experts=4, top_k=2, expert_ffn_dim=12, router_bias=True, z_loss_coef=1e-2,
                                   seq_aux_loss_coef=1e-3, aux_loss_coef=0.1)),
]


def _check_against_reference(layer: MoE, x: torch.Tensor, atol: float = 1e-10, rtol: float = 1e-9) -> None:
    res = layer(x)
    ref = ref_moe(x, state_dict64(layer), layer.config)
    assert res.out.shape == x.shape and res.out.dtype == x.dtype
    torch.testing.assert_close(res.out.double(), ref.out, atol=atol, rtol=rtol)
    torch.testing.assert_close(res.aux_loss.double(), ref.aux_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(res.z_loss.double(), ref.z_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(res.stats.lb_loss.double(), ref.lb_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(res.stats.tokens_per_expert.double(), ref.dispatch.tokens_per_expert)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,dim,kw", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_layer_matches_reference(name, dim, kw, seed):
    layer = make_layer(dim, seed, backend="loop", **kw)
    _check_against_reference(layer, rand(2, 5, dim, seed=seed))  # (B, S, D)


@pytest.mark.parametrize("shape", [(7,), (2, 5), (3, 2, 2), (1, 1, 1)], ids=["T", "BS", "ABS", "one"])
@pytest.mark.parametrize("kw", [dict(seq_aux_loss_coef=1e-2, z_loss_coef=1e-3, n_shared_experts=1,
                                     shared_expert_gate=True),
                                dict(score_func="sigmoid", seq_aux_loss_coef=1e-2, activation="gelu")],
                         ids=["softmax", "sigmoid"])
def test_layer_input_shapes(shape, kw):
    dim = 8
    layer = make_layer(dim, 3, n_experts=4, top_k=2, expert_ffn_dim=12, backend="loop", **kw)
    x = rand(*shape, dim, seed=4)
    _check_against_reference(layer, x)
    # the layer is token-wise: any leading shape gives the (T, D) result, reshaped
    flat = layer(x.reshape(-1, dim)).out
    torch.testing.assert_close(layer(x).out.reshape(-1, dim), flat, rtol=0, atol=0)


def test_float32_layer_matches_reference():
    layer = make_layer(8, 5, dtype=torch.float32, n_experts=4, top_k=2, expert_ffn_dim=12, n_shared_experts=1)
    _check_against_reference(layer, rand(3, 4, 8, seed=5, dtype=torch.float32), atol=2e-5, rtol=2e-5)


def _grads(layer: MoE, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    res = layer(x)
    ((res.out * g).sum() + res.aux_loss + res.z_loss).backward()
    return x.grad, {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}


@pytest.mark.parametrize("backend", ["padded", "grouped"])
@pytest.mark.parametrize("name,dim,kw", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_option_mixes_on_every_backend(name, dim, kw, backend):
    """padded (float64) and grouped (fp32: grouped_mm has no float64) against the reference forward, and every
    gradient against the float64 loop backend (gradchecked below)."""
    loop = make_layer(dim, 0, backend="loop", **kw)
    dtype = F64 if backend == "padded" else torch.float32
    layer = make_layer(dim, 0, dtype=dtype, backend=backend, **kw)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == F64 else dict(atol=2e-5, rtol=2e-5)
    x, g = rand(2, 5, dim, seed=20), rand(2, 5, dim, seed=21)
    _check_against_reference(layer, x.to(dtype), **tol)
    gx64, grads64 = _grads(loop, x, g)
    gx, grads = _grads(layer, x.to(dtype), g.to(dtype))
    torch.testing.assert_close(gx.double(), gx64, **tol)
    assert set(grads) == set(grads64)
    for n in grads64:
        torch.testing.assert_close(grads[n].double(), grads64[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- gradcheck


def _layer_fn(layer: MoE, with_losses: bool = True):
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *params):
        res = functional_call(layer, dict(zip(names, params, strict=True)), (x,))
        return (res.out, res.aux_loss, res.z_loss) if with_losses else res.out

    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    return fn, params


GRADCHECK_CASES = [
    dict(n_experts=4, top_k=2, expert_ffn_dim=3, n_shared_experts=1, shared_expert_gate=True, z_loss_coef=0.1,
         seq_aux_loss_coef=0.1, router_bias=True),
    dict(n_experts=4, top_k=2, expert_ffn_dim=2, score_func="sigmoid", routed_scaling_factor=1.7,
         activation="gelu", aux_loss_coef=0.5),
    dict(n_experts=3, top_k=2, expert_ffn_dim=3, capacity_factor=0.7, drop_policy="probs", z_loss_coef=0.1),
    dict(n_experts=4, top_k=1, expert_ffn_dim=3, capacity_factor=1.0, overflow_policy="reroute"),
]


@pytest.mark.parametrize("backend", ["loop", "padded"])
@pytest.mark.parametrize("kw", GRADCHECK_CASES, ids=["softmax-shared", "sigmoid-gelu", "capacity", "reroute"])
def test_gradcheck_whole_layer(backend, kw):
    layer = make_layer(4, 11, backend=backend, **kw)
    fn, params = _layer_fn(layer)
    x = rand(2, 3, 4, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("backend,dtype", [("loop", F64), ("padded", F64), ("grouped", torch.float32)])
def test_one_expert_top1_is_the_dense_mlp(activation, backend, dtype):
    D, Fw = 8, 12
    torch.manual_seed(0)
    mlp = MLP(D, Fw, activation).to(dtype)
    with torch.no_grad():
        mlp.w_in.normal_(0, 0.4)
        mlp.w_out.normal_(0, 0.4)
    layer = make_layer(D, 1, dtype=dtype, n_experts=1, top_k=1, expert_ffn_dim=Fw, activation=activation,
                       backend=backend)
    with torch.no_grad():
        layer.experts.w_in[0].copy_(mlp.w_in)
        layer.experts.w_out[0].copy_(mlp.w_out)
    x1 = rand(3, 5, D, seed=2, dtype=dtype).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y_moe = layer(x1).out
    y_mlp = mlp(x2)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_moe, y_mlp, **tol)
    g = rand(*y_moe.shape, seed=3, dtype=dtype)
    (y_moe * g).sum().backward()
    (y_mlp * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(layer.experts.w_in.grad[0], mlp.w_in.grad, **tol)
    torch.testing.assert_close(layer.experts.w_out.grad[0], mlp.w_out.grad, **tol)
    # a single expert always gets weight 1: the router gets no gradient from the output
    assert float(layer.router.weight.grad.abs().max()) == 0.0


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_top_k_all_experts_is_the_soft_mixture(norm, activation):
    D, E, Fw = 6, 5, 7
    layer = make_layer(D, 2, n_experts=E, top_k=E, expert_ffn_dim=Fw, norm_topk_prob=norm, activation=activation,
                       backend="loop")
    x = rand(4, 3, D, seed=6).requires_grad_()
    res = layer(x)

    # direct: sum_e softmax(x W^T)_e FFN_e(x), differentiable w.r.t. everything
    xd = x.detach().clone().requires_grad_()
    W = layer.router.weight.detach().clone().requires_grad_()
    w_in = layer.experts.w_in.detach().clone().requires_grad_()
    w_out = layer.experts.w_out.detach().clone().requires_grad_()
    p = (xd @ W.T).softmax(-1)
    direct = torch.zeros_like(xd)
    for e in range(E):
        h = xd @ w_in[e].T
        a = F.silu(h[..., :Fw]) * h[..., Fw:] if activation == "swiglu" else F.gelu(h)
        direct = direct + p[..., e:e + 1] * (a @ w_out[e].T)
    torch.testing.assert_close(res.out, direct, rtol=1e-12, atol=1e-12)

    g = rand(*x.shape, seed=7)
    (res.out * g).sum().backward()
    (direct * g).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.router.weight.grad, W.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.experts.w_in.grad, w_in.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.experts.w_out.grad, w_out.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- stats


def _stats_case(score_func: str, capacity: float | None = None, **kw):
    D = 8
    layer = make_layer(D, 7, n_experts=6, top_k=2, expert_ffn_dim=4, score_func=score_func, router_bias=True,
                       capacity_factor=capacity, backend="loop", **kw)
    with torch.no_grad():  # experts 1 and 4 are never chosen
        layer.router.bias.copy_(torch.tensor([0.0, -40.0, 0.0, 0.0, -40.0, 0.0]))
    x = rand(3, 5, D, seed=8)
    return layer, x, layer(x), ref_moe(x, state_dict64(layer), layer.config)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_stats_dropless(score_func):
    layer, x, res, ref = _stats_case(score_func)
    s = res.stats
    T, K, E = 15, 2, 6
    assert float(s.tokens_per_expert.sum()) == T * K
    assert float(s.routed_per_expert.sum()) == T * K
    # counts from the reference's choices
    counts = torch.bincount(ref.routing.topk_idx.reshape(-1), minlength=E).double()
    torch.testing.assert_close(s.routed_per_expert.double(), counts)
    torch.testing.assert_close(s.tokens_per_expert.double(), counts)
    assert counts[1] == 0 and counts[4] == 0
    torch.testing.assert_close(s.load_imbalance.double(), counts.max() / counts.mean())
    assert int(s.dead_experts) == int((counts == 0).sum()) >= 2
    assert float(s.dropped_frac) == 0.0
    # mean per-token entropy of the routing distribution (sigmoid scores normalised per token)
    logits = ref.routing.logits
    p = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
    ent = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(s.router_entropy.double(), ent, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.lb_loss.double(), ref.lb_loss)


def test_stats_capacity():
    layer, x, res, ref = _stats_case("softmax", capacity=0.6)
    s = res.stats
    T, K = 15, 2
    C = math.ceil(0.6 * T * K / 6)
    assert float(s.routed_per_expert.sum()) == T * K  # the router's load, before capacity
    assert float(s.tokens_per_expert.max()) <= C
    torch.testing.assert_close(s.tokens_per_expert.double(), ref.dispatch.tokens_per_expert)
    torch.testing.assert_close(s.routed_per_expert.double(), ref.dispatch.routed_per_expert)
    kept = float(ref.dispatch.kept.sum())
    assert kept < T * K  # the case really drops
    torch.testing.assert_close(s.dropped_frac.double(), torch.tensor(1 - kept / (T * K), dtype=F64))
    torch.testing.assert_close(res.out, ref.out, rtol=1e-9, atol=1e-10)


def test_all_stats_are_tensors():
    _, _, res, _ = _stats_case("softmax", capacity=1.0)
    stats = res.stats
    assert isinstance(stats, MoEStats)
    for f in dataclasses.fields(stats):
        v = getattr(stats, f.name)
        assert isinstance(v, torch.Tensor), f.name
        assert not v.requires_grad, f.name
    for f in ("load_imbalance", "dropped_frac", "router_entropy", "dead_experts", "lb_loss"):
        assert getattr(stats, f).ndim == 0, f
    assert isinstance(res.aux_loss, torch.Tensor) and isinstance(res.z_loss, torch.Tensor)


def test_grouped_dropless_path_has_no_host_sync(monkeypatch):
    layer = make_layer(8, 9, dtype=torch.float32, n_experts=4, top_k=2, expert_ffn_dim=12, backend="grouped",
                       n_shared_experts=1, shared_expert_gate=True, z_loss_coef=1e-3, seq_aux_loss_coef=1e-3,
                       router_bias=True)
    x = rand(2, 6, 8, seed=9, dtype=torch.float32).requires_grad_()
    layer(x)  # warm-up: the one-time grouped_mm capability check may sync

    def boom(*args, **kwargs):
        raise AssertionError("host sync in the dropless grouped path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    res = layer(x)
    loss = res.out.square().mean() + res.aux_loss + res.z_loss
    loss.backward()
    stats = res.stats
    monkeypatch.undo()
    assert x.grad is not None and layer.experts.w_in.grad is not None
    assert float(stats.tokens_per_expert.sum()) == 24
