"""The model: the decoder-only transformer around the layer, its costs, named presets and sampling.

    transformer.py  RMSNorm, RoPE, GQA and latent (MLA) attention, KV cache, dense/MoE blocks, Transformer
    costs.py        the analytic cost model (parameters, FLOPs, memory) and dense twins
    presets.py      named configs: tiny/small and published models
    generate.py     sampling with the KV cache: the prompt pass (chunked), then one decode step per token
    decode.py       the decode step for bandwidth: compiled attention halves, the C++ products, fp32 activations
    precision.py    fp32 activations over 16-bit weights (CPUs without bf16 instructions)

Imports: ``moekit.config``, ``moekit.host`` and ``moekit.layer``. It reads and writes no files: formats live in
``moekit.formats`` (``Transformer.save_pretrained`` / ``from_pretrained`` are thin calls into it).
"""

from moekit.model.costs import dense_twin
from moekit.model.presets import PRESETS, get_preset
from moekit.model.transformer import KVCache, ModelOutput, Transformer

# (``costs``, the function, stays in ``moekit.model.costs``: re-exported here it would hide that module's name)
__all__ = ["KVCache", "ModelOutput", "PRESETS", "Transformer", "dense_twin", "get_preset"]
