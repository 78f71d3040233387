"""The transformer: outputs and losses, layer layout, tied embeddings, attention (GQA, qk-norm) against a
float64 reference, the KV cache, max_seq_len, overfitting a tiny batch, and the router-bias update."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.layer.experts import MLP
from moekit.layer.moe import MoE, MoEStats
from moekit.model.transformer import KVCache, ModelOutput, Transformer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: the intra-op thread pool only adds wake-up latency on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(moe: MoEConfig | None = None, **kw) -> ModelConfig:
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=32)
    base.update(kw)
    return ModelConfig(moe=moe, **base)


def _moe(**kw) -> MoEConfig:
    base = dict(n_experts=4, top_k=2, expert_ffn_dim=24)
    base.update(kw)
    return MoEConfig(**base)


def _ids(B: int, S: int, V: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


# ---------------------------------------------------------------------------------------------- outputs, losses


def test_model_output_fields_and_losses():
    cfg = _cfg(_moe(aux_loss_coef=0.1, z_loss_coef=0.01), n_layers=4, first_dense_layers=1, moe_every=2)
    model = _model(cfg)
    captured = []  # the routers' decisions, to recompute the losses by hand
    for m in model.moe_layers:
        m.router.register_forward_hook(lambda mod, inp, out: captured.append(out))
    B, S = 2, 7
    ids = _ids(B, S, cfg.vocab_size)
    targets = _ids(B, S, cfg.vocab_size, seed=1)
    targets[0, :2] = -100  # ignored positions
    out = model(ids, targets)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (B, S, cfg.vocab_size)

    # next-token cross-entropy over the non-ignored targets, by hand
    logp = out.logits.double().log_softmax(-1)
    valid = targets != -100
    lm = -logp[valid, targets[valid]].mean()
    torch.testing.assert_close(out.lm_loss.double(), lm, rtol=1e-6, atol=1e-6)

    # aux = coef * sum over MoE layers of E * sum_e f_e P_e ; z = coef * sum of mean(logsumexp^2)
    assert len(captured) == 2
    aux = z = 0.0
    E, K = cfg.moe.n_experts, cfg.moe.top_k
    for r in captured:
        logits = r.logits_TE.double()
        p = logits.softmax(-1)
        f = torch.zeros(E, dtype=torch.float64).index_add_(0, r.topk_idx_TK.reshape(-1),
                                                           torch.ones(B * S * K, dtype=torch.float64)) / (B * S * K)
        aux = aux + 0.1 * E * (f * p.mean(0)).sum()
        z = z + 0.01 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(out.aux_loss.double(), aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.z_loss.double(), z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)
    assert out.loss.requires_grad and out.loss.ndim == 0

    # one stats entry per layer, None for the dense ones
    assert len(out.stats) == cfg.n_layers
    assert [s is None for s in out.stats] == [True, False, True, False]
    for s in out.stats:
        if s is not None:
            assert isinstance(s, MoEStats)
            assert s.tokens_per_expert.shape == (E,)
            assert float(s.tokens_per_expert.sum()) == B * S * K

    # without targets: logits only
    out = model(ids)
    assert out.loss is None and out.lm_loss is None


def test_dense_model_has_no_aux_losses():
    model = _model(_cfg())
    ids = _ids(2, 5, 61)
    out = model(ids, ids)
    assert out.stats == [None, None]
    assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
    torch.testing.assert_close(out.loss, out.lm_loss)


@pytest.mark.parametrize("n_layers,first_dense,every,expected",
                         [(4, 0, 1, [1, 1, 1, 1]), (5, 1, 2, [0, 1, 0, 1, 0]), (6, 2, 3, [0, 0, 1, 0, 0, 1]),
                          (3, 3, 1, [0, 0, 0])])
def test_layer_kinds(n_layers, first_dense, every, expected):
    cfg = _cfg(_moe(), n_layers=n_layers, first_dense_layers=first_dense, moe_every=every, dim=16, n_heads=2)
    model = _model(cfg)
    kinds = [1 if isinstance(b.ffn, MoE) else 0 for b in model.layers]
    assert kinds == expected
    for b in model.layers:
        if not isinstance(b.ffn, MoE):
            assert isinstance(b.ffn, MLP) and b.ffn.w_out.shape == (cfg.dim, cfg.ffn_dim)
        else:
            assert b.ffn.experts.w_out.shape == (cfg.moe.n_experts, cfg.dim, cfg.moe.expert_ffn_dim)
    assert len(model.moe_layers) == sum(expected)
    out = model(_ids(1, 3, cfg.vocab_size))
    assert [s is not None for s in out.stats] == [bool(k) for k in expected]


def test_tied_embeddings_share_the_tensor():
    tied = _model(_cfg(tie_embeddings=True))
    untied = _model(_cfg(tie_embeddings=False))
    assert tied.lm_head is None
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 61 * 32

    # the untied model with a head copied from the embedding computes the same function ...
    state = {k: v for k, v in tied.state_dict().items()}
    state["lm_head.weight"] = tied.tok_emb.weight.detach().clone()
    untied.load_state_dict(state)
    ids = _ids(2, 6, 61)
    out_t, out_u = tied(ids, ids), untied(ids, ids)
    torch.testing.assert_close(out_t.logits, out_u.logits)
    # ... and the tied embedding's gradient is the sum of the two untied gradients (one shared tensor)
    out_t.loss.backward()
    out_u.loss.backward()
    torch.testing.assert_close(tied.tok_emb.weight.grad, untied.tok_emb.weight.grad + untied.lm_head.weight.grad,
                               rtol=1e-5, atol=1e-7)
    # changing the embedding changes the head
    with torch.no_grad():
        tied.tok_emb.weight[5] += 1.0
    assert not torch.allclose(tied(ids).logits[..., 5], out_t.logits[..., 5])


# ---------------------------------------------------------------------------------------------- attention


def _ref_attention(attn, x, theta: float, eps: float, qk_norm: bool) -> torch.Tensor:
    """Float64 causal attention with RoPE (rotate-half), optional per-head RMS qk-norm, and kv heads shared by
    consecutive groups of query heads (head h reads kv head h // (H // G))."""
    x = x.double()
    B, S, _ = x.shape
    H, G = attn.n_heads, attn.n_kv_heads
    Dh = attn.head_dim
    q = (x @ attn.wq.weight.double().T).view(B, S, H, Dh)
    k = (x @ attn.wk.weight.double().T).view(B, S, G, Dh)
    v = (x @ attn.wv.weight.double().T).view(B, S, G, Dh)
    if qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps) * attn.q_norm.weight.double()
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps) * attn.k_norm.weight.double()
    pos = torch.arange(S, dtype=torch.float64)
    inv = theta ** (-torch.arange(0, Dh // 2, dtype=torch.float64) * 2 / Dh)
    ang = pos[:, None] * inv[None, :]  # [S, Dh/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rope(t):
        a, b = t[..., : Dh // 2], t[..., Dh // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    q, k = rope(q), rope(k)
    out = torch.zeros(B, S, H, Dh, dtype=torch.float64)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for h in range(H):
        g = h // (H // G)
        s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) / math.sqrt(Dh)
        s = s.masked_fill(~causal, float("-inf"))
        out[:, :, h] = torch.einsum("bij,bjd->bid", s.softmax(-1), v[:, :, g])
    return out.reshape(B, S, H * Dh) @ attn.wo.weight.double().T


@pytest.mark.parametrize("n_kv_heads,qk_norm", [(4, False), (2, False), (1, True), (2, True)])
def test_attention_matches_reference(n_kv_heads, qk_norm):
    cfg = _cfg(n_kv_heads=n_kv_heads, qk_norm=qk_norm, rope_theta=500.0)
    model = _model(cfg)
    attn = model.layers[0].attn
    assert attn.wk.weight.shape == (n_kv_heads * cfg.head_dim, cfg.dim)
    if qk_norm:  # non-trivial norm weights so the test sees them
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    else:
        assert attn.q_norm is None and attn.k_norm is None
    x = torch.randn(2, 9, cfg.dim, generator=torch.Generator().manual_seed(3))
    S = x.shape[1]
    got = attn(x, model.rope_cos[:S], model.rope_sin[:S], None)
    want = _ref_attention(attn, x, cfg.rope_theta, cfg.norm_eps, qk_norm)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_qk_norm_changes_the_model():
    a = _model(_cfg(qk_norm=False))
    b = _model(_cfg(qk_norm=True))
    assert b.layers[0].attn.q_norm is not None
    assert sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in a.parameters()) == 2 * 2 * 8
    with torch.no_grad():
        for blk in b.layers:  # qk-norm with unit weights normalises each head: scale q/k up, outputs differ
            blk.attn.wq.weight.mul_(7.0)
    ids = _ids(1, 8, 61)
    out = b(ids, ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert b.layers[0].attn.q_norm.weight.grad is not None
    assert b.layers[0].attn.q_norm.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("moe", [None, _moe()], ids=["dense", "moe"])
def test_kv_cache_matches_full_forward(moe):
    cfg = _cfg(moe, n_kv_heads=2, qk_norm=True, n_layers=3, first_dense_layers=1 if moe else 0, max_seq_len=24)
    model = _model(cfg).eval()
    B, S = 2, 13
    ids = _ids(B, S, cfg.vocab_size, seed=5)
    with torch.no_grad():
        full = model(ids).logits

        # prefill 5, then one token at a time
        cache = KVCache(cfg, batch=B)
        parts = [model(ids[:, :5], cache=cache).logits]
        for t in range(5, S):
            parts.append(model(ids[:, t:t + 1], cache=cache).logits)
        assert cache.pos == S
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)

        # prefill 3, a chunk of 4 after the cache, a chunk of 1, then a chunk of 5
        cache = KVCache(cfg, batch=B)
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in [(0, 3), (3, 7), (7, 8), (8, 13)]]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.k[0].shape == (B, 2, cfg.max_seq_len, cfg.head_dim)


