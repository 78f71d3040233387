"""``export_hf`` and ``convert``: write a moekit model in the Hugging Face format of an architecture.

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
import shutil
from pathlib import Path

import torch

from moekit.checkpoint_io import atomic_write_text, save_pretrained, write_safetensors
from moekit.hf.config_map import config_to_hf, infer_arch
from moekit.hf.load import from_pretrained
from moekit.hf.weights import export_hf_state

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# small files of a Hugging Face checkpoint that convert() carries over unchanged
_SIDE_FILES = ("generation_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")


def export_hf(model: torch.nn.Module | str | os.PathLike[str], path: str | os.PathLike[str], arch: str | None = None,
              expert_layout: str = "per_expert", max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` (a Transformer or a checkpoint directory) to ``path`` as Hugging Face ``arch``.

    ``arch`` defaults to the architecture the model was loaded from (``config.hf_arch``) or, for a
    moekit-native or upcycled model, the first architecture that holds it exactly (dense: llama, qwen2,
    mistral; MoE: mixtral, qwen3_moe, qwen2_moe, olmoe, deepseek_v3, deepseek_v2, gpt_oss). Returns ``path``.
    """
    if not isinstance(model, torch.nn.Module):
        model = from_pretrained(model, dtype="stored")
    cfg = model.config
    arch = arch or infer_arch(cfg)
    dtype = model.tok_emb.weight.dtype
    hf_cfg = config_to_hf(cfg, arch, _DTYPE_NAMES.get(dtype, "float32"))
    hf_cfg.update(getattr(model, "hf_token_ids", {}) or {})
    state = export_hf_state(model, arch, expert_layout)
    path = Path(path)
    write_safetensors(state, path, max_shard_bytes)
    atomic_write_text(path / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str = "hf", arch: str | None = None,
            expert_layout: str = "per_expert", max_shard_bytes: int | None = None) -> Path:
    """Convert checkpoint directory ``src`` (moekit or Hugging Face) to ``dst`` in format ``to``
    ("hf": Hugging Face ``arch``, see :func:`export_hf`; "moekit": moekit's format). The tokenizer
    travels along; Hugging Face side files (generation_config.json, ...) are copied for ``to="hf"``."""
    if to not in ("hf", "moekit"):
        raise ValueError(f"to: expected 'hf' or 'moekit', got {to!r}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"dst: must differ from src ({src})")
    model = from_pretrained(src, dtype="stored")
    if to == "moekit":
        return save_pretrained(model, dst, max_shard_bytes=max_shard_bytes)
    export_hf(model, dst, arch, expert_layout, max_shard_bytes)
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst
