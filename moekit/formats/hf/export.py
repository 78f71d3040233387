"""``export_hf``: write a moekit model in the Hugging Face format of an architecture.

Shape legend: none (orchestration only; tensor layouts are in ``weights.py``).

``export_hf`` writes ``config.json`` (5.x keys: ``rope_parameters`` and the ``attribute_map`` names, see
reference doc 0.2) and ``model.safetensors`` (or shards + index) with the tensor names
``transformers.save_pretrained`` writes by default (per-expert), or the fused 3-D layout. The model must
be exactly expressible in the target architecture; otherwise ``UnsupportedCheckpointError`` lists every
feature in the way (``config_map.export_problems``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moekit.formats.checkpoint import atomic_write_text, output_directory, write_safetensors
from moekit.formats.hf.config_map import config_to_hf, infer_arch
from moekit.formats.hf.weights import export_hf_state

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_hf(model: torch.nn.Module | str | os.PathLike[str], path: str | os.PathLike[str], arch: str | None = None,
              expert_layout: str = "per_expert", max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` (a Transformer or a checkpoint directory) to ``path`` as Hugging Face ``arch``.

    ``arch`` defaults to the architecture the model was loaded from (``config.hf_arch``) or, for a
    moekit-native or upcycled model, the first architecture that holds it exactly (dense: llama, qwen2,
    mistral; MoE: mixtral, qwen3_moe, qwen2_moe, olmoe, deepseek_v3, deepseek_v2, gpt_oss). Returns ``path``.
    """
    if not isinstance(model, torch.nn.Module):
        from moekit.formats.load import from_pretrained  # (a path: load it first; formats.load imports no export)

        model = from_pretrained(model, dtype="stored")
    cfg = model.config
    arch = arch or infer_arch(cfg)
    dtype = model.tok_emb.weight.dtype
    hf_cfg = config_to_hf(cfg, arch, _DTYPE_NAMES.get(dtype, "float32"))
    hf_cfg.update(getattr(model, "hf_token_ids", {}) or {})
    state = export_hf_state(model, arch, expert_layout)
    path = Path(path)
    with output_directory(path) as out:  # all the files or none
        write_safetensors(state, out, max_shard_bytes)
        atomic_write_text(out / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(out)
    return path
