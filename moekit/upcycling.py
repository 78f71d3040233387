"""Sparse upcycling: turn a dense checkpoint into an MoE model whose experts start as copies of the dense FFN.

Shape legend: D dim, F dense FFN width, g granularity, F/g expert width, E experts (= copies * g),
I = 2F (SwiGLU: [gate | up] rows) or F (GELU).

Method (Komatsuzaki et al. 2023, "Sparse Upcycling", arXiv:2212.05055): attention, norms, embeddings and
the head are copied; every MoE layer's experts are copies of that layer's dense FFN; routers start from
a fresh normal init (std ``config.init_std``); layers the MoE rule keeps dense keep their FFN.

Fine-grained experts (``granularity=g``, He et al. 2024, "Upcycling Large Language Models into Mixture of
Experts", arXiv:2410.07524, "virtual groups" and weight scaling): each copy of the FFN is split along its
hidden units into g slices of width F/g (SwiGLU is a sum over hidden units, so the slices add up to the
FFN). Expert ``e = c * g + s`` is slice s of copy c; the g experts of one copy share one router row, so
the router ranks whole copies, and each slice's ``w_out`` is multiplied by g to undo the 1/g share of the
renormalised weights.

Function preservation: with ``noise_std=0``, weights that sum to one per token (``norm_topk_prob`` or
``softmax_after_topk``), ``routed_scaling_factor=1``, no shared experts and ``top_k`` a multiple of g,
every token's output is sum_c w_c * FFN(x) with sum_c w_c = 1, i.e. the dense FFN: the upcycled model
computes the dense model's function (tested in tests/test_upcycling.py). ``noise_std > 0`` adds Gaussian
noise of ``noise_std`` times each copied tensor's standard deviation to every expert, to break the
symmetry between copies (the router breaks it anyway once trained).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from moekit.config import ModelConfig, MoEConfig
from moekit.layer.ffn import GATED
from moekit.model.transformer import Transformer


def upcycle(dense: Transformer | str | os.PathLike[str], moe_config: MoEConfig, noise_std: float = 0.0,
            granularity: int = 1, *, moe_every: int = 1, first_dense_layers: int = 0, seed: int = 0) -> Transformer:
    """An MoE Transformer initialised from the dense model ``dense`` (a model or a checkpoint directory:
    moekit, or Hugging Face llama/qwen2/mistral).

    ``moe_config`` sets the experts and the router (``n_experts`` counts the fine-grained experts, so it
    must be a multiple of ``granularity``); its ``expert_ffn_dim`` must be None or ``ffn_dim / granularity``
    and its activation is taken from the dense model. ``moe_every``/``first_dense_layers`` place the MoE
    layers as in ``ModelConfig``. ``seed`` fixes the router init and the noise.
    """
    if not isinstance(dense, Transformer):
        from moekit.formats.load import from_pretrained

        dense = from_pretrained(dense, dtype="stored")
    cfg = dense.config
    if cfg.moe is not None:
        raise ValueError("dense: the model is already MoE (config.moe is set); upcycling starts from a dense model")
    g = granularity
    if not isinstance(g, int) or g < 1 or cfg.ffn_dim % g:
        raise ValueError(f"granularity: must be a positive divisor of ffn_dim={cfg.ffn_dim}, got {granularity!r}")
    if moe_config.n_experts % g:
        raise ValueError(f"n_experts: {moe_config.n_experts} experts cannot be split into copies of {g} slices "
                         "(must be a multiple of granularity)")
    width = cfg.ffn_dim // g
    if moe_config.expert_ffn_dim not in (None, width):
        raise ValueError(f"expert_ffn_dim: must be None or ffn_dim / granularity = {width}, got "
                         f"{moe_config.expert_ffn_dim}")
    if moe_config.n_shared_experts:
        raise ValueError("n_shared_experts: upcycling into shared experts is not supported (set it to 0)")
    if noise_std < 0:
        raise ValueError(f"noise_std: must be >= 0, got {noise_std}")
    moe = dataclasses.replace(moe_config, expert_ffn_dim=width, activation=cfg.activation, ffn_bias=cfg.ffn_bias,
                              swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)
    name = f"{cfg.name}-upcycled" if cfg.name else "upcycled"
    new_cfg: ModelConfig = dataclasses.replace(cfg, moe=moe, moe_every=moe_every,
                                               first_dense_layers=first_dense_layers, name=name, hf_arch="")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(new_cfg)
    dtype = dense.tok_emb.weight.dtype
    model.to(dtype)
    src = dense.state_dict()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key in src and src[key].shape == t.shape:
                t.copy_(src[key])  # embeddings, attention, norms, head, dense layers
        for i in new_cfg.moe_layers:
            ffn = dense.layers[i].ffn
            layer = model.layers[i].ffn
            experts = layer.experts
            for name_, w in (("w_in", ffn.w_in), ("w_out", ffn.w_out), ("b_in", ffn.b_in), ("b_out", ffn.b_out)):
                if w is None:
                    continue
                slices = _slices(w, name_, g, cfg.activation)  # g tensors of one expert's shape
                target = getattr(experts, name_)
                for e in range(moe.n_experts):
                    t = slices[e % g]
                    if noise_std > 0 and name_ in ("w_in", "w_out"):
                        t = t + noise_std * t.std() * torch.randn(t.shape, generator=gen).to(t.dtype)
                    target[e].copy_(t)
            # virtual groups: the g slices of one copy share a router row
            copies = moe.n_experts // g
            rows = torch.randn(copies, cfg.dim, generator=gen) * cfg.init_std
            layer.router.weight.copy_(rows.repeat_interleave(g, dim=0).to(layer.router.weight.dtype))
            if layer.router.bias is not None:
                layer.router.bias.zero_()
    tokenizer = getattr(dense, "tokenizer", None)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model


def _slices(w: Tensor, name: str, g: int, activation: str) -> list[Tensor]:
    """Split one dense FFN tensor into g expert slices along the hidden units (w_out scaled by g)."""
    if name in ("w_in", "b_in"):
        if activation in GATED:  # [gate F | up F] -> g x [gate F/g | up F/g]
            gate, up = w.chunk(2, dim=0)
            return [torch.cat([a, b], dim=0) for a, b in zip(gate.chunk(g, dim=0), up.chunk(g, dim=0))]
        return list(w.chunk(g, dim=0))
    if name == "w_out":  # [D, F] -> g x [D, F/g], times g: the g slices of a copy share its weight w_c / g
        return [s * g for s in w.chunk(g, dim=1)]
    return [w] * g  # b_out [D]: each slice's weight is w_c / g, so g copies of b_out add up to b_out
