"""Tensor names and layouts: Hugging Face checkpoints <-> moekit ``state_dict``, both directions.

Shape legend: D hidden size, E experts, F expert/FFN width, H heads, G kv heads, Dh head dim, V vocab,
R q_lora_rank, C kv_lora_rank, n/r/v MLA nope/rope/value head dims.

One ``Rule`` per moekit tensor names the Hugging Face tensors it is made of and the two conversions
(``to_moekit`` joins them, ``to_hf`` splits a moekit tensor back). The same rules serve loading and
export, and the shapes the checkpoint must have are derived from them by converting an empty (meta)
tensor of the moekit shape, so a shape mismatch names the Hugging Face tensor and both shapes.

Layouts (reference doc section 0.1 and 1.x):
  * dense FFN / shared experts: ``gate_proj [F, D]`` and ``up_proj [F, D]`` are the two halves of moekit's
    ``w_in [2F, D]`` (gate rows first), ``down_proj [D, F]`` is ``w_out``.
  * experts, per-expert names (what ``save_pretrained`` writes by default):
    mixtral ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down) and ``block_sparse_moe.gate``;
    the qwen2_moe family ``mlp.experts.{e}.gate_proj / up_proj / down_proj``.
  * experts, fused 3-D layout (``save_original_format=False``, transformers 5 in memory):
    ``mlp.experts.gate_up_proj [E, 2F, D]`` (gate rows first) == moekit ``experts.w_in``,
    ``mlp.experts.down_proj [E, D, F]`` == ``experts.w_out``, router ``mlp.gate.weight``. Detected per layer.
  * gpt-oss: ``gate_up_proj [E, D, 2F]`` is transposed AND interleaved (column 2i = gate i, 2i+1 = up i),
    ``gate_up_proj_bias [E, 2F]`` interleaved, ``down_proj [E, F, D]`` transposed, ``down_proj_bias [E, D]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.formats.checkpoint import CheckpointError, SafetensorsReader

log = logging.getLogger("moekit")


@dataclass(frozen=True)
class Rule:
    key: str  # moekit state_dict key
    hf: tuple[str, ...]  # Hugging Face tensor names, in the order to_moekit takes them
    to_moekit: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]


def _same(key: str, name: str) -> Rule:
    return Rule(key, (name,), lambda ts: ts[0], lambda t: [t])


def _halves(key: str, gate: str, up: str) -> Rule:
    """w_in [2F, ...] = cat(gate [F, ...], up [F, ...])."""
    return Rule(key, (gate, up), lambda ts: torch.cat(ts, dim=0), lambda t: list(t.chunk(2, dim=0)))


def _experts_in(key: str, names: list[tuple[str, str]]) -> Rule:
    """experts.w_in [E, 2F, D] from per-expert (gate [F, D], up [F, D]) pairs."""
    flat = tuple(n for pair in names for n in pair)

    def to_moekit(ts: list[Tensor]) -> Tensor:
        return torch.stack([torch.cat(ts[2 * e:2 * e + 2], dim=0) for e in range(len(names))])

    def to_hf(t: Tensor) -> list[Tensor]:
        return [half for e in range(t.shape[0]) for half in t[e].chunk(2, dim=0)]

    return Rule(key, flat, to_moekit, to_hf)


def _experts_stack(key: str, names: list[str]) -> Rule:
    """experts.w_out [E, D, F] from per-expert down [D, F]."""
    return Rule(key, tuple(names), lambda ts: torch.stack(ts), lambda t: list(t.unbind(0)))


def _deinterleave(t: Tensor, dim: int) -> Tensor:
    """(g0, u0, g1, u1, ...) along ``dim`` -> (g0, g1, ..., u0, u1, ...)."""
    idx = torch.arange(t.shape[dim], device=t.device)
    return torch.cat([t.index_select(dim, idx[0::2]), t.index_select(dim, idx[1::2])], dim=dim)


def _interleave(t: Tensor, dim: int) -> Tensor:
    g, u = t.chunk(2, dim=dim)
    return torch.stack([g, u], dim=dim + 1).flatten(dim, dim + 1)


def _gpt_oss_rules(M: str, P: str) -> list[Rule]:
    """gpt-oss experts (reference doc 1.7): transposed, interleaved gate/up, biases."""
    e = P + "mlp.experts."
    return [
        _same(M + "ffn.router.weight", P + "mlp.router.weight"),
        _same(M + "ffn.router.bias", P + "mlp.router.bias"),
        Rule(M + "ffn.experts.w_in", (e + "gate_up_proj",),
             lambda ts: _deinterleave(ts[0].transpose(1, 2), 1).contiguous(),  # [E, D, 2F] -> [E, 2F, D]
             lambda t: [_interleave(t, 1).transpose(1, 2).contiguous()]),
        Rule(M + "ffn.experts.b_in", (e + "gate_up_proj_bias",),
             lambda ts: _deinterleave(ts[0], 1).contiguous(), lambda t: [_interleave(t, 1).contiguous()]),
        Rule(M + "ffn.experts.w_out", (e + "down_proj",),
             lambda ts: ts[0].transpose(1, 2).contiguous(),  # [E, F, D] -> [E, D, F]
             lambda t: [t.transpose(1, 2).contiguous()]),
        _same(M + "ffn.experts.b_out", e + "down_proj_bias"),
    ]


def rules(cfg: ModelConfig, arch: str, fused: Callable[[int], bool]) -> list[Rule]:
    """Every moekit tensor of ``cfg`` with its Hugging Face names as ``arch``; ``fused(L)`` picks the fused
    3-D expert layout for MoE layer L."""
    out = [_same("tok_emb.weight", "model.embed_tokens.weight")]
    for L in range(cfg.n_layers):
        P, M = f"model.layers.{L}.", f"layers.{L}."
        a = P + "self_attn."
        out += [_same(M + "attn_norm.weight", P + "input_layernorm.weight"),
                _same(M + "ffn_norm.weight", P + "post_attention_layernorm.weight")]
        if cfg.attention == "mla":
            if cfg.q_lora_rank is None:
                out.append(_same(M + "attn.wq.weight", a + "q_proj.weight"))
            else:
                out += [_same(M + "attn.wq_a.weight", a + "q_a_proj.weight"),
                        _same(M + "attn.q_norm.weight", a + "q_a_layernorm.weight"),
                        _same(M + "attn.wq_b.weight", a + "q_b_proj.weight")]
            out += [_same(M + "attn.wkv_a.weight", a + "kv_a_proj_with_mqa.weight"),
                    _same(M + "attn.kv_norm.weight", a + "kv_a_layernorm.weight"),
                    _same(M + "attn.wkv_b.weight", a + "kv_b_proj.weight"),
                    _same(M + "attn.wo.weight", a + "o_proj.weight")]
        else:
            for mine, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
                out.append(_same(f"{M}attn.{mine}.weight", f"{a}{theirs}.weight"))
                if (cfg.o_bias if mine == "wo" else cfg.qkv_bias):
                    out.append(_same(f"{M}attn.{mine}.bias", f"{a}{theirs}.bias"))
            if cfg.qk_norm:
                out += [_same(M + "attn.q_norm.weight", a + "q_norm.weight"),
                        _same(M + "attn.k_norm.weight", a + "k_norm.weight")]
            if cfg.attn_sinks:
                out.append(_same(M + "attn.sinks", a + "sinks"))
        if not cfg.is_moe_layer(L):
            m = P + "mlp."
            out += [_halves(M + "ffn.w_in", m + "gate_proj.weight", m + "up_proj.weight"),
                    _same(M + "ffn.w_out", m + "down_proj.weight")]
            if cfg.ffn_bias:
                out += [_halves(M + "ffn.b_in", m + "gate_proj.bias", m + "up_proj.bias"),
                        _same(M + "ffn.b_out", m + "down_proj.bias")]
            continue
        moe = cfg.moe
        assert moe is not None
        if arch == "gpt_oss":
            out += _gpt_oss_rules(M, P)
            continue
        E = moe.n_experts
        if fused(L):
            m = P + "mlp."
            out += [_same(M + "ffn.router.weight", m + "gate.weight"),
                    _same(M + "ffn.experts.w_in", m + "experts.gate_up_proj"),
                    _same(M + "ffn.experts.w_out", m + "experts.down_proj")]
        elif arch == "mixtral":
            m = P + "block_sparse_moe."
            out += [_same(M + "ffn.router.weight", m + "gate.weight"),
                    _experts_in(M + "ffn.experts.w_in",
                                [(f"{m}experts.{e}.w1.weight", f"{m}experts.{e}.w3.weight") for e in range(E)]),
                    _experts_stack(M + "ffn.experts.w_out", [f"{m}experts.{e}.w2.weight" for e in range(E)])]
        else:
            m = P + "mlp."
            out += [_same(M + "ffn.router.weight", m + "gate.weight"),
                    _experts_in(M + "ffn.experts.w_in", [(f"{m}experts.{e}.gate_proj.weight",
                                                           f"{m}experts.{e}.up_proj.weight") for e in range(E)]),
                    _experts_stack(M + "ffn.experts.w_out", [f"{m}experts.{e}.down_proj.weight" for e in range(E)])]
        if arch == "deepseek_v3":
            out.append(_same(M + "ffn.router.expert_bias", P + "mlp.gate.e_score_correction_bias"))
        if moe.n_shared_experts:
            s = P + ("mlp.shared_expert." if arch == "qwen2_moe" else "mlp.shared_experts.")
            out += [_halves(M + "ffn.shared.w_in", s + "gate_proj.weight", s + "up_proj.weight"),
                    _same(M + "ffn.shared.w_out", s + "down_proj.weight")]
            if moe.shared_expert_gate:
                out.append(_same(M + "ffn.shared_gate.weight", P + "mlp.shared_expert_gate.weight"))
    out.append(_same("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        out.append(_same("lm_head.weight", "lm_head.weight"))
    return out


_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # non-persistent buffers some old exports contain


def load_hf_state(cfg: ModelConfig, arch: str, reader: SafetensorsReader,
                  expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The moekit state dict of a Hugging Face checkpoint; every checkpoint tensor must be used.

    ``expected`` maps moekit keys to their shapes (from the model built for ``cfg``). Missing tensors,
    shape mismatches and tensors the model has no place for raise ``CheckpointError`` naming the
    tensor and its file. DeepSeek-V3 multi-token-prediction layers (index >= num_hidden_layers) are not
    part of the causal LM; transformers ignores them too, and they are skipped with a log message.
    """
    where = str(reader.directory)
    quantized = next((n for n in reader if n.endswith(("_blocks", "_scales", "weight_scale_inv"))), None)
    if quantized is not None:  # e.g. gpt-oss MXFP4 (reference doc 1.7) or DeepSeek FP8 block scales
        from moekit.formats.hf.config_map import UnsupportedCheckpointError

        raise UnsupportedCheckpointError(f"{arch}: quantized tensor {quantized} in {reader.file_of(quantized)}: "
                                         "quantized checkpoints are not supported; use a bf16/fp32 checkpoint")

    def fused(L: int) -> bool:
        return f"model.layers.{L}.mlp.experts.gate_up_proj" in reader

    used: set[str] = set()
    state: dict[str, Tensor] = {}
    for rule in rules(cfg, arch, fused):
        if rule.key not in expected:
            raise CheckpointError(f"{arch}: internal mapping error, {rule.key} is not a moekit tensor of this config")
        shapes = [tuple(t.shape) for t in rule.to_hf(torch.empty(expected[rule.key], device="meta"))]
        tensors = []
        for name, shape in zip(rule.hf, shapes):
            if name not in reader:
                raise CheckpointError(f"{arch}: missing tensor {name} in {where} (needed for moekit {rule.key})")
            got = reader.shape(name)
            if got != shape:
                raise CheckpointError(f"{arch}: tensor {name} in {reader.file_of(name)} has shape {list(got)}, "
                                      f"config.json implies {list(shape)}")
            tensors.append(reader[name])
            used.add(name)
        state[rule.key] = rule.to_moekit(tensors)
    skipped = []
    for name in reader:
        if name in used or _IGNORED.search(name):
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if arch == "deepseek_v3" and layer and int(layer.group(1)) >= cfg.n_layers:
            skipped.append(name)
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            if torch.equal(reader[name], state["tok_emb.weight"]):
                continue
            raise CheckpointError(f"{arch}: tie_word_embeddings is true but lm_head.weight in {reader.file_of(name)} "
                                  "differs from model.embed_tokens.weight")
        raise CheckpointError(f"{arch}: unexpected tensor {name} in {reader.file_of(name)}: the model described by "
                              "config.json has no place for it")
    if skipped:
        log.info("%s: skipped %d multi-token-prediction tensors (layers >= %d), as transformers does",
                 arch, len(skipped), cfg.n_layers)
    return state


