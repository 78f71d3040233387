"""The decoder-only transformer, dense or MoE per layer.

Legend: B batch, S sequence, D dim, H query heads, G kv heads, Dh head dim, V vocab, L layers.

    x = embed(ids)
    for each layer:  x = x + attn(norm(x))          # RMSNorm, RoPE, grouped-query SDPA, KV cache
                     x = x + ffn(norm(x))           # dense MLP or MoE (MoE every N, first K dense)
    logits = head(norm(x))

Attention is grouped-query (``Attention``) or DeepSeek's multi-head latent attention (``MLAttention``,
``attention="mla"``); the options of published architectures (biases, qk-norm scopes, sliding windows,
sinks, YaRN/Llama-3 RoPE scaling, interleaved RoPE) are ``ModelConfig`` fields, all off by default.
Shape legend for MLA: C kv_lora_rank, n/r qk_nope/qk_rope head dims, T keys (cached + new).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.layer.experts import MLP
from moekit.layer.moe import MoE, MoEStats
from moekit.layer.router import Router


@dataclass
class ModelOutput:
    logits: Tensor  # [B, S, V]
    loss: Tensor | None = None  # lm_loss + aux_loss + z_loss: what to backpropagate
    lm_loss: Tensor | None = None  # next-token cross-entropy (mean over target tokens)
    aux_loss: Tensor | None = None  # weighted balance losses summed over MoE layers
    z_loss: Tensor | None = None  # weighted router z-losses summed over MoE layers
    stats: list[MoEStats | None] = field(default_factory=list)  # per layer; None for dense layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019): normalised in fp32, returned in the input dtype, times the weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_inv_freq(rot_dim: int, theta: float, scaling: dict | None = None,
                  max_position: int | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies [rot_dim / 2] (float64) and the attention factor that multiplies cos and sin.

    ``scaling`` is a validated ``ModelConfig.rope_scaling`` (HF ``rope_parameters`` without rope_theta;
    reference doc section 2, "RoPE frequencies", mirroring HF ``modeling_rope_utils``):
      linear  inv /= factor
      llama3  long wavelengths divided by factor, smooth ramp between low_freq_factor and high_freq_factor
      yarn    NTK-by-parts interpolation (Peng et al. 2023, "YaRN", eq. 21-23) plus the attention factor
              0.1 ln(factor) + 1 (or mscale/mscale_all_dim ratio, DeepSeek), applied to cos and sin
    """
    inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    if scaling is None:
        return inv, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, out), 1.0
    # yarn
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or (max_position or original) / original
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:  # the dimension that turns n_rot times over `original` positions
        return rot_dim * math.log(original / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):  # gpt-oss sets truncate=False
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate by factor
    inv = (inv / factor) * (1 - extrapolate) + inv * extrapolate
    return inv, float(attention_factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin [max_len, head_dim] for rotate-half RoPE (Su et al. 2021; the Llama/HF layout).

    With ``scaling`` the frequencies follow :func:`rope_inv_freq` and cos/sin carry its attention factor.
    """
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, max_len)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    return (ang.cos() * attention_factor).float(), (ang.sin() * attention_factor).float()


def apply_rope(x_BHSDh: Tensor, cos_SDh: Tensor, sin_SDh: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate pairs (i, i + Dh/2) (rotate-half), or (2i, 2i + 1) when ``interleaved`` (DeepSeek's complex
    form, HF ``DeepseekV2 apply_rotary_emb``); the output keeps the input's layout."""
    if interleaved:
        half = cos_SDh.shape[-1] // 2
        cos, sin = cos_SDh[..., :half], sin_SDh[..., :half]
        x = x_BHSDh.float()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        return out.to(x_BHSDh.dtype)
    x1, x2 = x_BHSDh.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHSDh.float() * cos_SDh + rotated.float() * sin_SDh).to(x_BHSDh.dtype)


# RMSNorm epsilon of MLA's q and kv latent norms: fixed at 1e-6, not rms_norm_eps (reference doc section 2, MLA;
# HF DeepseekV2/V3 q_a_layernorm, kv_a_layernorm)
MLA_NORM_EPS = 1e-6


