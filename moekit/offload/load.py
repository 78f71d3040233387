"""Load a moekit checkpoint with its routed experts offloaded: ``load_offloaded(path, expert_memory_gb)``.

Attention, embeddings, norms, routers, dense FFNs and shared experts are loaded as usual and stay resident; every
MoE layer's routed experts become :class:`~moekit.offload.experts.OffloadedExperts` with an equal share of the
budget: ``slots = floor(budget / (MoE layers x bytes per expert))`` per layer (bytes per expert in the compute
dtype: w_in, w_out and the biases). The budget must hold one expert per layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moekit.config import ModelConfig
from moekit.formats.checkpoint import (
    CheckpointError,
    SafetensorsReader,
    build_empty,
    is_moekit_checkpoint,
    load_into,
    read_config_json,
)
from moekit.formats.load import attach_tokenizer
from moekit.formats.paths import resolve_checkpoint
from moekit.host import weights_dtype
from moekit.layer.experts import Experts
from moekit.layer.moe import MoE
from moekit.offload.experts import PARTS, OffloadedExperts
from moekit.offload.store import ExpertStore

GIB = 1024 ** 3


def expert_bytes(experts: nn.Module, dtype: torch.dtype) -> int:
    """The bytes of one routed expert of ``experts`` in ``dtype`` (its slice of every stacked tensor)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(p[0].numel() * size for part in PARTS if (p := getattr(experts, part, None)) is not None)


def slots_for_budget(model: nn.Module, expert_memory_gb: float, dtype: torch.dtype) -> int:
    """Slots per MoE layer that ``expert_memory_gb`` GiB holds; ValueError below one per layer."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("expert_memory: the model has no MoE layer, so no routed expert to offload")
    per = expert_bytes(layers[0].experts, dtype)
    if not expert_memory_gb > 0:
        raise ValueError(f"expert_memory: must be > 0 GiB, got {expert_memory_gb}")
    slots = int(expert_memory_gb * GIB // (len(layers) * per))
    if slots < 1:
        need = len(layers) * per / GIB
        raise ValueError(f"expert_memory: {expert_memory_gb:g} GiB holds less than one expert per MoE layer: "
                         f"{len(layers)} layers x {per / 2**20:.2f} MiB per expert need at least {need:.4g} GiB")
    return slots


def load_offloaded(path: str | os.PathLike[str], expert_memory_gb: float, dtype: torch.dtype | str | None = None,
                   tokenizer: bool = True) -> nn.Module:
    """A moekit checkpoint as a ``Transformer`` whose routed experts stay in the checkpoint's files, read into
    a pool of ``expert_memory_gb`` GiB (see the module docstring). ``dtype``: as ``moekit.from_pretrained``."""
    directory = resolve_checkpoint(path)
    if not is_moekit_checkpoint(directory):
        raise CheckpointError(f"{directory}: offloading reads moekit checkpoints (stacked expert tensors); convert "
                              "a Hugging Face one with moekit convert first")
    cfg = ModelConfig.from_dict(read_config_json(directory))
    model = build_empty(cfg)
    moe_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE) and type(m.experts) is Experts]
    # the expert files first: a truncated one is named by its expert tensor, before the reader reads the rest
    stores = {}
    for name, module in moe_layers:
        prefix = f"{name}.experts"
        names = [f"{prefix}.{p}" for p in PARTS if getattr(module.experts, p) is not None]
        stores[prefix] = ExpertStore(directory, names)
    skip = tuple(f"{name}.experts." for name, _ in moe_layers)
    reader = SafetensorsReader(directory)
    # (copies: the reader's tensors may map the file, and the resident part must not depend on its pages)
    state = {k: reader[k].clone() for k in reader if not k.startswith(skip)}
    del reader
    stored = state["tok_emb.weight"].dtype if "tok_emb.weight" in state else torch.float32
    target = stored if dtype == "stored" else weights_dtype(dtype, stored, "cpu")
    slots = slots_for_budget(model, expert_memory_gb, target)
    offloaded: dict[str, OffloadedExperts] = {}
    for name, module in moe_layers:
        prefix = f"{name}.experts"
        offloaded[prefix] = module.experts = OffloadedExperts(module.experts, stores[prefix], prefix, slots, target)
    load_into(model, state, str(directory))
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(target)
    model.eval()
    model.offloaded_experts = offloaded
    if tokenizer:
        attach_tokenizer(model, Path(directory))
    return model


def offload_stats(model: nn.Module) -> dict:
    """Pool hits, misses, hit rate and bytes read over every offloaded layer of ``model``."""
    pools = [m.pool for m in model.modules() if isinstance(m, OffloadedExperts)]
    hits, misses = sum(p.hits for p in pools), sum(p.misses for p in pools)
    stores = {id(p.store): p.store for p in pools}.values()
    return {"layers": len(pools), "slots_per_layer": pools[0].n_slots if pools else 0, "hits": hits,
            "misses": misses, "hit_rate": hits / max(hits + misses, 1),
            "bytes_read": sum(s.bytes_read for s in stores)}
