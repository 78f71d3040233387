"""Analytic cost model of a moekit transformer: parameter counts, FLOPs, weight and KV-cache memory.

Nothing here builds a model: every count is computed from the ``ModelConfig`` alone, and it matches
``sum(p.numel() for p in moekit.model.transformer.Transformer(cfg).parameters())`` exactly (``tests/test_costs.py``).
That makes it usable for configurations far too large to instantiate (DeepSeek-V3, see ``presets.py``).

Conventions (they differ between vendors, so they are spelled out):

* ``total_params``: every learned parameter (buffers such as the selection-only ``expert_bias`` are not
  parameters), biases and gpt-oss's attention sinks included. A tied ``lm_head`` is counted once, as the
  embedding table.
* ``active_params``: the parameters one token touches in a forward pass: the input embedding table,
  attention, norms, routers, shared experts, the ``top_k`` routed experts of every MoE layer (with their
  biases), all of a dense layer's FFN, and the ``lm_head`` (unless tied). The whole embedding table is
  counted, as in Mistral's "12.9B active" for Mixtral-8x7B, Qwen's and OLMoE's figures.
  ``active_params_excl_embedding`` drops the input table (a lookup, not a matmul); it is DeepSeek's
  convention ("36.6B activated, including 0.9B for the output head", DeepSeek-V3 README_WEIGHTS.md).
* FLOPs count a multiply-add as 2 FLOPs and only matmuls: norms, activations, softmax, RoPE, bias
  additions (one add per output, against D multiply-adds per output for the weights) and the sink logit
  (one extra softmax entry per head) are elementwise and ignored, as in Kaplan et al. 2020 (Table 1) and
  Hoffmann et al. 2022 (Chinchilla, Appendix F, where they are < 1% at these widths).
* Sliding-window layers (``sliding_window``/``layer_types``; Mistral, gpt-oss) add no parameters, but a
  query there sees at most ``window`` keys: their attention FLOPs use the context min(window, seq_len / 2)
  instead of the causal average seq_len / 2, and a cache that keeps only the window (a rolling buffer, HF's
  sliding-window cache) holds min(window, seq_len) positions of them (``kv_cache_*_at_seq_len``).
  ``min(window, seq_len / 2)`` is the simple bound the other layers' convention allows; the exact mean
  context of a windowed causal sequence is a little lower when window is close to seq_len / 2. MLA layers
  ignore the window (``MLAttention`` attends causally over every key), and so does this model of them.
* KV-cache ``*_per_token`` figures are per position of context, summed over all layers: what
  ``moekit.model.transformer.KVCache`` allocates per position (it keeps every position, sliding layers included);
  ``*_at_seq_len`` is the cache of one sequence of ``seq_len`` tokens with windows applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moekit.config import ModelConfig

# Bytes per stored value. int8 ignores the per-channel/per-block scales of a real quantised checkpoint.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}

# Weight matrices per FFN of width F: SwiGLU (and gpt-oss's clamped SwiGLU) has gate, up (fused into w_in [2F, D])
# and down; GELU has up and down. Every activation of moekit.config.ACTIVATIONS must be here (tests/test_costs.py).
_FFN_MATRICES = {"swiglu": 3, "swiglu_clamped": 3, "gelu": 2}
# Rows of w_in per unit of F (the width of b_in): gate and up for the gated activations, F for GELU.
_FFN_IN_ROWS = {"swiglu": 2, "swiglu_clamped": 2, "gelu": 1}


@dataclass(frozen=True)
class Costs:
    """Costs of one configuration; counts are exact integers. See the module docstring for conventions."""

    name: str
    seq_len: int  # the sequence length the attention FLOPs are computed for
    # parameters
    total_params: int
    active_params: int  # per token, input embedding table included
    active_params_excl_embedding: int  # per token, input embedding table excluded (DeepSeek's convention)
    embedding_params: int  # the input table tok_emb
    lm_head_params: int  # 0 when tied to the embedding
    attention_params: int  # projections, their biases, the norms inside attention (qk_norm, MLA's q/kv norms), sinks
    norm_params: int  # the per-layer attn_norm/ffn_norm and the final norm
    ffn_params_total: int  # dense FFNs, all routed experts, shared experts and their gates, biases included
    ffn_params_active: int  # dense FFNs, top_k routed experts, shared experts and their gates, biases included
    router_params: int  # router weights (+ bias); a shared router is counted once
    bias_params: int  # every bias and sink (attention, dense FFN, routed experts, routers), already in the above
    n_moe_layers: int
    n_dense_layers: int
    n_sliding_layers: int  # layers whose attention is bounded by sliding_window
    sparsity: float  # top_k / n_experts, 1.0 for a dense model
    # compute
    matmul_params_per_token: int  # weights multiplied per token: active - input table - norms - biases/sinks,
    #                               + tied head, + a shared router once per MoE layer
    attention_flops_per_token: int  # the score and value matmuls at an average causal context of seq_len / 2
    #                                 (min(window, seq_len / 2) in sliding layers)
    flops_per_token_forward: int
    flops_per_token_train: int
    # memory
    weight_bytes: dict[str, int]  # dtype name -> bytes of all parameters
    kv_cache_values_per_token: int  # cached values per position of context, all layers (no window applied)
    kv_cache_bytes_per_token: dict[str, int]  # dtype name -> bytes per position of context
    kv_cache_values_at_seq_len: int  # cached values of one seq_len sequence; sliding layers hold min(window, seq_len)
    kv_cache_bytes_at_seq_len: dict[str, int]  # dtype name -> bytes of one seq_len sequence

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (all values are ints, floats, strings or dicts of ints)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- pieces
# Shape legend: D = dim, V = vocab_size, H = n_heads, K = n_kv_heads, d = head_dim, F = an FFN width,
# E = n_experts, R = q_lora_rank, C = kv_lora_rank, n/r/v = MLA's qk_nope/qk_rope/v head dims.


def _ffn_params(dim: int, width: int, activation: str, bias: bool = False) -> tuple[int, int]:
    """(weights, biases) of one FFN of width F: w_in [2F or F, D] + w_out [D, F]; b_in [2F or F] + b_out [D]."""
    weights = _FFN_MATRICES[activation] * dim * width
    biases = _FFN_IN_ROWS[activation] * width + dim if bias else 0
    return weights, biases


def _attention_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one attention block: matmul weights ("mats"), "norms", "biases" (biases and sinks)."""
    D, H = cfg.dim, cfg.n_heads
    if cfg.attention == "mla":
        # DeepSeek-V2/V3 multi-head latent attention, HF DeepSeek-V3 shapes; no biases (config rejects them).
        n, r, v, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q, q_norm = H * (n + r) * D, 0  # wq [H(n+r), D]
        else:
            R = cfg.q_lora_rank
            q, q_norm = R * D + H * (n + r) * R, R  # wq_a [R, D], q_norm [R], wq_b [H(n+r), R]
        kv = (C + r) * D + H * (n + v) * C  # wkv_a [C+r, D], wkv_b [H(n+v), C]
        o = D * H * v  # wo [D, Hv]
        return {"mats": q + kv + o, "norms": q_norm + C, "biases": 0}  # + kv_norm [C]
    K, d = cfg.n_kv_heads, cfg.head_dim
    assert K is not None and d is not None  # filled in by ModelConfig.__post_init__
    mats = H * d * D + 2 * K * d * D + D * H * d  # wq [Hd, D], wk/wv [Kd, D], wo [D, Hd]
    norms = 0
    if cfg.qk_norm:  # q_norm, k_norm: [d] shared over heads (Qwen3) or over the whole projection (OLMoE)
        norms = H * d + K * d if cfg.qk_norm_scope == "full" else 2 * d
    biases = (H * d + 2 * K * d if cfg.qkv_bias else 0) + (D if cfg.o_bias else 0)  # wq/wk/wv.bias, wo.bias
    biases += H if cfg.attn_sinks else 0  # sinks [H]
    return {"mats": mats, "norms": norms, "biases": biases}


