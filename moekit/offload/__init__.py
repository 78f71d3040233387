"""Expert offloading: routed experts stay in the checkpoint's files and are read, on demand, into a fixed pool of
slots under a memory budget (``load_offloaded(path, expert_memory_gb)``).

    store.py    one expert's bytes from a safetensors file into a given tensor, past the page cache
    experts.py  the pool (LRU slots) and ``OffloadedExperts``, the stand-in for a MoE layer's ``Experts``
    prefetch.py the reader thread that loads the next layer's guessed experts while this layer computes
    load.py     a checkpoint loaded with its routed experts offloaded; the pool's counters

Imports: ``moekit.layer``, ``moekit.formats``, ``moekit.host``.
"""

from moekit.offload.experts import ExpertPool, OffloadedExperts
from moekit.offload.load import load_offloaded, offload_stats, reset_offload_stats, slots_for_budget
from moekit.offload.store import ExpertStore

__all__ = ["ExpertPool", "ExpertStore", "OffloadedExperts", "load_offloaded", "offload_stats",
           "reset_offload_stats", "slots_for_budget"]
