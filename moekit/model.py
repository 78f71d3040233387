"""The decoder-only transformer, dense or MoE per layer.

Legend: B batch, S sequence, D dim, H query heads, G kv heads, Dh head dim, V vocab, L layers.

    x = embed(ids)
    for each layer:  x = x + attn(norm(x))          # RMSNorm, RoPE, grouped-query SDPA, KV cache
                     x = x + ffn(norm(x))           # dense MLP or MoE (MoE every N, first K dense)
    logits = head(norm(x))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.experts import MLP
from moekit.moe import MoE, MoEStats
from moekit.router import Router


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
        # normalise in fp32 (Zhang & Sennrich 2019), return in the input dtype
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin [max_len, head_dim] for rotate-half RoPE (Su et al. 2021; the Llama/HF layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x_BHSDh: Tensor, cos_SDh: Tensor, sin_SDh: Tensor) -> Tensor:
    x1, x2 = x_BHSDh.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHSDh.float() * cos_SDh + rotated.float() * sin_SDh).to(x_BHSDh.dtype)


class KVCache:
    """Preallocated keys/values per layer for incremental decoding; ``pos`` tokens are filled."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int | None = None, device=None, dtype=torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0

    def update(self, layer: int, k_BGSDh: Tensor, v_BGSDh: Tensor) -> tuple[Tensor, Tensor]:
        S = k_BGSDh.shape[2]
        end = self.pos + S
        if end > self.max_len:
            raise ValueError(f"max_seq_len: the KV cache holds {self.max_len} positions, {end} requested")
        self.k[layer][:, :, self.pos:end] = k_BGSDh
        self.v[layer][:, :, self.pos:end] = v_BGSDh
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        D, H, G, Dh = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(D, H * Dh, bias=False)
        self.wk = nn.Linear(D, G * Dh, bias=False)
        self.wv = nn.Linear(D, G * Dh, bias=False)
        self.wo = nn.Linear(H * Dh, D, bias=False)
        self.q_norm = RMSNorm(Dh, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Dh, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
        # causal over the whole context; a chunk after cached tokens needs an explicit offset mask
        mask, causal = None, S > 1
        if S > 1 and start > 0:
            mask = torch.ones(S, start + S, dtype=torch.bool, device=x_BSD.device).tril(start)
            causal = False
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shared_router: Router | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.is_moe_layer(layer):
            self.ffn: MLP | MoE = MoE(cfg.dim, cfg.moe, router=shared_router)
        else:
            self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.activation)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            res = self.ffn(h)
            return x + res.out, res
        return x + self.ffn(h), None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.attention == "mla":
            raise ValueError("attention: 'mla' (multi-head latent attention) is modelled by the cost model only; "
                             "building it is part of the Hugging Face interop work")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        shared_router = Router(cfg.dim, cfg.moe) if cfg.moe is not None and cfg.moe.shared_router else None
        self.layers = nn.ModuleList(Block(cfg, i, shared_router) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
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
            elif name.endswith(("wo.weight", "w_out")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, cache: KVCache | None = None) -> ModelOutput:
        B, S = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + S > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {start + S} tokens exceeds {self.config.max_seq_len}")
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        x = self.tok_emb(input_ids)
        stats: list[MoEStats | None] = []
        aux = z = x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x, res = block(x, cos, sin, cache)
            stats.append(res.stats if res is not None else None)
            if res is not None:
                aux, z = aux + res.aux_loss, z + res.z_loss
        if cache is not None:
            cache.pos += S
        h = self.norm(x)
        logits = F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)
        out = ModelOutput(logits=logits, aux_loss=aux, z_loss=z, stats=stats)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            out.loss = out.lm_loss + aux + z
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
