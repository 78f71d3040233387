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
from moekit.offload.prefetch import GuessScore, Prefetcher
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


CACHES = ("lru", "none")


def load_offloaded(path: str | os.PathLike[str], expert_memory_gb: float, dtype: torch.dtype | str | None = None,
                   tokenizer: bool = True, prefetch: bool = True, cache: str = "lru") -> nn.Module:
    """A moekit checkpoint as a ``Transformer`` whose routed experts stay in the checkpoint's files, read into
    a pool of ``expert_memory_gb`` GiB (see the module docstring). ``dtype``: as ``moekit.from_pretrained``.

    ``prefetch``: each MoE layer guesses the next one's experts and reads them on a background thread
    (``moekit.offload.prefetch``). ``cache``: ``"lru"`` keeps the slots' experts between calls (least recently
    used evicted); ``"none"`` forgets them after every call (naive on-demand loading, the baseline)."""
    if cache not in CACHES:
        raise ValueError(f"cache: {cache!r} is not one of {', '.join(CACHES)}")
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
        offloaded[prefix] = module.experts = OffloadedExperts(module.experts, stores[prefix], prefix, slots, target,
                                                              keep=cache == "lru")
    if prefetch and cache == "lru":  # (nothing is kept without a cache: a guess would be read and then forgotten)
        model.offload_prefetcher = prefetcher = Prefetcher()
        for (_, this), (_, nxt) in zip(moe_layers, moe_layers[1:]):
            this.experts.link_prefetch(prefetcher, nxt.router, nxt.experts)
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
    """Over every offloaded layer of ``model``: pool hits (``prefetch_hits`` of them on prefetched experts, the
    rest ``reuse_hits``: kept from earlier tokens), misses (reads on the critical path), hit rate, prefetched
    reads, bytes read, and per layer the guess recall and precision of the prefetch (None without one)."""
    layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    pools = [m.pool for m in layers]
    hits, misses = sum(p.hits for p in pools), sum(p.misses for p in pools)
    prefetch_hits = sum(p.prefetch_hits for p in pools)
    stores = {id(p.store): p.store for p in pools}.values()
    guesses = [{"recall": m.score.recall, "precision": m.score.precision, "needed": m.score.needed}
               if m.score.needed else None for m in layers]
    return {"layers": len(pools), "slots_per_layer": pools[0].n_slots if pools else 0, "hits": hits,
            "misses": misses, "hit_rate": hits / max(hits + misses, 1), "prefetch_hits": prefetch_hits,
            "reuse_hits": hits - prefetch_hits, "prefetched": sum(p.prefetched for p in pools),
            "bytes_read": sum(s.bytes_read for s in stores), "guess_per_layer": guesses}


def reset_offload_stats(model: nn.Module) -> None:
    """Zero the counters ``offload_stats`` reads (the pools keep their experts): e.g. after a warm-up round."""
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            pool = m.pool
            pool.hits = pool.misses = pool.prefetched = pool.prefetch_hits = 0
            pool.evicted.clear()
            m.score = GuessScore()
            pool.store.bytes_read = pool.store.reads = 0
