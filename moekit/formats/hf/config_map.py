"""Hugging Face ``config.json`` <-> ``ModelConfig``, per architecture.

Sources: /work/shared/reference/hf-moe-formats.md (sections 0.2, 1.1-1.7, 2) and the ``configuration_*.py``
files of transformers 5.23/5.24. Keys a config.json may omit take the defaults of the transformers
config classes (``_DEFAULTS``). Both RoPE forms are read: 5.x ``rope_parameters`` and the legacy
``rope_theta`` + ``rope_scaling`` (reference section 0.2).

Anything moekit cannot reproduce exactly raises ``UnsupportedCheckpointError`` naming the architecture
and the key: another ``model_type``, a ``quantization_config``, an activation other than SiLU, a RoPE
type other than default/linear/llama3/yarn, partial rotary embeddings, MLA with attention biases, ...
Export checks the reverse: a moekit feature the target architecture cannot express is named.

Training-only differences (they do not change logits): mixtral's ``router_jitter_noise`` becomes
``MoEConfig.input_jitter_eps``, which jitters the router input only (HF jitters the tensor the experts also
read, reference doc 1.1); ``router_aux_loss_coef`` becomes ``aux_loss_coef``; DeepSeek, for which
transformers computes no auxiliary loss, gets ``aux_loss_coef=0`` and the sequence-wise loss of the hub
keys ``aux_loss_alpha``/``seq_aux`` when present.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.formats.checkpoint import CheckpointError

# model_type -> the causal-LM class written to config.json "architectures"
ARCHITECTURES: dict[str, str] = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
DENSE_ARCHS = ("llama", "qwen2", "mistral")
MOE_ARCHS = tuple(a for a in ARCHITECTURES if a not in DENSE_ARCHS)

# Defaults of the transformers config classes for keys that older or hand-written config.json files omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, router_aux_loss_coef=0.001, router_jitter_noise=0.0,
                    num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(rope_theta=10000.0, rms_norm_eps=1e-6, norm_topk_prob=False, decoder_sparse_step=1,
                      qkv_bias=True, router_aux_loss_coef=0.001, num_experts=60, num_experts_per_tok=4,
                      use_sliding_window=False, max_window_layers=28),
    "qwen3_moe": dict(rope_theta=10000.0, rms_norm_eps=1e-6, norm_topk_prob=False, decoder_sparse_step=1,
                      attention_bias=False, router_aux_loss_coef=0.001, num_experts=128, num_experts_per_tok=8,
                      use_sliding_window=False),
    "olmoe": dict(rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False, attention_bias=False,
                  router_aux_loss_coef=0.01, num_experts=64, num_experts_per_tok=8, clip_qkv=None),
    "deepseek_v2": dict(rope_theta=10000.0, rms_norm_eps=1e-6, topk_method="greedy", routed_scaling_factor=1.0,
                        first_k_dense_replace=0, n_shared_experts=2, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, attention_bias=False,
                        mlp_bias=False, n_routed_experts=64),
    "deepseek_v3": dict(rope_theta=10000.0, rms_norm_eps=1e-6, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                        norm_topk_prob=True, first_k_dense_replace=3, n_shared_experts=1, q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        attention_bias=False, rope_interleave=True, n_routed_experts=256, num_experts_per_tok=8),
    "gpt_oss": dict(rms_norm_eps=1e-5, attention_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0,
                    router_aux_loss_coef=0.001, num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
                    head_dim=64),
    "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False),
    "qwen2": dict(rope_theta=10000.0, rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=28),
    "mistral": dict(rope_theta=10000.0, rms_norm_eps=1e-6, sliding_window=4096),
}
# gpt-oss's default rope_parameters when config.json has none (GptOssConfig.__post_init__)
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}
_MISSING = object()


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint (or the export target) uses something moekit cannot reproduce exactly."""


