"""Tiny configs of every Hugging Face architecture moekit loads, and weights drawn for tests (shared by
tests/formats/test_hf.py and the inference tests).

Each config switches on the architecture's features: sliding windows (mixtral, mistral, qwen2_moe, gpt_oss), shared
experts with and without the gate, dense first layers and MoE every N layers, group-limited routing, the correction
bias and routed scaling, MLA with and without q LoRA, qk-norm, clip_qkv, gpt-oss sinks / biases / clamped SwiGLU,
YaRN and Llama-3 RoPE.
"""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64)


def hf_configs() -> dict:
    """{architecture: a function building its tiny Hugging Face config} (needs transformers)."""
    import transformers as T

    return {
        "mixtral": lambda: T.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=6),
        # 3 layers: layer 0 dense (mlp_only_layers), layer 0 sliding (max_window_layers=2), shared expert + gate
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=48,
                                              moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                              num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0],
                                              use_sliding_window=True, sliding_window=5, max_window_layers=2),
        # MoE every 2nd layer (decoder_sparse_step=2: layer 0 dense), head_dim != hidden/heads, renormalised top-k
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                              num_experts=4, num_experts_per_tok=2, head_dim=16, norm_topk_prob=True,
                                              decoder_sparse_step=2),
        "olmoe": lambda: T.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                       clip_qkv=1.0, pad_token_id=0, eos_token_id=1),
        # group-limited greedy: 8 experts in 2 groups, 1 group kept, top-3 (a real restriction), scaling 1.5
        "deepseek_v2": lambda: T.DeepseekV2Config(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5,
            max_position_embeddings=64),
        # sigmoid + correction bias + group top-2 sums, no q LoRA, YaRN with mscale_all_dim
        "deepseek_v3": lambda: T.DeepseekV3Config(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, q_lora_rank=None, kv_lora_rank=8,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 1.0, "mscale_all_dim": 1.0}),
        # sinks, biases, sliding layers, YaRN without truncation, clamped SwiGLU with an active clamp
        "gpt_oss": lambda: T.GptOssConfig(
            **COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4,
            swiglu_limit=1.0,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}),
        "llama": lambda: T.LlamaConfig(
            **COMMON, intermediate_size=48,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "qwen2": lambda: T.Qwen2Config(**COMMON, intermediate_size=48, tie_word_embeddings=True),
        "mistral": lambda: T.MistralConfig(**COMMON, intermediate_size=48, sliding_window=5),
    }


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough for peaked routing and visible biases, sinks and norms (HF inits them to 0 or 1); works
    on a Hugging Face model and on a moekit one (whose RoPE tables are left alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name or name.startswith("rope_") or not p.is_floating_point():
                continue
            if "norm" in name:
                val = 1 + 0.2 * torch.randn(p.shape, generator=g)
            elif "e_score_correction_bias" in name:
                val = 0.3 * torch.randn(p.shape, generator=g)
            elif "sinks" in name:
                val = torch.randn(p.shape, generator=g)
            elif name.endswith(("mlp.gate.weight", "router.weight", "block_sparse_moe.gate.weight")):
                val = 0.6 * torch.randn(p.shape, generator=g)  # router logits of std ~3
            elif p.ndim == 1 or name.endswith("bias"):
                val = 0.2 * torch.randn(p.shape, generator=g)
            else:
                val = 0.15 * torch.randn(p.shape, generator=g)
            p.copy_(val)


def moekit_config(arch: str):
    """The moekit ModelConfig of the tiny Hugging Face config of ``arch`` (as moekit.from_pretrained maps it)."""
    from moekit.formats.hf import hf_to_config

    return hf_to_config(hf_configs()[arch]().to_dict())
