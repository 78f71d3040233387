"""ModelConfig / MoEConfig: validation (each bad value names its field), JSON round trips, derived fields."""

from __future__ import annotations

import json
import re

import pytest

from moekit.config import ModelConfig, MoEConfig


def _names(field: str) -> str:
    """A regex matching ``field`` as a whole identifier (so 'dim' does not match 'head_dim')."""
    return rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])"


MOE_CASES = [
    # (overrides, field the error must name)
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_experts=0), "n_experts"),
    (dict(top_k=0), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.25), "capacity_factor"),
    (dict(score_func="relu"), "score_func"),
    (dict(activation="tanh"), "activation"),
    (dict(drop_policy="random"), "drop_policy"),
    (dict(overflow_policy="spill"), "overflow_policy"),
    (dict(backend="cuda_magic"), "backend"),
    (dict(group_score="mean"), "group_score"),
    (dict(overflow_policy="reroute"), "overflow_policy"),  # reroute without a capacity
    (dict(n_experts=8, n_groups=3), "n_groups"),
    (dict(n_experts=8, n_groups=0), "n_groups"),
    (dict(n_experts=8, n_groups=4, topk_groups=0), "topk_groups"),
    (dict(n_experts=8, n_groups=4, topk_groups=5), "topk_groups"),
    (dict(n_experts=8, top_k=2, topk_groups=2), "topk_groups"),  # > n_groups=1
    (dict(n_experts=8, top_k=6, n_groups=4, topk_groups=2), "topk_groups"),  # 2 groups hold 4 < 6 experts
    (dict(score_func="sigmoid", softmax_after_topk=True), "softmax_after_topk"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
    (dict(shared_expert_gate=True, n_shared_experts=0), "shared_expert_gate"),
    (dict(aux_loss_coef=-0.01), "aux_loss_coef"),
    (dict(seq_aux_loss_coef=-1e-4), "seq_aux_loss_coef"),
    (dict(z_loss_coef=-1e-3), "z_loss_coef"),
    (dict(bias_update_rate=-1e-3), "bias_update_rate"),
    (dict(activation="swiglu_clamped", swiglu_limit=0.0), "swiglu_limit"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(expert_ffn_dim=0), "expert_ffn_dim"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(input_jitter_eps=1.0), "input_jitter_eps"),
    (dict(logit_noise_std=-0.5), "logit_noise_std"),
]


@pytest.mark.parametrize("overrides,field", MOE_CASES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(MOE_CASES)])
def test_moe_config_rejects(overrides, field):
    with pytest.raises(ValueError, match=_names(field)):
        MoEConfig(**overrides)


MODEL_CASES = [
    (dict(dim=30, n_heads=4), "dim"),
    (dict(dim=32, n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(dim=32, n_heads=4, n_kv_heads=8), "n_kv_heads"),
    (dict(dim=32, n_heads=4, n_kv_heads=0), "n_kv_heads"),
    (dict(activation="relu2"), "activation"),
    (dict(attention="linear"), "attention"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=0), "n_layers"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(ffn_dim=-4), "ffn_dim"),
    (dict(dim=20, n_heads=4), "head_dim"),  # head_dim 5: RoPE needs an even head_dim
    (dict(moe_every=0), "moe_every"),
    (dict(n_layers=2, first_dense_layers=3), "first_dense_layers"),
    (dict(first_dense_layers=-1), "first_dense_layers"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(init_std=0.0), "init_std"),
]


@pytest.mark.parametrize("overrides,field", MODEL_CASES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(MODEL_CASES)])
def test_model_config_rejects(overrides, field):
    with pytest.raises(ValueError, match=_names(field)):
        ModelConfig(**overrides)


def test_valid_edge_values_accepted():
    MoEConfig(n_experts=4, top_k=4)  # top_k == n_experts
    MoEConfig(capacity_factor=1e-3)
    MoEConfig(capacity_factor=1.0, overflow_policy="reroute")
    MoEConfig(n_experts=8, n_groups=4, topk_groups=4)
    MoEConfig(score_func="sigmoid")
    MoEConfig(n_shared_experts=1, shared_expert_gate=True)
    MoEConfig(aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0)
    ModelConfig(dim=32, n_heads=4, n_kv_heads=1)
    ModelConfig(n_layers=2, first_dense_layers=2, moe=MoEConfig())  # all dense is allowed


@pytest.mark.parametrize("where", ["top", "moe"])
def test_from_dict_rejects_unknown_keys(where):
    d = ModelConfig(dim=32, n_heads=4, ffn_dim=64, moe=MoEConfig(n_experts=4, top_k=1)).to_dict()
    if where == "top":
        d["n_layer"] = 3  # a typo of n_layers must not silently become the default
    else:
        d["moe"]["topk"] = 3
    with pytest.raises(ValueError, match="n_layer" if where == "top" else "topk"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="n_layer" if where == "top" else "topk"):
        ModelConfig.from_json(json.dumps(d))


