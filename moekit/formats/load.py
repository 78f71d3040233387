"""``from_pretrained``: any checkpoint path -> ``moekit.model.Transformer``; ``config_of``: its config alone.

The path goes through the one resolver (``paths.resolve_checkpoint``: a run directory, a step directory, a
moekit or Hugging Face checkpoint directory). The directory's ``config.json`` decides the format: a
``model_type`` key means Hugging Face (``hf/load.py``), otherwise moekit's own format (``checkpoint.py``). A
``tokenizer.json`` (or a moekit tokenizer) in the directory is loaded with Hugging Face ``tokenizers`` and
attached as ``model.tokenizer``. Imports: ``moekit.formats``' own modules, ``moekit.config`` and ``moekit.host``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.formats.checkpoint import CheckpointError, load_pretrained_moekit, read_config_json
from moekit.formats.hf.config_map import hf_to_config
from moekit.formats.hf.load import load_hf
from moekit.formats.paths import resolve_checkpoint
from moekit.host import weights_dtype


# checkpoint kinds a later stage defines, tried before the two formats here: (claims(directory) -> bool,
# load(directory, device, tokenizer) -> model). ``moekit.compress`` registers its compressed checkpoints (imported
# by ``moekit/__init__.py``, so every entry point has them); formats itself imports no later stage.
LOADERS: list[tuple[Callable[[Path], bool], Callable[..., torch.nn.Module]]] = []


def register_loader(claims: Callable[[Path], bool], load: Callable[..., torch.nn.Module]) -> None:
    """Let ``from_pretrained`` read another kind of checkpoint directory (see ``LOADERS``)."""
    if (claims, load) not in LOADERS:
        LOADERS.append((claims, load))


def config_of(path: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of a checkpoint (Hugging Face or moekit, any path ``resolve_checkpoint`` takes) without
    loading any weights."""
    directory = resolve_checkpoint(path)
    raw = read_config_json(directory)
    if "model_type" in raw:
        return hf_to_config(raw)
    raw = {k: v for k, v in raw.items() if k != "quantization"}  # (a compressed checkpoint's section)
    try:
        return ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: not a valid moekit config ({e})") from e


def from_pretrained(path: str | os.PathLike[str], dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None, tokenizer: bool = True) -> torch.nn.Module:
    """Load a checkpoint (moekit format, or Hugging Face mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
    deepseek_v3, gpt_oss, llama, qwen2, mistral) as a ``moekit.model.Transformer``. ``path``: a checkpoint
    directory, or a run directory / step directory / ``checkpoints/latest`` of ``moekit train``.

    ``dtype``: the dtype the floating-point weights are cast to (the DeepSeek-V3 selection bias stays fp32).
    ``None`` or ``"auto"`` (the default) picks it for the host as every verb does (``moekit.host.weights_dtype``):
    the stored dtype (that of the embedding), except that a 16-bit checkpoint computes in fp32 on a CPU without
    native bf16 (AVX2); ``"bf16"``, ``"fp32"`` or a ``torch.dtype`` cast to it; ``"stored"`` keeps the stored
    dtype everywhere (conversion). ``device`` moves the model. ``model(input_ids).logits`` are the logits of
    the source model.
    """
    directory = resolve_checkpoint(path)
    for claims, load in LOADERS:  # (a compressed checkpoint: its float tensors stay in their stored dtype)
        if claims(directory):
            return load(directory, device=device, tokenizer=tokenizer)
    raw = read_config_json(directory)
    model = load_hf(directory, raw) if "model_type" in raw else load_pretrained_moekit(directory)
    stored = model.tok_emb.weight.dtype
    target = stored if dtype == "stored" else weights_dtype(dtype, stored, device or "cpu")
    model.to(target)
    if device is not None:
        model.to(device)
    if tokenizer:
        attach_tokenizer(model, directory)
    return model


def attach_tokenizer(model: torch.nn.Module, path: Path) -> None:
    """Set ``model.tokenizer`` from the directory's tokenizer files, when there are any."""
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from moekit.formats.tokenizer import load_tokenizer

        try:
            model.tokenizer = load_tokenizer(path)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"{path}: the tokenizer files cannot be loaded ({e})") from e