def export_hf_state(model: torch.nn.Module, arch: str, expert_layout: str = "per_expert") -> dict[str, Tensor]:
    """The Hugging Face tensors of ``model`` as ``arch``; ``expert_layout`` is "per_expert" (the names
    ``save_pretrained`` writes by default) or "fused" (3-D ``gate_up_proj``/``down_proj``)."""
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout: expected 'per_expert' or 'fused', got {expert_layout!r}")
    cfg = model.config
    sd = model.state_dict()
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules(cfg, arch, lambda L: expert_layout == "fused"):
        if rule.key in sd:
            t = sd[rule.key]
        elif rule.key.endswith("router.expert_bias"):  # deepseek_v3 always has a correction bias: zero = none
            t = torch.zeros(cfg.moe.n_experts, dtype=torch.float32)
        else:
            raise CheckpointError(f"{arch}: internal mapping error, the model has no tensor {rule.key}")
        used.add(rule.key)
        for name, part in zip(rule.hf, rule.to_hf(t.detach())):
            out[name] = part.clone(memory_format=torch.contiguous_format)  # own storage: safetensors refuses views
    left = [k for k in sd if k not in used]
    if left:
        raise CheckpointError(f"cannot export as {arch}: moekit tensor {left[0]} has no place in the "
                              f"{arch} format ({len(left)} such tensors)")
    return out
