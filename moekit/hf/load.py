"""``from_pretrained``: a moekit or Hugging Face checkpoint directory -> ``moekit.model.Transformer``.

Shape legend: none (orchestration only; tensor layouts are in ``weights.py``).

The directory's ``config.json`` decides the format: a ``model_type`` key means Hugging Face (mapped by
``config_map.py``, tensors by ``weights.py``), otherwise it is moekit's own format
(``moekit.checkpoint_io``). Weights are read memory-mapped from safetensors (single file or sharded with
``model.safetensors.index.json``), never unpickled. The model is built on the meta device and the loaded
tensors are assigned to it, so nothing is randomly initialised: a tensor that is missing, has the wrong
shape or is left over raises ``CheckpointError`` naming it. A ``tokenizer.json`` (or a moekit tokenizer)
in the directory is loaded with Hugging Face ``tokenizers`` and attached as ``model.tokenizer``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moekit.checkpoint_io import (
    CheckpointError,
    SafetensorsReader,
    build_empty,
    load_into,
    load_pretrained_moekit,
    read_config_json,
)
from moekit.config import ModelConfig
from moekit.hf.config_map import hf_arch_of, hf_to_config
from moekit.hf.weights import load_hf_state
from moekit.host import weights_dtype

# config.json keys carried over to an export of the same model (generation needs them)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def config_from_hf_dir(path: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (Hugging Face or moekit) without loading any weights."""
    raw = read_config_json(path)
    if "model_type" in raw:
        return hf_to_config(raw)
    try:
        return ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: not a valid moekit config ({e})") from e


def from_pretrained(path: str | os.PathLike[str], dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None, tokenizer: bool = True) -> torch.nn.Module:
    """Load the checkpoint directory ``path`` (moekit format, or Hugging Face mixtral, qwen2_moe, qwen3_moe,
    olmoe, deepseek_v2, deepseek_v3, gpt_oss, llama, qwen2, mistral) as a ``moekit.model.Transformer``.

    ``dtype``: the dtype the floating-point weights are cast to (the DeepSeek-V3 selection bias stays fp32).
    ``None`` or ``"auto"`` (the default) picks it for the host as every verb does (``moekit.host.weights_dtype``):
    the stored dtype (that of the embedding), except that a 16-bit checkpoint computes in fp32 on a CPU without
    native bf16 (AVX2); ``"bf16"``, ``"fp32"`` or a ``torch.dtype`` cast to it; ``"stored"`` keeps the stored
    dtype everywhere (conversion). ``device`` moves the model. ``model(input_ids).logits`` are the logits of
    the source model.
    """
    path = Path(path)
    raw = read_config_json(path)
    if "model_type" not in raw:
        model = load_pretrained_moekit(path)
    else:
        arch = hf_arch_of(raw)
        cfg = hf_to_config(raw)
        reader = SafetensorsReader(path)
        model = build_empty(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = load_hf_state(cfg, arch, reader, expected)
        load_into(model, state, f"{arch} checkpoint {path}")
        model.hf_token_ids = {k: raw[k] for k in TOKEN_ID_KEYS if raw.get(k) is not None}
    stored = model.tok_emb.weight.dtype
    target = stored if dtype == "stored" else weights_dtype(dtype, stored, device or "cpu")
    model.to(target)
    if device is not None:
        model.to(device)
    if tokenizer:
        attach_tokenizer(model, path)
    return model


def attach_tokenizer(model: torch.nn.Module, path: Path) -> None:
    """Set ``model.tokenizer`` from the directory's tokenizer files, when there are any."""
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from moekit.tokenizer import load_tokenizer

        try:
            model.tokenizer = load_tokenizer(path)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{path}: the tokenizer files cannot be loaded ({e})") from e