def test_aux_false_same_logits_no_losses_or_stats():
    """Inference without balancing losses and routing statistics (generation): the same logits, with and
    without a cache; aux_loss/z_loss None, stats all None; the loss is the LM loss; refused in training."""
    cfg = _cfg(_moe(aux_loss_coef=0.1, z_loss_coef=0.01, n_shared_experts=1), n_layers=3, first_dense_layers=1)
    model = _model(cfg).eval()
    ids, targets = _ids(2, 9, cfg.vocab_size), _ids(2, 9, cfg.vocab_size, seed=1)
    with torch.no_grad():
        full, lean = model(ids, targets), model(ids, targets, aux=False)
        # (18 tokens of a small layer take the few-token path: aux=False runs the router and the experts as one
        # compiled kernel, aux=True as two calls, so fp32 rounding may differ in the last bit)
        torch.testing.assert_close(lean.logits, full.logits, rtol=1e-5, atol=1e-6)
        assert lean.aux_loss is None and lean.z_loss is None and lean.stats == [None, None, None]
        assert full.aux_loss > 0 and float(lean.loss) == float(lean.lm_loss) == float(full.lm_loss)
        cache = KVCache(cfg, batch=2)
        parts = [model(ids[:, :4], cache=cache, aux=False).logits]
        parts += [model(ids[:, t:t + 1], cache=cache, aux=False).logits for t in range(4, 9)]
        torch.testing.assert_close(torch.cat(parts, 1), full.logits, rtol=1e-5, atol=1e-5)
    model.train()
    with pytest.raises(ValueError, match="aux=False"):
        model(ids, aux=False)


