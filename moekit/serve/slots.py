"""KV slots: the engine's one preallocated ``KVCache``, a row per running sequence, kept compact.

Legend: N running sequences (rows 0..N-1), G kv heads (1 for MLA's latent cache), L positions, Dh head dim.

The cache is allocated once, [slots, G, L, Dh] per layer and for k and v (MLA: the latent c_kv and the rope key),
so serving never allocates per request and its memory is fixed at start. Running sequences hold rows 0..N-1: a
decode step runs on the first N rows as one ragged batch (``decode_view``: each row at its own length), a prompt
chunk on one row (``prefill_view``). When a sequence finishes, the last row's filled positions move into its row
(``release``), so the batch stays a prefix of the cache and no step computes on a free slot.
"""

from __future__ import annotations

import torch

from moekit.config import ModelConfig
from moekit.model.transformer import KVCache


def slot_bytes(cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of one sequence's cache row at ``max_len`` positions, all layers, k and v."""
    if cfg.attention == "mla":
        per_pos = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_pos = 2 * cfg.n_kv_heads * cfg.head_dim
    return cfg.n_layers * max_len * per_pos * torch.empty((), dtype=dtype).element_size()


class KVSlots:
    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device, dtype: torch.dtype):
        self.cache = KVCache(cfg, batch=slots, max_len=max_len, device=device, dtype=dtype)
        self.slots, self.max_len = slots, max_len

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def _view(self, rows: slice) -> KVCache:
        v = KVCache.__new__(KVCache)
        v.max_len = self.max_len
        v.k = [t[rows] for t in self.cache.k]  # views: the forward's writes land in the preallocated cache
        v.v = [t[rows] for t in self.cache.v]
        v.lengths, v.start, v.pos = None, 0, 0
        return v

    def prefill_view(self, row: int, filled: int) -> KVCache:
        """Row ``row`` alone, ``filled`` positions already written: the next prompt chunk goes on from there."""
        v = self._view(slice(row, row + 1))
        v.pos = filled
        return v

    def decode_view(self, lengths: list[int]) -> KVCache:
        """Rows 0..N-1 at their own lengths (N = len(lengths)): one new token per row goes at its length."""
        v = self._view(slice(0, len(lengths)))
        v.lengths = torch.tensor(lengths, device=v.k[0].device)
        v.pos = max(lengths)
        return v

    def move(self, src: int, dst: int, filled: int) -> None:
        """Copy row ``src``'s first ``filled`` positions into row ``dst`` (compaction when a sequence leaves)."""
        for t in (*self.cache.k, *self.cache.v):
            t[dst, :, :filled] = t[src, :, :filled]