class KVCache:
    """Preallocated keys/values per layer for incremental decoding.

    Multi-head attention caches k and v ``[B, G, max_len, Dh]``. Multi-head latent attention caches
    only what it needs to rebuild them: ``k`` holds the normalised latent c_kv ``[B, 1, max_len, C]``
    and ``v`` the rotated shared rope key k_pe ``[B, 1, max_len, r]`` (DeepSeek-V2 section 2.1: C + r
    values per token and layer instead of 2 * H * Dh).

    Every row holds ``pos`` tokens, or, for a batch of sequences of different lengths (``KVCache.batch``),
    row b holds ``lengths[b]`` (a device tensor) and ``pos`` is the longest: each forward appends its S
    tokens to every row at the row's own position (RoPE, cache writes and the causal mask per row), so
    sequences of different lengths decode in one step.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int | None = None, device=None, dtype=torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        if cfg.attention == "mla":
            k_shape = (batch, 1, self.max_len, cfg.kv_lora_rank)
            v_shape = (batch, 1, self.max_len, cfg.qk_rope_head_dim)
        else:
            k_shape = v_shape = (batch, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(k_shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0
        self.lengths: Tensor | None = None  # [B] per-row fill (ragged batches), else every row holds pos
        self.start: int | Tensor = 0  # where this forward's tokens go: pos, or lengths (set by ``reserve``)

    @classmethod
    def batch(cls, caches: list[KVCache]) -> KVCache:
        """One cache whose row b is (a copy of) the single-row cache ``caches[b]``, each at its own length."""
        if not caches or any(c.k[0].shape[0] != 1 for c in caches):
            raise ValueError("caches: expected single-sequence caches (batch 1) to stack")
        first = caches[0]
        out = cls.__new__(cls)
        out.max_len = max(c.max_len for c in caches)
        out.k = [torch.zeros((len(caches), *t.shape[1:2], out.max_len, t.shape[3]), dtype=t.dtype, device=t.device)
                 for t in first.k]
        out.v = [torch.zeros((len(caches), *t.shape[1:2], out.max_len, t.shape[3]), dtype=t.dtype, device=t.device)
                 for t in first.v]
        for b, c in enumerate(caches):
            for layer in range(len(out.k)):
                out.k[layer][b, :, :c.pos] = c.k[layer][0, :, :c.pos]
                out.v[layer][b, :, :c.pos] = c.v[layer][0, :, :c.pos]
        out.pos = max(c.pos for c in caches)
        out.lengths = torch.tensor([c.pos for c in caches], device=first.k[0].device)
        out.start = 0
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache, all layers."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def reserve(self, S: int) -> None:
        """Make room for S more tokens per row (a clear error past ``max_len``); sets ``start`` for the layers."""
        if self.pos + S > self.max_len:
            raise ValueError(f"max_seq_len: the KV cache holds {self.max_len} positions per sequence; "
                             f"{self.pos} are filled and {S} more were asked for")
        self.start = self.pos if self.lengths is None else self.lengths

    def advance(self, S: int) -> None:
        self.pos += S
        if self.lengths is not None:
            self.lengths = self.lengths + S

    def update(self, layer: int, k_BGSDh: Tensor, v_BGSDh: Tensor) -> tuple[Tensor, Tensor]:
        """Write this forward's keys/values at ``start`` and return the filled part [B, G, pos + S, Dh]."""
        S = k_BGSDh.shape[2]
        end = self.pos + S
        if self.lengths is None:
            self.k[layer][:, :, self.pos:end] = k_BGSDh
            self.v[layer][:, :, self.pos:end] = v_BGSDh
        else:  # each row at its own position
            pos_BS = self.lengths[:, None] + torch.arange(S, device=self.lengths.device)
            for cache, new in ((self.k[layer], k_BGSDh), (self.v[layer], v_BGSDh)):
                idx = pos_BS[:, None, :, None].expand(new.shape[0], new.shape[1], S, new.shape[3])
                cache.scatter_(2, idx, new.to(cache.dtype))
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attention_mask(S: int, T: int, start: int | Tensor, window: int | None, device) -> Tensor:
    """[S, T] bool: query start + i sees key j when j <= start + i and, with a window W, j > start + i - W
    (HF ``sliding_window_overlay``: the window includes the token itself). With ``start`` a [B] tensor (rows
    at different lengths) the mask is [B, 1, S, T], one per row."""
    if isinstance(start, Tensor):
        q_pos = (start[:, None] + torch.arange(S, device=device))[:, None, :, None]  # [B, 1, S, 1]
    else:
        q_pos = torch.arange(start, start + S, device=device)[:, None]
    k_pos = torch.arange(T, device=device)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def attend(q_BHSd: Tensor, k_BGTd: Tensor, v_BGTe: Tensor, start: int | Tensor, window: int | None = None,
           sinks_H: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Causal attention of S queries at positions start.. over T = start + S keys -> [B, H, S, e] (``start`` a [B]
    tensor: per-row positions, keys past a row's own length masked).

    Without sinks this is one SDPA call (GQA through ``enable_gqa``). With per-head sinks (gpt-oss,
    reference doc section 2) the sink logit joins each row's softmax and is then dropped, so the weights
    sum to less than one; this path is written out in fp32.
    """
    B, H, S, _ = q_BHSd.shape
    G, T = k_BGTd.shape[1], k_BGTd.shape[2]
    k_BGTd, v_BGTe = k_BGTd.to(q_BHSd.dtype), v_BGTe.to(q_BHSd.dtype)
    if sinks_H is None:
        mask, causal = None, False
        if isinstance(start, Tensor):  # rows at different lengths: each row masks the keys past its own
            mask = attention_mask(S, T, start, window, q_BHSd.device)
        elif window is None and start == 0 and S > 1:
            causal = True
        elif window is not None or (S > 1 and start > 0):
            mask = attention_mask(S, T, start, window, q_BHSd.device)
        return F.scaled_dot_product_attention(q_BHSd, k_BGTd, v_BGTe, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=bool(G != H))  # (a plain bool when traced too)
    if G != H:
        k_BGTd, v_BGTe = k_BGTd.repeat_interleave(H // G, dim=1), v_BGTe.repeat_interleave(H // G, dim=1)
    scale = q_BHSd.shape[-1] ** -0.5 if scale is None else scale
    scores_BHST = (q_BHSd.float() @ k_BGTd.float().transpose(-1, -2)) * scale
    scores_BHST = scores_BHST.masked_fill(~attention_mask(S, T, start, window, q_BHSd.device), float("-inf"))
    sink_BHS1 = sinks_H.float().view(1, H, 1, 1).expand(B, H, S, 1)
    probs_BHST = torch.cat([scores_BHST, sink_BHS1], dim=-1).softmax(-1)[..., :-1]
    return (probs_BHST @ v_BGTe.float()).to(q_BHSd.dtype)


class Attention(nn.Module):
    """Grouped-query attention with the options of published architectures (all off by default):
    q/k/v and output biases, qk-norm per head (Qwen3) or over the whole projection (OLMoE), clip_qkv
    (OLMoE), interleaved RoPE, a sliding window for this layer, per-head attention sinks (gpt-oss)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        D, H, G, Dh = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(D, H * Dh, bias=cfg.qkv_bias)
        self.wk = nn.Linear(D, G * Dh, bias=cfg.qkv_bias)
        self.wv = nn.Linear(D, G * Dh, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * Dh, D, bias=cfg.o_bias)
        self.qk_norm_full = cfg.qk_norm_scope == "full"
        q_width, k_width = (H * Dh, G * Dh) if self.qk_norm_full else (Dh, Dh)
        self.q_norm = RMSNorm(q_width, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps) if cfg.qk_norm else None
        self.clip_qkv = cfg.clip_qkv
        self.rope_interleaved = cfg.rope_interleaved
        self.window = cfg.layer_window(layer)
        self.sinks = nn.Parameter(torch.zeros(H)) if cfg.attn_sinks else None

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.q_norm is not None and self.qk_norm_full:  # OLMoE: over the whole projection, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:  # Qwen3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
        start = 0
        if cache is not None:
            start = cache.start
            k, v = cache.update(self.layer, k, v)
        o = attend(q, k, v, start, self.window, self.sinks)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 section 2.1; reference doc section 2, MLA).

        q            = wq(x)  or  wq_b(q_norm(wq_a(x)))           heads [nope n | rope r]
        [c_kv | k_pe] = wkv_a(x);  c_kv = kv_norm(c_kv)            latent C, one shared rope key r
        [k_nope | v] = wkv_b(c_kv) per head                         n and v dims
        k = [k_nope | rope(k_pe)],  q = [q_nope | rope(q_pe)],  o = wo(softmax(q k^T * scale) v)

    The KV cache keeps c_kv and the rotated k_pe only (C + r values per token) and rebuilds k and v
    from them. scale = (n + r)^-0.5 * mscale^2 under YaRN with mscale_all_dim (HF ``yarn_apply_mscale``).
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        D, H = cfg.dim, cfg.n_heads
        n, r, vd, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.n_heads, self.nope, self.rope, self.v_dim, self.latent = H, n, r, vd, C
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(D, H * (n + r), bias=False)
        else:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, MLA_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * (n + r), bias=False)
        self.q_lora = cfg.q_lora_rank is not None
        self.wkv_a = nn.Linear(D, C + r, bias=False)
        self.kv_norm = RMSNorm(C, MLA_NORM_EPS)
        self.wkv_b = nn.Linear(C, H * (n + vd), bias=False)
        self.wo = nn.Linear(H * vd, D, bias=False)
        self.rope_interleaved = cfg.rope_interleaved
        self.scale = (n + r) ** -0.5
        rs = cfg.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs.get("factor") or 1.0, rs["mscale_all_dim"])
            self.scale *= m * m

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        B, S, _ = x_BSD.shape
        H, n, r = self.n_heads, self.nope, self.rope
        q = self.wq_b(self.q_norm(self.wq_a(x_BSD))) if self.q_lora else self.wq(x_BSD)
        q_nope, q_pe = q.view(B, S, H, n + r).transpose(1, 2).split([n, r], dim=-1)
        c_kv, k_pe = self.wkv_a(x_BSD).split([self.latent, r], dim=-1)
        c_kv_B1SC = self.kv_norm(c_kv).unsqueeze(1)
        k_pe_B1Sr = k_pe.unsqueeze(1)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleaved)
        k_pe_B1Sr = apply_rope(k_pe_B1Sr, cos, sin, self.rope_interleaved)
        start = 0
        if cache is not None:  # cache the latent and the rope key, not the per-head keys and values
            start = cache.start
            c_kv_B1SC, k_pe_B1Sr = cache.update(self.layer, c_kv_B1SC, k_pe_B1Sr)
        T = c_kv_B1SC.shape[2]
        kv = self.wkv_b(c_kv_B1SC.squeeze(1).to(x_BSD.dtype)).view(B, T, H, n + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([n, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe_B1Sr.to(k_nope.dtype).expand(B, H, T, r)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = attend(q, k, v, start, scale=self.scale)
        return self.wo(o.transpose(1, 2).reshape(B, S, H * self.v_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shared_router: Router | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLAttention(cfg, layer) if cfg.attention == "mla" else Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.is_moe_layer(layer):
            self.ffn: MLP | MoE = MoE(cfg.dim, cfg.moe, router=shared_router)
        else:
            self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.activation, bias=cfg.ffn_bias, swiglu_limit=cfg.swiglu_limit,
                           swiglu_alpha=cfg.swiglu_alpha)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, aux: bool = True):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            res = self.ffn(h, aux)
            return x + res.out, res
        return x + self.ffn(h), None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        shared_router = Router(cfg.dim, cfg.moe) if cfg.moe is not None and cfg.moe.shared_router else None
        self.layers = nn.ModuleList(Block(cfg, i, shared_router) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2L) (GPT-2)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith((".bias", "b_in", "b_out")):  # every bias (router bias included) starts at 0
                p.zero_()
            elif name.endswith(("wo.weight", "w_out")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, cache: KVCache | None = None,
                aux: bool = True, logits_to_keep: int | None = None,
                activation_dtype: torch.dtype | None = None) -> ModelOutput:
        """Logits (and the losses when ``targets`` are given). ``aux=False`` is for inference (generation, serving):
        the MoE layers skip their balancing losses and routing statistics, ``aux_loss``/``z_loss`` are None and
        ``stats`` holds only None (see ``MoE.forward``). ``logits_to_keep=k`` computes the output head for the last
        k positions only (a prompt pass needs the last one: the head is [V, D] per position; transformers'
        ``logits_to_keep``); ``logits`` is then [B, k, V]. ``activation_dtype`` (None: the weights') is the residual
        stream's dtype: fp32 over 16-bit weights computes in fp32 (``moekit.model.precision``)."""
        if activation_dtype is not None and activation_dtype != self.tok_emb.weight.dtype:
            from moekit.model.precision import WideLinear

            with WideLinear():
                return self._forward(input_ids, targets, cache, aux, logits_to_keep, activation_dtype)
        return self._forward(input_ids, targets, cache, aux, logits_to_keep, None)

    def _forward(self, input_ids: Tensor, targets: Tensor | None, cache: KVCache | None, aux: bool,
                 logits_to_keep: int | None, activation_dtype: torch.dtype | None) -> ModelOutput:
        B, S = input_ids.shape
        start = 0
        if cache is not None:
            cache.reserve(S)  # a clear error past the cache's length
            start = cache.pos
        if start + S > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {start + S} tokens exceeds {self.config.max_seq_len}")
        if cache is not None and cache.lengths is not None:  # rows at their own positions
            pos_BS = cache.lengths[:, None] + torch.arange(S, device=input_ids.device)
            cos, sin = self.rope_cos[pos_BS].unsqueeze(1), self.rope_sin[pos_BS].unsqueeze(1)  # [B, 1, S, Dh]
        else:
            cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        x = self.tok_emb(input_ids)
        if activation_dtype is not None:
            x = x.to(activation_dtype)
        stats: list[MoEStats | None] = []
        aux_loss = z = x.new_zeros((), dtype=torch.float32) if aux else None
        for block in self.layers:
            x, res = block(x, cos, sin, cache, aux)
            stats.append(res.stats if res is not None else None)
            if res is not None and aux:
                aux_loss, z = aux_loss + res.aux_loss, z + res.z_loss
        if cache is not None:
            cache.advance(S)
        if logits_to_keep is not None:
            if targets is not None:
                raise ValueError("logits_to_keep: the losses need the logits of every position (pass targets=None)")
            x = x[:, -logits_to_keep:]
        h = self.norm(x)
        logits = F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)
        out = ModelOutput(logits=logits, aux_loss=aux_loss, z_loss=z, stats=stats)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=-100)
            out.loss = out.lm_loss + aux_loss + z if aux else out.lm_loss
        return out

    @torch.no_grad()
    def update_router_biases(self, load_per_layer: list[Tensor]) -> None:
        """Apply the aux-loss-free bias rule with each MoE layer's observed load (``routed_per_expert``,
        summed over the step's micro-batches). A shared router sees the sum over layers."""
        moes = self.moe_layers
        if len(load_per_layer) != len(moes):
            raise ValueError(f"load_per_layer: expected {len(moes)} MoE layers, got {len(load_per_layer)}")
        if not moes or moes[0].router.expert_bias is None:
            return
        if self.config.moe.shared_router:
            moes[0].router.update_bias(torch.stack(load_per_layer).sum(0))
        else:
            for moe, load in zip(moes, load_per_layer):
                moe.router.update_bias(load)

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write moekit's checkpoint format (``config.json`` + ``model.safetensors``, ``moekit.formats.checkpoint``)."""
        from moekit.formats.checkpoint import save_pretrained

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs) -> Transformer:
        """Load a moekit or Hugging Face checkpoint, see ``moekit.formats.load.from_pretrained``."""
        from moekit.formats.load import from_pretrained

        return from_pretrained(path, **kwargs)
