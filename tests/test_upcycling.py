"""Sparse upcycling (moekit.upcycle): function preserved at initialisation, trainable, exportable, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.config import ModelConfig, MoEConfig
from moekit.model.transformer import Transformer
from moekit.upcycling import upcycle

TOL = 1e-5  # relative to the largest logit


def _dense(**kw) -> Transformer:
    base = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32, init_std=0.1)
    base.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**base)).eval()


def _ids(batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _rel(a: Transformer, b: Transformer) -> float:
    x = _ids()
    la, lb = a.eval()(x).logits, b.eval()(x).logits
    return float((la - lb).abs().max() / lb.abs().max())


CASES = {
    "swiglu-top2": (dict(), MoEConfig(n_experts=4, top_k=2), 1),
    "swiglu-softmax-after-topk": (dict(), MoEConfig(n_experts=8, top_k=1, softmax_after_topk=True), 1),
    "sigmoid-renormalised": (dict(), MoEConfig(n_experts=4, top_k=2, score_func="sigmoid", expert_bias=True), 1),
    "fine-grained-g2": (dict(), MoEConfig(n_experts=8, top_k=4), 2),
    "fine-grained-g4": (dict(), MoEConfig(n_experts=8, top_k=4), 4),
    "gelu-with-biases-g3": (dict(activation="gelu", ffn_bias=True), MoEConfig(n_experts=6, top_k=3), 3),
    "qwen-like-attention": (dict(qkv_bias=True, qk_norm=True), MoEConfig(n_experts=4, top_k=2), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_upcycled_model_equals_dense_at_init(name: str) -> None:
    dense_kw, moe, g = CASES[name]
    dense = _dense(**dense_kw)
    model = upcycle(dense, moe, granularity=g)
    assert model.config.moe_layers == (0, 1, 2)
    assert model.config.moe.expert_ffn_dim == dense.config.ffn_dim // g
    assert _rel(model, dense) < TOL


def test_dense_layers_and_moe_every_are_respected() -> None:
    dense = _dense(n_layers=4)
    model = upcycle(dense, MoEConfig(n_experts=4, top_k=2), first_dense_layers=1, moe_every=2)
    assert model.config.moe_layers == (1, 3)
    assert torch.equal(model.layers[0].ffn.w_in, dense.layers[0].ffn.w_in)
    assert _rel(model, dense) < TOL


def test_negative_controls_can_fail() -> None:
    dense = _dense()
    # noise breaks exact equality; so do weights that do not sum to one (no renormalisation)
    assert _rel(upcycle(dense, MoEConfig(n_experts=4, top_k=2), noise_std=0.05), dense) > 1e-3
    assert _rel(upcycle(dense, MoEConfig(n_experts=4, top_k=2, norm_topk_prob=False)), dense) > 1e-3
    # fine-grained experts without the weight scaling would halve the FFN output
    model = upcycle(dense, MoEConfig(n_experts=8, top_k=4), granularity=2)
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.experts.w_out /= 2
    assert _rel(model, dense) > 1e-3


def test_upcycled_model_trains() -> None:
    dense = _dense()
    model = upcycle(dense, MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.01), noise_std=0.01).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(25):
        out = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    router = model.moe_layers[0].router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    w = model.moe_layers[0].experts.w_in
    assert not torch.allclose(w[0], w[1])  # the copies have drifted apart


def test_upcycle_from_hf_llama_exports_as_mixtral(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    llama = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.15)
        ref = llama(_ids()).logits
    llama.save_pretrained(tmp_path / "llama")
    model = upcycle(tmp_path / "llama", MoEConfig(n_experts=4, top_k=2))
    with torch.no_grad():
        assert float((model(_ids()).logits - ref).abs().max() / ref.abs().max()) < 1e-4
    out = moekit.export_hf(model, tmp_path / "mixtral")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert float((mixtral(_ids()).logits - ref).abs().max() / ref.abs().max()) < 1e-4
    model.save_pretrained(tmp_path / "moekit")
    assert moekit.from_pretrained(tmp_path / "moekit").config == model.config


def test_upcycle_errors() -> None:
    dense = _dense()
    with pytest.raises(ValueError, match="already MoE"):
        upcycle(upcycle(dense, MoEConfig(n_experts=4, top_k=2)), MoEConfig(n_experts=4, top_k=2))
    with pytest.raises(ValueError, match="granularity"):
        upcycle(dense, MoEConfig(n_experts=10, top_k=2), granularity=5)  # 48 % 5 != 0
    with pytest.raises(ValueError, match="n_experts"):
        upcycle(dense, MoEConfig(n_experts=6, top_k=2), granularity=4)
    with pytest.raises(ValueError, match="expert_ffn_dim"):
        upcycle(dense, MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16))
    with pytest.raises(ValueError, match="n_shared_experts"):
        upcycle(dense, MoEConfig(n_experts=4, top_k=2, n_shared_experts=1))
    with pytest.raises(ValueError, match="noise_std"):
        upcycle(dense, MoEConfig(n_experts=4, top_k=2), noise_std=-1.0)


def test_upcycle_keeps_dtype_and_does_not_touch_the_dense_model() -> None:
    dense = _dense()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = upcycle(dense, MoEConfig(n_experts=4, top_k=2), noise_std=0.1)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert model.tok_emb.weight.dtype == dense.tok_emb.weight.dtype