def _unsupported(arch: str, msg: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(f"{arch}: {msg}")


# ---------------------------------------------------------------------------------------------- import
class _Keys:
    """config.json access with per-architecture defaults; a missing required key raises naming it."""

    def __init__(self, hf: dict[str, Any], arch: str):
        self.hf, self.arch = hf, arch

    def __call__(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        if key in _DEFAULTS[self.arch]:
            return _DEFAULTS[self.arch][key]
        if default is _MISSING:
            raise CheckpointError(f"{self.arch}: config.json has no {key!r} (required)")
        return default

    def first(self, *keys: str) -> Any:
        """The first of ``keys`` (aliases through HF attribute_map) present in config.json, else the default of
        the first key."""
        for key in keys:
            if self.hf.get(key) is not None:
                return self.hf[key]
        return self(keys[0])


def hf_arch_of(hf: dict[str, Any]) -> str:
    """The model_type of a Hugging Face config.json, checked against the supported architectures."""
    arch = hf.get("model_type")
    if arch is None:
        raise CheckpointError("config.json has no 'model_type': not a Hugging Face config")
    if arch not in ARCHITECTURES:
        raise UnsupportedCheckpointError(f"unsupported architecture model_type={arch!r}; moekit loads "
                                         f"{', '.join(ARCHITECTURES)}")
    return arch


def _rope(k: _Keys) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from rope_parameters (5.x) or rope_theta + rope_scaling (legacy)."""
    hf, arch = k.hf, k.arch
    rp = hf.get("rope_parameters") or hf.get("rope_scaling")
    if rp is None and arch == "gpt_oss":
        rp = dict(_GPT_OSS_ROPE)
    rp = dict(rp or {})
    if any(isinstance(v, dict) for v in rp.values()):
        raise _unsupported(arch, "per-layer-type rope_parameters are not supported")
    rope_type = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    theta = rp.pop("rope_theta", None) or hf.get("rope_theta") or _DEFAULTS[arch].get("rope_theta", 10000.0)
    prf = rp.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor")
    if prf not in (None, 1, 1.0):
        raise _unsupported(arch, f"partial_rotary_factor={prf} (partial RoPE) is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ("linear", "llama3", "yarn"):
        raise _unsupported(arch, f"rope_parameters.rope_type={rope_type!r} is not supported "
                                 "(supported: default, linear, llama3, yarn)")
    if rope_type in ("llama3", "yarn"):
        # HF standardize_rope_params: a missing original_max_position_embeddings defaults to max_position_embeddings
        rp.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings")
                      or k("max_position_embeddings"))
    return float(theta), {"rope_type": rope_type, **rp}


def _renorm(norm_topk_prob: bool) -> dict[str, Any]:
    """Softmax routing with renormalised top-k == softmax over the chosen logits (exact for any k)."""
    return dict(softmax_after_topk=True) if norm_topk_prob else dict(norm_topk_prob=False)


def _windows(k: _Keys, n_layers: int) -> dict[str, Any]:
    """sliding_window / layer_types per architecture (reference doc 1.1-1.3, 2; HF configuration files)."""
    hf, arch = k.hf, k.arch
    if arch in ("mixtral", "mistral"):  # one window for every layer, or none
        sw = k("sliding_window", None)
        return dict(sliding_window=int(sw) if sw else None, layer_types=None)
    if arch == "qwen3_moe":
        sw = hf.get("sliding_window") if k("use_sliding_window") else None
        return dict(sliding_window=int(sw) if sw else None, layer_types=None)
    if arch in ("qwen2", "qwen2_moe"):
        if not k("use_sliding_window"):
            return dict(sliding_window=None, layer_types=None)
        sw = hf.get("sliding_window")
        types = hf.get("layer_types")
        if types is None:
            mwl = k("max_window_layers")
            if arch == "qwen2":  # Qwen2Config: layers >= max_window_layers slide
                types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
            else:  # Qwen2MoeConfig: even layers below max_window_layers slide
                types = ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention"
                         for i in range(n_layers)]
        if not sw or "sliding_attention" not in types:
            return dict(sliding_window=None, layer_types=None)
        return dict(sliding_window=int(sw), layer_types=tuple(types))
    if arch == "gpt_oss":
        sw = k("sliding_window")
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                          for i in range(n_layers)]
        if not sw or "sliding_attention" not in types:
            return dict(sliding_window=None, layer_types=None)
        return dict(sliding_window=int(sw), layer_types=tuple(types))
    return dict(sliding_window=None, layer_types=None)


def hf_to_config(hf: dict[str, Any]) -> ModelConfig:
    """A ModelConfig computing the same function as the Hugging Face config ``hf`` (a config.json dict)."""
    arch = hf_arch_of(hf)
    k = _Keys(hf, arch)
    if hf.get("quantization_config"):
        qc = hf["quantization_config"]
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise _unsupported(arch, f"quantized checkpoints are not supported (quantization_config.quant_method="
                                 f"{method!r}); use a bf16/fp32 checkpoint")
    if arch != "gpt_oss" and k("hidden_act", "silu") != "silu":  # gpt-oss's hidden_act is unused by its experts
        raise _unsupported(arch, f"hidden_act={k('hidden_act')!r} is not supported (only silu)")
    for key in ("pretraining_tp",):
        if hf.get(key) not in (None, 1):
            raise _unsupported(arch, f"{key}={hf[key]} is not supported")
    D, L, H = int(k("hidden_size")), int(k("num_hidden_layers")), int(k("num_attention_heads"))
    theta, scaling = _rope(k)
    base: dict[str, Any] = dict(
        vocab_size=int(k("vocab_size")), dim=D, n_layers=L, n_heads=H,
        n_kv_heads=int(k("num_key_value_heads", H)), head_dim=hf.get("head_dim") or None,
        ffn_dim=int(k("intermediate_size")), max_seq_len=int(k("max_position_embeddings")),
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(k("rms_norm_eps")),
        tie_embeddings=bool(k("tie_word_embeddings", False)), init_std=float(k("initializer_range", 0.02)),
        name=str(hf.get("_name_or_path") or ""), hf_arch=arch,
    )
    if arch not in ("deepseek_v2", "deepseek_v3"):
        base.update(_windows(k, L))
    aux = float(k("router_aux_loss_coef", 0.0))
    moe: MoEConfig | None = None

    if arch == "mixtral":
        moe = MoEConfig(n_experts=int(k.first("num_local_experts", "num_experts")),
                        top_k=int(k("num_experts_per_tok")),
                        expert_ffn_dim=int(k("intermediate_size")), softmax_after_topk=True, aux_loss_coef=aux,
                        input_jitter_eps=float(k("router_jitter_noise")))
    elif arch in ("qwen2_moe", "qwen3_moe"):
        if arch == "qwen2_moe":
            base.update(qkv_bias=bool(k("qkv_bias")))
        else:
            bias = bool(k("attention_bias"))
            base.update(qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_scope="head")
        n_experts = int(k.first("num_experts", "num_local_experts"))
        if n_experts > 0:
            shared: dict[str, Any] = {}
            if arch == "qwen2_moe" and int(k("shared_expert_intermediate_size", 0)) > 0:
                shared = dict(n_shared_experts=1, shared_expert_ffn_dim=int(k("shared_expert_intermediate_size")),
                              shared_expert_gate=True)
            moe = MoEConfig(n_experts=n_experts, top_k=int(k("num_experts_per_tok")),
                            expert_ffn_dim=int(k("moe_intermediate_size")), aux_loss_coef=aux,
                            **_renorm(bool(k("norm_topk_prob"))), **shared)
            step = int(k("decoder_sparse_step"))
            # layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0 (reference doc 1.2)
            base.update(first_dense_layers=min(step - 1, L), moe_every=step,
                        dense_layers=tuple(int(i) for i in (hf.get("mlp_only_layers") or []) if int(i) < L))
    elif arch == "olmoe":
        bias = bool(k("attention_bias"))
        base.update(qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_scope="full", clip_qkv=k("clip_qkv", None))
        moe = MoEConfig(n_experts=int(k.first("num_experts", "num_local_experts")),
                        top_k=int(k("num_experts_per_tok")),
                        expert_ffn_dim=int(k("intermediate_size")), aux_loss_coef=aux,
                        **_renorm(bool(k("norm_topk_prob"))))
    elif arch in ("deepseek_v2", "deepseek_v3"):
        if k("attention_bias"):
            raise _unsupported(arch, "attention_bias=true (biases in multi-head latent attention) is not supported")
        if k("mlp_bias", False):
            raise _unsupported(arch, "mlp_bias=true is not supported")
        if int(hf.get("num_key_value_heads") or H) != H:
            raise _unsupported(arch, f"num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={H}")
        if hf.get("moe_layer_freq", 1) != 1:
            raise _unsupported(arch, f"moe_layer_freq={hf['moe_layer_freq']} (transformers ignores it; only 1 "
                                     "is loaded)")
        if hf.get("scoring_func", "sigmoid" if arch == "deepseek_v3" else "softmax") != (
                "sigmoid" if arch == "deepseek_v3" else "softmax"):
            raise _unsupported(arch, f"scoring_func={hf['scoring_func']!r} is not what transformers computes")
        rope_r = int(k("qk_rope_head_dim"))
        q_lora = hf.get("q_lora_rank", _DEFAULTS[arch]["q_lora_rank"])
        base.update(attention="mla", n_kv_heads=H, head_dim=rope_r, q_lora_rank=None if q_lora is None else int(q_lora),
                    kv_lora_rank=int(k("kv_lora_rank")), qk_nope_head_dim=int(k("qk_nope_head_dim")),
                    qk_rope_head_dim=rope_r, v_head_dim=int(k("v_head_dim")),
                    rope_interleaved=True if arch == "deepseek_v2" else bool(k("rope_interleave")),
                    first_dense_layers=min(int(k("first_k_dense_replace")), L))
        top_k = hf.get("num_experts_per_tok")
        if top_k is None:
            raise CheckpointError(f"{arch}: config.json has no 'num_experts_per_tok' (required)")
        n_experts = int(k.first("n_routed_experts", "num_local_experts", "num_experts"))
        common = dict(n_experts=n_experts, top_k=int(top_k), expert_ffn_dim=int(k("moe_intermediate_size")),
                      n_shared_experts=int(k("n_shared_experts") or 0),
                      routed_scaling_factor=float(k("routed_scaling_factor")), aux_loss_coef=0.0,
                      seq_aux_loss_coef=float(hf.get("aux_loss_alpha") or 0.0) if hf.get("seq_aux") else 0.0)
        if arch == "deepseek_v2":  # softmax, top-k without renormalisation (norm_topk_prob is ignored by HF)
            method = k("topk_method")
            if method == "greedy":
                groups: dict[str, Any] = {}
            elif method == "group_limited_greedy":
                groups = dict(n_groups=int(k("n_group")), topk_groups=int(k("topk_group")), group_score="max")
            else:
                raise _unsupported(arch, f"topk_method={method!r} (transformers supports greedy and "
                                         "group_limited_greedy)")
            moe = MoEConfig(score_func="softmax", norm_topk_prob=False, **groups, **common)
        else:  # sigmoid, selection-only correction bias, group top-2 sums (reference doc 1.6)
            norm = bool(k("norm_topk_prob"))
            if norm and int(top_k) == 1:
                raise _unsupported(arch, "num_experts_per_tok=1 with norm_topk_prob=true (weight 1.0) is not "
                                         "supported: moekit keeps the sigmoid score for a single expert")
            n_group = int(k("n_group"))
            groups = dict(n_groups=n_group, topk_groups=int(k("topk_group")), group_score="top2_sum") \
                if n_group > 1 else {}
            moe = MoEConfig(score_func="sigmoid", norm_topk_prob=norm, expert_bias=True, **groups, **common)
    elif arch == "gpt_oss":
        bias = bool(k("attention_bias"))
        base.update(qkv_bias=bias, o_bias=bias, attn_sinks=True, head_dim=int(k("head_dim")))
        moe = MoEConfig(n_experts=int(k.first("num_local_experts", "num_experts")),
                        top_k=int(k("num_experts_per_tok")),
                        expert_ffn_dim=int(k("intermediate_size")), router_bias=True, softmax_after_topk=True,
                        ffn_bias=True, activation="swiglu_clamped", swiglu_limit=float(k("swiglu_limit")),
                        swiglu_alpha=float(k("swiglu_alpha")), aux_loss_coef=aux)
    elif arch == "llama":
        bias = bool(k("attention_bias"))
        base.update(qkv_bias=bias, o_bias=bias, ffn_bias=bool(k("mlp_bias")))
    elif arch == "qwen2":
        base.update(qkv_bias=True)
    try:
        return ModelConfig(**base, moe=moe)
    except ValueError as e:
        raise CheckpointError(f"{arch}: config.json describes a model moekit cannot build ({e})") from e


# ---------------------------------------------------------------------------------------------- export
def _all_moe(cfg: ModelConfig) -> bool:
    return cfg.moe is not None and cfg.moe_layers == tuple(range(cfg.n_layers))


def export_problems(cfg: ModelConfig, arch: str) -> list[str]:
    """Why ``cfg`` cannot be written as ``arch`` (empty when it can), one reason per feature."""
    if arch not in ARCHITECTURES:
        return [f"unknown architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"]
    p: list[str] = []
    m = cfg.moe
    mla = cfg.attention == "mla"
    is_ds = arch in ("deepseek_v2", "deepseek_v3")

    def need(cond: bool, why: str) -> None:
        if not cond:
            p.append(why)

    need(cfg.activation == "swiglu" or not any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers)),
         f"dense activation={cfg.activation!r} (only swiglu)")
    need(not cfg.ffn_bias or arch == "llama", "ffn_bias=True (dense FFN biases)")
    need(mla == is_ds, "attention='mla'" if mla else "attention='mha' (DeepSeek uses MLA)")
    need(cfg.rope_interleaved == (arch == "deepseek_v2") or arch == "deepseek_v3",
         f"rope_interleaved={cfg.rope_interleaved}")
    need(not cfg.attn_sinks or arch == "gpt_oss", "attn_sinks=True")
    need(cfg.attn_sinks or arch != "gpt_oss", "attn_sinks=False (gpt-oss always has sinks)")
    need(cfg.clip_qkv is None or arch == "olmoe", f"clip_qkv={cfg.clip_qkv}")
    qk = {"qwen3_moe": "head", "olmoe": "full"}.get(arch)
    need(cfg.qk_norm == (qk is not None) and (qk is None or cfg.qk_norm_scope == qk),
         f"qk_norm={cfg.qk_norm} (scope {cfg.qk_norm_scope!r})"
         + (f"; {arch} needs qk_norm scope {qk!r}" if qk else ""))
    bias_rule = {"qwen2": (True, False), "qwen2_moe": None, "mixtral": (False, False), "mistral": (False, False),
                 "deepseek_v2": (False, False), "deepseek_v3": (False, False)}.get(arch)
    if arch == "qwen2_moe":
        need(not cfg.o_bias, "o_bias=True (Qwen2-MoE has q/k/v biases only)")
    elif bias_rule is not None:
        need((cfg.qkv_bias, cfg.o_bias) == bias_rule, f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
    else:  # llama, qwen3_moe, olmoe, gpt_oss: one attention_bias for all four projections
        need(cfg.qkv_bias == cfg.o_bias, f"qkv_bias={cfg.qkv_bias} with o_bias={cfg.o_bias}")
    # sliding windows
    slides = [cfg.layer_window(i) is not None for i in range(cfg.n_layers)]
    if arch in ("llama", "olmoe", "deepseek_v2", "deepseek_v3"):
        need(not any(slides), "sliding-window layers")
    elif arch in ("mixtral", "mistral", "qwen3_moe"):
        need(all(slides) or not any(slides), "sliding window on some layers only")
    # MoE
    if arch in DENSE_ARCHS:
        need(m is None, "an MoE config (use a MoE architecture)")
        return p
    if m is None:
        p.append(f"a dense model ({arch} is an MoE architecture)")
        return p
    need(not m.shared_router, "moe.shared_router=True")
    need(m.capacity_factor is None, "moe.capacity_factor (token dropping)")
    gpt = arch == "gpt_oss"
    need(m.activation == ("swiglu_clamped" if gpt else "swiglu"), f"moe.activation={m.activation!r}")
    need(m.ffn_bias == gpt, f"moe.ffn_bias={m.ffn_bias}")
    need(m.router_bias == gpt, f"moe.router_bias={m.router_bias}")
    need(not m.expert_bias or arch == "deepseek_v3", "moe.expert_bias=True (selection bias)")
    need(m.score_func == ("sigmoid" if arch == "deepseek_v3" else "softmax"), f"moe.score_func={m.score_func!r}")
    need(m.routed_scaling_factor == 1.0 or is_ds, f"moe.routed_scaling_factor={m.routed_scaling_factor}")
    renorm = m.softmax_after_topk or (m.norm_topk_prob and m.top_k > 1)
    if arch in ("mixtral", "gpt_oss"):
        need(renorm, "top-k weights without renormalisation")
    if arch == "deepseek_v2":
        need(not renorm, "renormalised top-k weights (DeepSeek-V2 never renormalises)")
    if arch == "deepseek_v3":
        need(not (m.norm_topk_prob and m.top_k == 1), "top_k=1 with norm_topk_prob")
    if arch in ("qwen2_moe", "qwen3_moe", "olmoe"):
        need(renorm or not m.norm_topk_prob, "top_k=1 with norm_topk_prob (moekit keeps the probability)")
    if m.n_groups > 1:
        need(is_ds, f"moe.n_groups={m.n_groups} (group-limited routing)")
        if arch == "deepseek_v2":
            need(m.group_score == "max", "moe.group_score='top2_sum'")
        if arch == "deepseek_v3":
            need(m.group_score == "top2_sum", "moe.group_score='max'")
    if arch == "qwen2_moe":
        need(m.n_shared_experts == 1 and m.shared_expert_gate, "Qwen2-MoE needs one gated shared expert")
    elif is_ds:
        need(m.n_shared_experts >= 1 and not m.shared_expert_gate and m.shared_expert_ffn_dim in (
            None, m.n_shared_experts * (m.expert_ffn_dim or 0)), "DeepSeek needs n_shared_experts >= 1 ungated "
             "shared experts of width n_shared_experts * expert_ffn_dim")
    else:
        need(m.n_shared_experts == 0, "shared experts")
    if arch in ("mixtral", "olmoe", "gpt_oss"):
        need(_all_moe(cfg), "dense layers (every layer is MoE)")
    if is_ds:
        need(cfg.moe_layers == tuple(range(cfg.first_dense_layers, cfg.n_layers)),
             "MoE layers other than all layers after first_dense_layers")
    return p


def infer_arch(cfg: ModelConfig) -> str:
    """The architecture to export ``cfg`` as: its ``hf_arch`` if it still fits, else the first that does."""
    if cfg.hf_arch and not export_problems(cfg, cfg.hf_arch):
        return cfg.hf_arch
    order = (DENSE_ARCHS if cfg.moe is None else ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3",
                                                  "deepseek_v2", "gpt_oss"))
    for arch in order:
        if not export_problems(cfg, arch):
            return arch
    start = cfg.hf_arch or order[0]
    raise UnsupportedCheckpointError(f"no Hugging Face architecture can hold this model exactly; as {start}: "
                                     + "; ".join(export_problems(cfg, start)))


def _rope_out(cfg: ModelConfig) -> dict[str, Any]:
    rp: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rp.update(cfg.rope_scaling)
    return {"rope_parameters": rp}


def config_to_hf(cfg: ModelConfig, arch: str, dtype: str = "float32") -> dict[str, Any]:
    """The config.json dict of ``cfg`` as architecture ``arch`` (raises when it cannot hold ``cfg``)."""
    problems = export_problems(cfg, arch)
    if problems:
        raise UnsupportedCheckpointError(f"cannot export as {arch}: " + "; ".join(problems))
    m = cfg.moe
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "hidden_act": "silu",
        "attention_dropout": 0.0, "use_cache": True, "dtype": dtype, **_rope_out(cfg),
    }
    if arch not in ("deepseek_v2", "deepseek_v3"):
        out["head_dim"] = cfg.head_dim
    window = next((cfg.layer_window(i) for i in range(cfg.n_layers) if cfg.layer_window(i) is not None), None)
    types = ["sliding_attention" if cfg.layer_window(i) is not None else "full_attention" for i in range(cfg.n_layers)]
    aux = m.aux_loss_coef if m is not None else 0.0
    if arch in ("mixtral", "mistral"):
        out["sliding_window"] = window
    if arch == "mixtral":
        out.update(num_local_experts=m.n_experts, num_experts_per_tok=m.top_k, intermediate_size=m.expert_ffn_dim,
                   router_aux_loss_coef=aux, router_jitter_noise=m.input_jitter_eps)
    if arch in ("qwen2", "qwen2_moe"):
        out.update(use_sliding_window=window is not None, sliding_window=window, layer_types=types,
                   max_window_layers=cfg.n_layers)
    if arch == "qwen2_moe":
        out["qkv_bias"] = cfg.qkv_bias
    if arch == "qwen3_moe":
        out.update(use_sliding_window=window is not None, sliding_window=window, attention_bias=cfg.qkv_bias)
    if arch in ("qwen2_moe", "qwen3_moe"):
        step = cfg.moe_every
        if cfg.first_dense_layers == step - 1 and not cfg.dense_layers:
            mlp_only: list[int] = []
        else:  # any other layout: step 1 and every dense layer listed
            step, mlp_only = 1, [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
        out.update(num_experts=m.n_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_ffn_dim,
                   norm_topk_prob=bool(m.softmax_after_topk or m.norm_topk_prob), decoder_sparse_step=step,
                   mlp_only_layers=mlp_only, router_aux_loss_coef=aux)
        if arch == "qwen2_moe":
            out["shared_expert_intermediate_size"] = m.shared_ffn_dim
    if arch == "olmoe":
        out.update(num_experts=m.n_experts, num_experts_per_tok=m.top_k, intermediate_size=m.expert_ffn_dim,
                   norm_topk_prob=bool(m.softmax_after_topk or m.norm_topk_prob), router_aux_loss_coef=aux,
                   attention_bias=cfg.qkv_bias, clip_qkv=cfg.clip_qkv)
    if arch == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.ffn_bias)
    if arch in ("deepseek_v2", "deepseek_v3"):
        out.update(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=False,
                   first_k_dense_replace=cfg.first_dense_layers, n_routed_experts=m.n_experts,
                   num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_ffn_dim,
                   n_shared_experts=m.n_shared_experts, routed_scaling_factor=m.routed_scaling_factor,
                   num_key_value_heads=cfg.n_heads)
        if m.seq_aux_loss_coef > 0:
            out.update(aux_loss_alpha=m.seq_aux_loss_coef, seq_aux=True)
    if arch == "deepseek_v2":
        grouped = m.n_groups > 1
        out.update(topk_method="group_limited_greedy" if grouped else "greedy", n_group=m.n_groups if grouped else None,
                   topk_group=m.topk_groups if grouped else None, norm_topk_prob=False, mlp_bias=False)
    if arch == "deepseek_v3":
        out.update(n_group=m.n_groups, topk_group=m.topk_groups, norm_topk_prob=m.norm_topk_prob,
                   rope_interleave=cfg.rope_interleaved, num_nextn_predict_layers=0)
    if arch == "gpt_oss":
        out.update(num_local_experts=m.n_experts, num_experts_per_tok=m.top_k, intermediate_size=m.expert_ffn_dim,
                   swiglu_limit=m.swiglu_limit, swiglu_alpha=m.swiglu_alpha, router_aux_loss_coef=aux,
                   attention_bias=cfg.qkv_bias, layer_types=types, sliding_window=window or 128)
    return out
