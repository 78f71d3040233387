"""Named model configurations: published MoE architectures and small CPU-sized models.

``get_preset(name)`` returns a fresh ``ModelConfig`` (configs are mutable, so every call builds a new one).
The published architectures are for ``moekit.model.costs`` (their parameter counts are checked against
``PUBLISHED`` in ``tests/test_costs.py``); they are far too large to instantiate on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

from moekit.config import ModelConfig, MoEConfig


def _tiny() -> ModelConfig:
    """Two MoE layers at width 64: fast enough for unit tests."""
    return ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=128,
                       moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=128), name="tiny")


def _tiny_mla() -> ModelConfig:
    """DeepSeek-V3's features at toy size: MLA, a dense first layer, a shared expert, sigmoid group routing."""
    return ModelConfig(vocab_size=256, dim=64, n_layers=3, n_heads=4, ffn_dim=192, max_seq_len=128,
                       attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=8, v_head_dim=16, first_dense_layers=1,
                       moe=MoEConfig(n_experts=8, top_k=2, expert_ffn_dim=64, score_func="sigmoid",
                                     routed_scaling_factor=2.5, n_groups=4, topk_groups=2, expert_bias=True,
                                     aux_loss_coef=0.0, seq_aux_loss_coef=1e-4, n_shared_experts=1),
                       name="tiny-mla")


def _small() -> ModelConfig:
    """Byte-level model for CPU experiments; the default of ``moekit compare``.

    Balanced by the aux-loss-free bias rule (DeepSeek-V3 §2.1.2) rather than the Switch loss: on the
    standard-library corpus at 1M tokens the Switch loss at 0.01 cost ~0.05 nats against the bias rule
    (benchmarks/RESULTS.md).
    """
    return ModelConfig(vocab_size=256, dim=192, n_layers=4, n_heads=6, ffn_dim=512, max_seq_len=256,
                       moe=MoEConfig(n_experts=8, top_k=2, expert_ffn_dim=256, expert_bias=True, aux_loss_coef=0.0),
                       name="small")


def _mixtral_8x7b() -> ModelConfig:
    """Mixtral-8x7B (Jiang et al. 2024; HF mistralai/Mixtral-8x7B-v0.1 config.json)."""
    return ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                       ffn_dim=14336, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5,
                       # top-k on the logits, softmax over the chosen two (Mixtral's formulation)
                       moe=MoEConfig(n_experts=8, top_k=2, expert_ffn_dim=14336, softmax_after_topk=True,
                                     aux_loss_coef=0.02),
                       name="mixtral-8x7b")


def _qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B (HF Qwen/Qwen3-30B-A3B config.json; ffn_dim is the unused dense intermediate_size)."""
    return ModelConfig(vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                       ffn_dim=6144, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
                       tie_embeddings=False,
                       moe=MoEConfig(n_experts=128, top_k=8, expert_ffn_dim=768, norm_topk_prob=True,
                                     aux_loss_coef=0.001),
                       name="qwen3-30b-a3b")


def _olmoe_1b_7b() -> ModelConfig:
    """OLMoE-1B-7B (Muennighoff et al. 2024; HF allenai/OLMoE-1B-7B-0924 config.json).

    OLMoE normalises q and k over the whole projection before the head split (q_norm, k_norm [2048] each:
    qk_norm_scope="full"), so the parameter count is the checkpoint's, full-width norms included.
    """
    return ModelConfig(vocab_size=50304, dim=2048, n_layers=16, n_heads=16, ffn_dim=1024, max_seq_len=4096,
                       rope_theta=10000.0, norm_eps=1e-5, qk_norm=True, qk_norm_scope="full",
                       moe=MoEConfig(n_experts=64, top_k=8, expert_ffn_dim=1024, norm_topk_prob=False,
                                     aux_loss_coef=0.01, z_loss_coef=0.001),
                       name="olmoe-1b-7b")


def _deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437; HF deepseek-ai/DeepSeek-V3 config.json), without MTP.

    Balancing is auxiliary-loss-free (expert_bias, update speed 0.001) plus a sequence-wise loss with
    alpha = 0.0001 (paper, sec. 4.2).
    """
    return ModelConfig(vocab_size=129280, dim=7168, n_layers=61, n_heads=128, ffn_dim=18432,
                       max_seq_len=163840, rope_theta=10000.0, norm_eps=1e-6, first_dense_layers=3,
                       attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128,
                       moe=MoEConfig(n_experts=256, top_k=8, expert_ffn_dim=2048, score_func="sigmoid",
                                     norm_topk_prob=True, routed_scaling_factor=2.5, n_groups=8, topk_groups=4,
                                     group_score="top2_sum", expert_bias=True, bias_update_rate=1e-3,
                                     aux_loss_coef=0.0, seq_aux_loss_coef=1e-4, n_shared_experts=1),
                       name="deepseek-v3")


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "tiny-mla": _tiny_mla,
    "small": _small,
    "mixtral-8x7b": _mixtral_8x7b,
    "qwen3-30b-a3b": _qwen3_30b_a3b,
    "olmoe-1b-7b": _olmoe_1b_7b,
    "deepseek-v3": _deepseek_v3,
}

# (total, active) parameters as published. The headline figures are rounded to 2-3 significant digits, so
# an exact count can sit up to one unit of the last digit away (see tests/test_costs.py).
PUBLISHED: dict[str, tuple[float, float]] = {
    # Mistral AI, "Mixtral of experts" blog / model card: "46.7B total parameters ... 12.9B parameters per token"
    "mixtral-8x7b": (46.7e9, 12.9e9),
    # Qwen/Qwen3-30B-A3B model card: "Number of Parameters: 30.5B in total and 3.3B activated"
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    # allenai/OLMoE-1B-7B-0924 model card and OLMoE paper (arXiv:2409.02060): 6.9B total, 1.3B active
    "olmoe-1b-7b": (6.9e9, 1.3e9),
    # deepseek-ai/DeepSeek-V3 model card: "671B total, 37B activated" (671B excludes the 14B MTP module);
    # README_WEIGHTS.md refines the active count to 36.6B, input embedding excluded, output head included
    "deepseek-v3": (671e9, 37e9),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh ``ModelConfig`` for the preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