def _moe_model_config() -> ModelConfig:
    moe = MoEConfig(n_experts=8, top_k=2, score_func="sigmoid", n_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                    expert_bias=True, capacity_factor=1.25, drop_policy="probs", overflow_policy="reroute",
                    n_shared_experts=1, shared_expert_gate=True, z_loss_coef=1e-3, seq_aux_loss_coef=1e-4,
                    backend="loop")
    return ModelConfig(vocab_size=101, dim=48, n_layers=5, n_heads=6, n_kv_heads=2, ffn_dim=96, qk_norm=True,
                       tie_embeddings=True, moe=moe, moe_every=2, first_dense_layers=1, name="tiny-moe")


def _tuple_fields_config() -> ModelConfig:
    """Tuples and a nested dict must survive JSON (which has only lists and objects)."""
    return ModelConfig(dim=32, n_heads=4, ffn_dim=64, n_layers=4, moe=MoEConfig(n_experts=4, top_k=1),
                       dense_layers=(2,), layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=8,
                       rope_scaling={"rope_type": "linear", "factor": 2.0}, clip_qkv=8.0, qkv_bias=True)


@pytest.mark.parametrize("make", [_moe_model_config, lambda: ModelConfig(dim=64, n_heads=8, ffn_dim=160, name="dense"),
                                  _tuple_fields_config], ids=["moe", "dense", "tuples"])
def test_json_round_trip(make, tmp_path):
    cfg = make()
    text = cfg.to_json()
    json.loads(text)  # valid JSON
    back = ModelConfig.from_json(text)
    assert back == cfg
    assert back.moe_layers == cfg.moe_layers
    path = tmp_path / "config.json"
    cfg.to_json(path)
    from_file = ModelConfig.from_json(path)
    assert from_file == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    if cfg.moe is None:
        assert back.moe is None and json.loads(text)["moe"] is None
    else:
        assert isinstance(back.moe, MoEConfig)
        assert back.moe == cfg.moe
        assert json.loads(text)["moe"]["n_groups"] == cfg.moe.n_groups
    assert isinstance(back.dense_layers, tuple) and back.dense_layers == cfg.dense_layers
    assert back.layer_types is None or isinstance(back.layer_types, tuple)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json(tmp_path / "nope.json")


def test_derived_fields():
    cfg = ModelConfig(dim=48, n_heads=6, ffn_dim=96)
    assert cfg.head_dim == 8
    assert cfg.n_kv_heads == 6
    assert cfg.moe is None and cfg.moe_layers == ()
    assert not any(cfg.is_moe_layer(i) for i in range(cfg.n_layers))

    cfg = ModelConfig(dim=48, n_heads=6, n_kv_heads=3, head_dim=16, ffn_dim=96)
    assert cfg.head_dim == 16 and cfg.n_kv_heads == 3  # explicit head_dim wins over dim // n_heads

    cfg = ModelConfig(dim=32, n_heads=4, ffn_dim=80, n_layers=7, moe=MoEConfig(n_experts=4, top_k=2),
                      first_dense_layers=2, moe_every=2)
    assert cfg.moe.expert_ffn_dim == 80  # default expert width = ffn_dim
    assert cfg.moe_layers == (2, 4, 6)
    assert [cfg.is_moe_layer(i) for i in range(7)] == [False, False, True, False, True, False, True]

    cfg = ModelConfig(dim=32, n_heads=4, ffn_dim=80, n_layers=3, moe=MoEConfig(n_experts=4, expert_ffn_dim=24))
    assert cfg.moe.expert_ffn_dim == 24  # an explicit expert width is kept
    assert cfg.moe_layers == (0, 1, 2)

    moe = MoEConfig(n_experts=4, expert_ffn_dim=24, n_shared_experts=2)
    assert moe.shared_ffn_dim == 48
    assert MoEConfig(n_experts=4, expert_ffn_dim=24, n_shared_experts=2, shared_expert_ffn_dim=40).shared_ffn_dim == 40
    assert MoEConfig(n_experts=4, expert_ffn_dim=24).shared_ffn_dim == 0


@pytest.mark.parametrize("cf,T,k,E,C", [(1.0, 16, 2, 8, 4), (1.25, 10, 2, 8, 4), (0.5, 7, 1, 4, 1), (2.0, 1, 1, 64, 1),
                                        (1e-3, 5, 2, 4, 1), (1.5, 9, 2, 4, 7), (1.0, 3, 2, 6, 1)])
def test_capacity_formula(cf, T, k, E, C):
    """C = ceil(capacity_factor * T * top_k / n_experts), at least 1 (hand-computed values)."""
    assert MoEConfig(n_experts=E, top_k=k, capacity_factor=cf).capacity(T) == C