def test_max_seq_len_enforced():
    cfg = _cfg(max_seq_len=8)
    model = _model(cfg)
    model(_ids(1, 8, 61))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_ids(1, 9, 61))
    cache = KVCache(cfg, batch=1)
    with torch.no_grad():
        model(_ids(1, 6, 61), cache=cache)
        model(_ids(1, 2, 61), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(_ids(1, 1, 61), cache=cache)
    assert cache.pos == 8
    small = KVCache(cfg, batch=1, max_len=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_ids(1, 5, 61), cache=small)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("moe", [None, _moe(n_experts=4, top_k=2, z_loss_coef=1e-3)], ids=["dense", "moe"])
def test_overfits_a_tiny_batch(moe):
    cfg = _cfg(moe, vocab_size=32, dim=32, n_layers=2, n_heads=4, ffn_dim=64)
    model = _model(cfg)
    ids = _ids(4, 17, cfg.vocab_size, seed=7)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        out = model(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.lm_loss.detach()))
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # small init: near uniform
    assert losses[-1] < 0.5 * losses[0], losses
    if moe is not None:
        router = model.moe_layers[0].router
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        experts = model.moe_layers[0].experts
        assert experts.w_in.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- router biases


def test_update_router_biases_per_layer():
    cfg = _cfg(_moe(expert_bias=True, bias_update_rate=0.1), n_layers=3)
    model = _model(cfg)
    moes = model.moe_layers
    assert len(moes) == 3 and len({id(m.router) for m in moes}) == 3
    loads = [torch.tensor([4.0, 0.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 1.0, 5.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])]
    model.update_router_biases(loads)
    # b_e += rate * sign(mean - load_e)
    torch.testing.assert_close(moes[0].router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(moes[1].router.expert_bias, torch.tensor([0.1, 0.1, 0.1, -0.1]))
    torch.testing.assert_close(moes[2].router.expert_bias, torch.zeros(4))
    model.update_router_biases(loads)
    torch.testing.assert_close(moes[0].router.expert_bias, torch.tensor([-0.2, 0.2, 0.0, 0.0]))
    # the loads observed in a forward are accepted as-is
    out = model(_ids(2, 5, cfg.vocab_size))
    model.update_router_biases([s.routed_per_expert for s in out.stats])
    with pytest.raises(ValueError, match="load_per_layer"):
        model.update_router_biases(loads[:2])
    # the bias is a buffer, not a parameter, and stays fp32
    assert all("expert_bias" not in n for n, _ in model.named_parameters())
    model.to(torch.bfloat16)
    assert moes[0].router.expert_bias.dtype == torch.float32


def test_update_router_biases_shared_router():
    cfg = _cfg(_moe(expert_bias=True, bias_update_rate=0.1, shared_router=True), n_layers=3, first_dense_layers=1)
    model = _model(cfg)
    moes = model.moe_layers
    assert len(moes) == 2 and moes[0].router is moes[1].router
    # one router in the parameter list
    router_params = [n for n, _ in model.named_parameters() if "router" in n]
    assert len(router_params) == 1
    loads = [torch.tensor([3.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 3.0])]
    model.update_router_biases(loads)  # summed: [3, 0, 2, 3], mean 2
    torch.testing.assert_close(moes[0].router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, -0.1]))
    assert moes[1].router.expert_bias is moes[0].router.expert_bias


def test_expert_bias_steers_selection_only():
    cfg = _cfg(_moe(expert_bias=True), n_layers=1)
    model = _model(cfg)
    moe = model.moe_layers[0]
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 10.0]))
    out = model(_ids(2, 6, cfg.vocab_size))
    s = out.stats[0]
    # every token picks experts 2 and 3
    torch.testing.assert_close(s.routed_per_expert, torch.tensor([0.0, 0.0, 12.0, 12.0]))
    assert int(s.dead_experts) == 2
