"""Configuration dataclasses for the MoE layer and the transformer.

Every derived value is computed in ``__post_init__``, which also validates: a bad value raises a
``ValueError`` that names the field. ``ModelConfig.to_dict``/``from_dict`` round-trip through JSON
(the ``config.json`` of a moekit checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")
# "swiglu_clamped": gpt-oss's SwiGLU variant (clamped gate/up, (up + 1) * gate * sigmoid(alpha * gate)), see experts.py
ACTIVATIONS = ("swiglu", "gelu", "swiglu_clamped")
DROP_POLICIES = ("position", "probs")
OVERFLOW_POLICIES = ("drop", "reroute")
BACKENDS = ("auto", "loop", "grouped", "padded", "compiled")  # see moekit/layer/experts.py
ATTENTIONS = ("mha", "mla")
QK_NORM_SCOPES = ("head", "full")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {msg}")


def _choice(value: str, field_name: str, options: tuple[str, ...]) -> None:
    _check(value in options, field_name, f"unknown value {value!r}; expected one of {', '.join(options)}")


@dataclass
class MoEConfig:
    """One MoE layer: router, capacity, experts, balancing losses.

    Routing (the Megatron-Core behaviour matrix, see docs in ``router.py``):
      score_func          "softmax" (Switch, Mixtral, Qwen) or "sigmoid" (DeepSeek-V3)
      softmax_after_topk  top-k on the logits, then softmax over the chosen k (Mixtral's formulation);
                          softmax scoring only; otherwise top-k is taken on the probabilities
      norm_topk_prob      renormalise the k chosen weights to sum to 1
      routed_scaling_factor  multiplies the routed weights (DeepSeek-V3: 2.5)
      n_groups/topk_groups   group-limited top-k (DeepSeek-V2/V3): experts are split into n_groups groups,
                          only the best topk_groups groups are eligible
      expert_bias         selection-only per-expert bias for aux-loss-free balancing (DeepSeek-V3)
      input_jitter_eps    training only: x *= U(1-eps, 1+eps) before the router (Switch)
      logit_noise_std     training only: logits += N(0, std^2) (noisy top-k, Shazeer et al. 2017)
    Capacity (None = dropless): per-expert capacity ceil(capacity_factor * T * top_k / n_experts).
    """

    n_experts: int = 8
    top_k: int = 2
    expert_ffn_dim: int | None = None  # None: the model's ffn_dim (required for a standalone MoE layer)
    activation: str = "swiglu"
    ffn_bias: bool = False  # biases on the routed experts' input and output projections (gpt-oss)
    swiglu_limit: float = 7.0  # activation="swiglu_clamped" only: clamp bound (gpt-oss config swiglu_limit)
    swiglu_alpha: float = 1.702  # activation="swiglu_clamped" only: gate sharpness (gpt-oss config swiglu_alpha)
    # router
    score_func: str = "softmax"
    softmax_after_topk: bool = False
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"  # how a group is scored: sum of its top-2 (DeepSeek-V3) or max (V2)
    router_bias: bool = False  # a learned bias on the router logits (gpt-oss)
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    input_jitter_eps: float = 0.0
    logit_noise_std: float = 0.0
    shared_router: bool = False  # one router for all MoE layers of a model ("Omni-router")
    # losses (coefficients; 0 disables)
    aux_loss_coef: float = 0.01
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    # capacity
    capacity_factor: float | None = None
    drop_policy: str = "position"
    overflow_policy: str = "drop"
    # shared experts
    n_shared_experts: int = 0
    shared_expert_ffn_dim: int | None = None  # None: n_shared_experts * expert_ffn_dim
    shared_expert_gate: bool = False  # per-token sigmoid gate on the shared expert (Qwen2-MoE)
    # execution
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check(isinstance(self.n_experts, int) and self.n_experts >= 1, "n_experts",
               f"must be >= 1, got {self.n_experts}")
        _check(isinstance(self.top_k, int) and self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        _check(self.top_k <= self.n_experts, "top_k", f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        _check(self.expert_ffn_dim is None or self.expert_ffn_dim >= 1, "expert_ffn_dim",
               f"must be >= 1, got {self.expert_ffn_dim}")
        _choice(self.activation, "activation", ACTIVATIONS)
        _check(self.swiglu_limit > 0, "swiglu_limit", f"must be > 0, got {self.swiglu_limit}")
        _choice(self.score_func, "score_func", SCORE_FUNCS)
        _choice(self.group_score, "group_score", GROUP_SCORES)
        _check(not (self.softmax_after_topk and self.score_func != "softmax"), "softmax_after_topk",
               "only applies to score_func='softmax'")
        _check(self.routed_scaling_factor > 0, "routed_scaling_factor",
               f"must be > 0, got {self.routed_scaling_factor}")
        _check(self.n_groups >= 1 and self.n_experts % self.n_groups == 0, "n_groups",
               f"n_experts={self.n_experts} must be divisible by n_groups={self.n_groups}")
        _check(1 <= self.topk_groups <= self.n_groups, "topk_groups",
               f"must be in [1, n_groups={self.n_groups}], got {self.topk_groups}")
        if self.n_groups > 1:
            _check(self.topk_groups * (self.n_experts // self.n_groups) >= self.top_k, "topk_groups",
                   "the chosen groups hold fewer experts than top_k")
            if self.group_score == "top2_sum":
                _check(self.n_experts // self.n_groups >= 2, "group_score", "top2_sum needs >= 2 experts per group")
        _check(self.bias_update_rate >= 0, "bias_update_rate", f"must be >= 0, got {self.bias_update_rate}")
        _check(0 <= self.input_jitter_eps < 1, "input_jitter_eps", f"must be in [0, 1), got {self.input_jitter_eps}")
        _check(self.logit_noise_std >= 0, "logit_noise_std", f"must be >= 0, got {self.logit_noise_std}")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
               f"must be > 0 (or None for dropless), got {self.capacity_factor}")
        _choice(self.drop_policy, "drop_policy", DROP_POLICIES)
        _choice(self.overflow_policy, "overflow_policy", OVERFLOW_POLICIES)
        _check(not (self.overflow_policy == "reroute" and self.capacity_factor is None), "overflow_policy",
               "'reroute' needs a capacity_factor (dropless mode never overflows)")
        _check(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        _check(self.shared_expert_ffn_dim is None or self.shared_expert_ffn_dim >= 1, "shared_expert_ffn_dim",
               f"must be >= 1, got {self.shared_expert_ffn_dim}")
        _check(not (self.shared_expert_gate and self.n_shared_experts == 0), "shared_expert_gate",
               "needs n_shared_experts >= 1")
        _choice(self.backend, "backend", BACKENDS)

    @property
    def shared_ffn_dim(self) -> int:
        """Width of the always-on shared expert (0 when there is none)."""
        if self.n_shared_experts == 0:
            return 0
        if self.shared_expert_ffn_dim is not None:
            return self.shared_expert_ffn_dim
        assert self.expert_ffn_dim is not None
        return self.n_shared_experts * self.expert_ffn_dim

    def capacity(self, n_tokens: int) -> int:
        """Per-expert capacity ceil(cf * T * k / E) (GShard; Switch Transformer eq. 3).

        Exact arithmetic on the decimal cf as written: float rounding would make 1.1 * 50 * 2 / 2 give 56, not 55.
        """
        assert self.capacity_factor is not None
        cf = Fraction(str(float(self.capacity_factor)))
        return max(1, math.ceil(cf * n_tokens * self.top_k / self.n_experts))


@dataclass
class ModelConfig:
    """A decoder-only transformer; ``moe=None`` makes it dense.

    Layer ``i`` is MoE when ``moe`` is set, ``i >= first_dense_layers``,
    ``(i - first_dense_layers) % moe_every == 0`` and ``i not in dense_layers``.

    The fields after ``v_head_dim`` up to ``hf_arch`` describe details of published architectures
    (Qwen2/3, OLMoE, DeepSeek, gpt-oss, Llama 3); they are all off by default. ``moekit.formats.hf`` maps
    Hugging Face ``config.json`` keys onto them (see /work/shared/reference/hf-moe-formats.md).
    """

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (no grouping)
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 1024  # dense FFN width (and the default expert width)
    activation: str = "swiglu"  # dense FFN activation
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3, OLMoE-style)
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "mha"  # "mha" (grouped-query) or "mla" (DeepSeek multi-head latent attention)
    # multi-head latent attention (DeepSeek-V2/V3); used when attention == "mla"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # attention details of published architectures
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2 qkv_bias, gpt-oss attention_bias)
    o_bias: bool = False  # bias on the output projection (gpt-oss, Llama/Qwen3/OLMoE attention_bias)
    qk_norm_scope: str = "head"  # qk_norm over each head (Qwen3: [head_dim]) or the full projection (OLMoE: [H*Dh])
    clip_qkv: float | None = None  # clamp q, k and v to [-c, c] after the projections and qk-norm (OLMoE)
    attn_sinks: bool = False  # a learned per-head sink logit joins the softmax, then is dropped (gpt-oss)
    sliding_window: int | None = None  # sliding layers see keys with kv > q - sliding_window (Mistral, gpt-oss)
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" | "sliding_attention"; None: every
    #                                             layer slides when sliding_window is set
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3" | "yarn", ...}: HF
    #                                              rope_parameters without rope_theta (YaRN, Peng et al. 2023)
    rope_interleaved: bool = False  # RoPE rotates dim pairs (2i, 2i+1) (DeepSeek) instead of (i, i + d/2)
    ffn_bias: bool = False  # biases on the dense FFN projections (Llama mlp_bias)
    swiglu_limit: float = 7.0  # activation="swiglu_clamped" only (dense FFN), see MoEConfig
    swiglu_alpha: float = 1.702
    dense_layers: tuple[int, ...] = ()  # layers kept dense although the MoE rule selects them (Qwen mlp_only_layers)
    hf_arch: str = ""  # Hugging Face model_type this config was imported from: moekit.formats.hf.export_hf's default
    moe: MoEConfig | None = None
    moe_every: int = 1
    first_dense_layers: int = 0
    name: str = ""
    # derived
    moe_layers: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**_known_keys(MoEConfig, self.moe, "moe"))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                   f"must be a positive integer, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check(1 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None:
            _check(self.dim % self.n_heads == 0, "dim", f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        _check(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim", f"must be even (RoPE), got {self.head_dim}")
        _choice(self.activation, "activation", ACTIVATIONS)
        _choice(self.attention, "attention", ATTENTIONS)
        _check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        _check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        _check(self.moe_every >= 1, "moe_every", f"must be >= 1, got {self.moe_every}")
        _check(0 <= self.first_dense_layers <= self.n_layers, "first_dense_layers",
               f"must be in [0, n_layers={self.n_layers}], got {self.first_dense_layers}")
        if self.attention == "mla":
            _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE)")
            for name in ("qkv_bias", "o_bias", "qk_norm", "attn_sinks"):
                _check(not getattr(self, name), name, "is not supported with attention='mla'")
            _check(self.clip_qkv is None, "clip_qkv", "is not supported with attention='mla'")
            _check(self.sliding_window is None, "sliding_window", "is not supported with attention='mla'")
        _choice(self.qk_norm_scope, "qk_norm_scope", QK_NORM_SCOPES)
        _check(self.clip_qkv is None or self.clip_qkv > 0, "clip_qkv", f"must be > 0, got {self.clip_qkv}")
        _check(self.swiglu_limit > 0, "swiglu_limit", f"must be > 0, got {self.swiglu_limit}")
        _check(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window >= 1),
               "sliding_window", f"must be a positive integer or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            _check(len(self.layer_types) == self.n_layers, "layer_types",
                   f"has {len(self.layer_types)} entries for n_layers={self.n_layers}")
            for t in self.layer_types:
                _choice(t, "layer_types", LAYER_TYPES)
            _check(self.sliding_window is not None or "sliding_attention" not in self.layer_types, "layer_types",
                   "'sliding_attention' layers need a sliding_window")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        self.dense_layers = tuple(sorted(set(self.dense_layers)))
        _check(all(isinstance(i, int) and 0 <= i < self.n_layers for i in self.dense_layers), "dense_layers",
               f"entries must be layer indices in [0, {self.n_layers}), got {list(self.dense_layers)}")
        if self.moe is not None:
            if self.moe.expert_ffn_dim is None:
                self.moe = dataclasses.replace(self.moe, expert_ffn_dim=self.ffn_dim)
            self.moe_layers = tuple(i for i in range(self.first_dense_layers, self.n_layers)
                                    if (i - self.first_dense_layers) % self.moe_every == 0
                                    and i not in self.dense_layers)
        else:
            self.moe_layers = ()

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i`` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: head_dim, or MLA's decoupled qk_rope_head_dim."""
        assert self.head_dim is not None
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["moe"] = dataclasses.asdict(self.moe) if self.moe is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**_known_keys(cls, d, "config"))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        if p is not None:
            if not p.is_file():
                raise FileNotFoundError(f"config file not found: {p}")
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from e
        else:
            data = json.loads(str(path_or_text))
        return cls.from_dict(data)


_ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position_embeddings"),
                  "yarn": ("original_max_position_embeddings",)}


def _check_rope_scaling(rs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate a rope_scaling dict; ``None`` and rope_type "default" mean no scaling."""
    if rs is None:
        return None
    _check(isinstance(rs, dict), "rope_scaling", f"must be a dict or None, got {type(rs).__name__}")
    rs = dict(rs)
    rope_type = rs.get("rope_type", rs.pop("type", None))
    _check(rope_type is not None, "rope_scaling", "needs a 'rope_type' key")
    _choice(rope_type, "rope_scaling.rope_type", ROPE_TYPES)
    if rope_type == "default":
        return None
    rs["rope_type"] = rope_type
    for key in _ROPE_REQUIRED[rope_type]:
        _check(rs.get(key) is not None, "rope_scaling", f"rope_type {rope_type!r} needs the key {key!r}")
    if rs.get("factor") is not None:
        _check(rs["factor"] > 0, "rope_scaling", f"factor must be > 0, got {rs['factor']}")
    return rs


def _known_keys(cls: type, d: dict[str, Any], where: str) -> dict[str, Any]:
    """Reject unknown keys with an error naming them (a typo must not silently become a default)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return dict(d)
