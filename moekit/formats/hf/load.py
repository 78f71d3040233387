"""Loading a Hugging Face checkpoint directory into a ``moekit.model.Transformer`` (``load_hf``).

Shape legend: none (orchestration only; tensor layouts are in ``weights.py``).

The config is mapped by ``config_map.py``, the tensors by ``weights.py``. Weights are read memory-mapped from
safetensors (single file or sharded with ``model.safetensors.index.json``), never unpickled. The model is built
on the meta device and the loaded tensors are assigned to it, so nothing is randomly initialised: a tensor that
is missing, has the wrong shape or is left over raises ``CheckpointError`` naming it. ``moekit.from_pretrained``
(``moekit/formats/load.py``) picks this loader for a config.json with a ``model_type`` key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.formats.checkpoint import SafetensorsReader, build_empty, load_into
from moekit.formats.hf.config_map import hf_arch_of, hf_to_config
from moekit.formats.hf.weights import load_hf_state

# config.json keys carried over to an export of the same model (generation needs them)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def load_hf(path: Path, raw: dict[str, Any]) -> torch.nn.Module:
    """The model of the Hugging Face checkpoint directory ``path`` (``raw``: its config.json), in the stored
    dtypes; ``model.hf_token_ids`` keeps the bos/eos/pad ids for a later export."""
    arch = hf_arch_of(raw)
    cfg = hf_to_config(raw)
    reader = SafetensorsReader(path)
    model = build_empty(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = load_hf_state(cfg, arch, reader, expected)
    load_into(model, state, f"{arch} checkpoint {path}")
    model.hf_token_ids = {k: raw[k] for k in TOKEN_ID_KEYS if raw.get(k) is not None}
    return model