def _layer_window(cfg: ModelConfig, i: int) -> int | None:
    """The window layer ``i`` attends over (None: full causal); MLA layers ignore it, as ``MLAttention`` does."""
    return None if cfg.attention == "mla" else cfg.layer_window(i)


def _attention_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Score (q.k) and value (p.v) matmuls per token, all layers.

    Per token at context ctx: 2 * ctx * (H * d_qk) for the scores plus 2 * ctx * (H * d_v) for the
    weighted values (Chinchilla, Appendix F, "logits" and "attention reduction"). A causal sequence of
    length L attends to seq_len / 2 keys on average, so ctx = L / 2; for MHA (d_qk = d_v = d) this is
    2 * 2 * n_layers * (L / 2) * H * d. A sliding layer of window W has ctx = min(W, L / 2). MLA is
    counted in its training (non-absorbed) form with d_qk = n + r and d_v = v.
    """
    H = cfg.n_heads
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        assert cfg.head_dim is not None
        d_qk = d_v = cfg.head_dim
    # 2 * ctx * H * (d_qk + d_v) per layer, with 2 * ctx = seq_len or min(2W, seq_len): exact integers
    spans = (seq_len if (w := _layer_window(cfg, i)) is None else min(2 * w, seq_len) for i in range(cfg.n_layers))
    return sum(spans) * H * (d_qk + d_v)


def _kv_values_per_position(cfg: ModelConfig) -> int:
    """Cached values per position of context in one layer (moekit.model.transformer.KVCache's k and v)."""
    if cfg.attention == "mla":
        # MLA caches the compressed latent c_kv [C] and the shared rope key k_r [r] (DeepSeek-V2, sec. 2.1).
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cfg.n_kv_heads is not None and cfg.head_dim is not None
    return 2 * cfg.n_kv_heads * cfg.head_dim  # k and v [K, d]


def _kv_values_at(cfg: ModelConfig, seq_len: int) -> int:
    """Cached values of one sequence of seq_len tokens, all layers; a sliding layer keeps min(window, seq_len)."""
    positions = (seq_len if (w := _layer_window(cfg, i)) is None else min(w, seq_len) for i in range(cfg.n_layers))
    return sum(positions) * _kv_values_per_position(cfg)


def _fixed_params(cfg: ModelConfig) -> dict[str, int]:
    """The parameters that do not depend on the FFN: embedding, lm_head, attention, norms."""
    D, V, L = cfg.dim, cfg.vocab_size, cfg.n_layers
    attn = _attention_params(cfg)
    return {
        "embedding": V * D,  # tok_emb [V, D]
        "lm_head": 0 if cfg.tie_embeddings else D * V,  # lm_head [V, D]
        "attention": L * (attn["mats"] + attn["norms"] + attn["biases"]),
        "attention_mats": L * attn["mats"],
        "attention_biases": L * attn["biases"],
        "norms": L * 2 * D + D,  # attn_norm, ffn_norm [D] per layer, final norm [D]
    }


# ---------------------------------------------------------------------------------------------- public
def costs(cfg: ModelConfig, seq_len: int | None = None) -> Costs:
    """Parameter, FLOP and memory costs of ``cfg``; ``seq_len`` (default ``cfg.max_seq_len``) sets the context.

    FLOPs per token: forward = 2 * matmul_params_per_token + attention_flops_per_token (the "2N" of
    Kaplan et al. 2020, eq. 2.2, with N the weights a token is multiplied by, plus their attention term);
    train = 3 * forward, since the backward pass costs twice the forward (Kaplan et al. 2020, sec. 2.1;
    Hoffmann et al. 2022, Appendix F: the "6N" rule).
    """
    if seq_len is None:
        seq_len = cfg.max_seq_len
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")

    D, L = cfg.dim, cfg.n_layers
    fixed = _fixed_params(cfg)
    moe = cfg.moe
    n_moe = len(cfg.moe_layers)  # moe_layers already leaves out first_dense_layers, moe_every and dense_layers
    n_dense = L - n_moe

    dense_w, dense_b = _ffn_params(D, cfg.ffn_dim, cfg.activation, cfg.ffn_bias)  # ffn.w_in/w_out (+ b_in/b_out)
    ffn_total = ffn_active = n_dense * (dense_w + dense_b)
    ffn_matmul = n_dense * dense_w  # FFN weights a token is multiplied by
    biases = fixed["attention_biases"] + n_dense * dense_b
    router_params = 0
    router_matmul = 0  # router weights applied per token: once per MoE layer, even when the router is shared
    if moe is not None and n_moe > 0:
        assert moe.expert_ffn_dim is not None  # filled in by ModelConfig.__post_init__
        # experts.w_in [E, ., D] + w_out [E, D, F_e] (+ b_in [E, .] + b_out [E, D], gpt-oss)
        expert_w, expert_b = _ffn_params(D, moe.expert_ffn_dim, moe.activation, moe.ffn_bias)
        shared, _ = _ffn_params(D, moe.shared_ffn_dim, moe.activation)  # 0 without one; never biased (moe.py)
        gate = D if moe.shared_expert_gate else 0  # shared_gate [1, D]
        ffn_total += n_moe * (moe.n_experts * (expert_w + expert_b) + shared + gate)
        ffn_active += n_moe * (moe.top_k * (expert_w + expert_b) + shared + gate)
        ffn_matmul += n_moe * (moe.top_k * expert_w + shared + gate)
        router_bias = moe.n_experts if moe.router_bias else 0
        one_router = moe.n_experts * D + router_bias  # router [E, D] (+ bias [E])
        n_routers = 1 if moe.shared_router else n_moe
        router_params = n_routers * one_router
        biases += n_moe * moe.n_experts * expert_b + n_routers * router_bias
        router_matmul = n_moe * moe.n_experts * D
        sparsity = moe.top_k / moe.n_experts
    else:
        sparsity = 1.0

    common = fixed["embedding"] + fixed["lm_head"] + fixed["attention"] + fixed["norms"] + router_params
    total = common + ffn_total
    active = common + ffn_active

    # Matmul weights per token: attention projections, the FFN weights used, each MoE layer's router and the
    # output projection (the V x D head runs even when tied to the embedding table). Biases and sinks are
    # additions, not multiply-adds (module docstring).
    matmul = fixed["attention_mats"] + ffn_matmul + router_matmul + cfg.vocab_size * D
    attn_flops = _attention_flops(cfg, seq_len)
    forward = 2 * matmul + attn_flops

    kv_values = L * _kv_values_per_position(cfg)
    kv_at = _kv_values_at(cfg, seq_len)
    return Costs(
        name=cfg.name,
        seq_len=seq_len,
        total_params=total,
        active_params=active,
        active_params_excl_embedding=active - fixed["embedding"],
        embedding_params=fixed["embedding"],
        lm_head_params=fixed["lm_head"],
        attention_params=fixed["attention"],
        norm_params=fixed["norms"],
        ffn_params_total=ffn_total,
        ffn_params_active=ffn_active,
        router_params=router_params,
        bias_params=biases,
        n_moe_layers=n_moe,
        n_dense_layers=n_dense,
        n_sliding_layers=sum(_layer_window(cfg, i) is not None for i in range(L)),
        sparsity=sparsity,
        matmul_params_per_token=matmul,
        attention_flops_per_token=attn_flops,
        flops_per_token_forward=forward,
        flops_per_token_train=3 * forward,
        weight_bytes={k: total * b for k, b in DTYPE_BYTES.items()},
        kv_cache_values_per_token=kv_values,
        kv_cache_bytes_per_token={k: kv_values * b for k, b in DTYPE_BYTES.items()},
        kv_cache_values_at_seq_len=kv_at,
        kv_cache_bytes_at_seq_len={k: kv_at * b for k, b in DTYPE_BYTES.items()},
    )


def dense_twin(cfg: ModelConfig, match: str = "active") -> ModelConfig:
    """A dense model with the MoE model's active (``match="active"``) or total parameter count.

    Everything but the FFN is kept (``moe=None``); every layer gets one FFN of width F with the dense
    ``cfg.activation`` (and ``cfg.ffn_bias``). With P_fixed the embedding, head, attention and norm
    parameters, c the number of FFN matrices (3 for the SwiGLUs, 2 for GELU) and, with ffn_bias, b the rows
    of w_in per unit of F (2 or 1), the twin has P_fixed + L * ((c * D + b) * F + D) parameters (without
    biases: P_fixed + L * c * D * F), so F = round((target - P_fixed - L * D) / (L * (c * D + b))); the
    count then lies within half a unit of F, L * (c * D + b) / 2, of the target.
    """
    if match not in ("active", "total"):
        raise ValueError(f"match: must be 'active' or 'total', got {match!r}")
    if cfg.moe is None:
        raise ValueError(f"moe: {cfg.name or 'config'} is already dense (moe=None); it has no dense twin")
    c = costs(cfg)
    target = c.active_params if match == "active" else c.total_params
    fixed = _fixed_params(cfg)
    p_fixed = fixed["embedding"] + fixed["lm_head"] + fixed["attention"] + fixed["norms"]
    L, D = cfg.n_layers, cfg.dim
    per_unit = L * (_FFN_MATRICES[cfg.activation] * D + (_FFN_IN_ROWS[cfg.activation] if cfg.ffn_bias else 0))
    p_fixed += L * D if cfg.ffn_bias else 0  # b_out [D] per layer, whatever the width
    num = target - p_fixed
    width = (2 * num + per_unit) // (2 * per_unit)  # round(num / per_unit), half up, in exact integers
    if width < 1:
        raise ValueError(f"ffn_dim: the {match} parameter count {target} leaves no room for a dense FFN "
                         f"(embedding, attention and norms already take {p_fixed})")
    suffix = f"dense-{match}"
    name = f"{cfg.name}-{suffix}" if cfg.name else suffix
    return dataclasses.replace(cfg, moe=None, ffn_dim=int(width), name=name)


# ---------------------------------------------------------------------------------------------- display
def format_count(n: float) -> str:
    """A count in human units: 46.7B, 12.9B, 131.1M, 4.1K."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:g}"


def format_bytes(n: float) -> str:
    """A size in binary units: 87.0 GiB, 128.0 KiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:g} B"


def format_flops(n: float) -> str:
    """FLOPs in decimal units: 25.9 GFLOPs."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("KFLOPs", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} FLOPs"


def format_costs(c: Costs) -> str:
    """A readable table of ``c``."""
    rows = [
        ("embedding", c.embedding_params, c.embedding_params),
        ("attention", c.attention_params, c.attention_params),
        ("ffn", c.ffn_params_total, c.ffn_params_active),
        ("router", c.router_params, c.router_params),
        ("norms", c.norm_params, c.norm_params),
        ("lm_head", c.lm_head_params, c.lm_head_params),
    ]
    lines = [f"costs of {c.name or 'model'} (seq_len {c.seq_len})",
             f"  {'parameters':<28}{'total':>10}{'active':>10}"]
    lines += [f"    {label:<26}{format_count(t):>10}{format_count(a):>10}" for label, t, a in rows]
    lines.append(f"    {'total':<26}{format_count(c.total_params):>10}{format_count(c.active_params):>10}")
    lines.append(f"    {'active excl. embedding':<26}{'':>10}{format_count(c.active_params_excl_embedding):>10}")
    sliding = f" ({c.n_sliding_layers} sliding-window)" if c.n_sliding_layers else ""
    lines.append(f"  {'layers':<28}{c.n_moe_layers} MoE + {c.n_dense_layers} dense{sliding}, "
                 f"sparsity {c.sparsity:.4g}")
    lines.append(f"  {'FLOPs/token forward':<28}{format_flops(c.flops_per_token_forward)}"
                 f"  (attention {format_flops(c.attention_flops_per_token)})")
    lines.append(f"  {'FLOPs/token train':<28}{format_flops(c.flops_per_token_train)}")
    lines.append(f"  {'weights':<28}" + ", ".join(f"{k} {format_bytes(v)}" for k, v in c.weight_bytes.items()))
    lines.append(f"  {'KV cache/token':<28}"
                 + ", ".join(f"{k} {format_bytes(v)}" for k, v in c.kv_cache_bytes_per_token.items()))
    lines.append(f"  {f'KV cache/seq of {c.seq_len}':<28}"
                 + ", ".join(f"{k} {format_bytes(v)}" for k, v in c.kv_cache_bytes_at_seq_len.items()))
    return "\n".join(lines)
