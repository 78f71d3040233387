"""The compressed checkpoint directory: packed codes, scales and zeros in safetensors, the widths in config.json.

Legend: E experts, I input-projection width, D dim, F ffn width, B packed bytes per row, G groups per row.

    config.json        the model's ModelConfig plus a "quantization" section:
                       {"format": 1, "method": "gptq", "group_size": 128 | null, "symmetric": false,
                        "modules": {"layers.0.ffn.experts": {"kind": "experts", "bits": [4, 3, 8, 2]},
                                    "layers.0.ffn.shared":  {"kind": "mlp", "bits": 4},
                                    "layers.0.attn.wq":     {"kind": "linear", "bits": 8}},
                        "report": {...}}   (what compress measured; not read back)
    model.safetensors  the quantized model's state_dict: per expert width b of a layer
                       ``<layer>.experts.w_in.b<b>.packed`` uint8 [E_b, I, B], ``.scales`` fp16 [E_b, I, G],
                       ``.zeros`` fp16 (asymmetric only), likewise ``w_out``, in expert order within each width;
                       ``<mlp>.w_in.packed`` ...; ``<linear>.weight.packed`` ...; every other tensor (router, norms,
                       embeddings, biases, unquantized layers) as it is, in its stored dtype
    tokenizer files    when the model carries a tokenizer

Writing goes through ``moekit.formats.checkpoint.output_directory`` (all files or none). Reading builds the model
skeleton on the meta device from the config, puts quantized skeletons of the listed modules in place (their
buffer shapes follow from the widths), and fills it from the memory-mapped safetensors file
(``SafetensorsReader``, ``safe_open``): a missing, unexpected or mis-shaped tensor, a wrong dtype or a width
outside 2/3/4/8 raises ``CompressedCheckpointError`` (a ``CheckpointError`` and a ``ValueError``) naming the
tensor or module.

Imports: ``moekit.compress`` (quantize, modules), ``moekit.config``, ``moekit.formats``, ``moekit.layer``,
``moekit.model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.compress.modules import (PackedWeight, QuantizedExperts, QuantizedLinear, QuantizedMLP,
                                     quantized_modules, set_module)
from moekit.compress.quantize import GROUP_SIZES, QuantSpec, check_width
from moekit.config import ModelConfig
from moekit.formats.checkpoint import (CONFIG_FILE, CheckpointError, SafetensorsReader, _alias_names, atomic_write_text,
                                       build_empty, load_into, output_directory, read_config_json, write_safetensors)
from moekit.formats.paths import resolve_checkpoint
from moekit.layer.experts import MLP, Experts
from moekit.layer.ffn import ffn_in_width

QUANT_FORMAT = 1
KINDS = {"experts": QuantizedExperts, "mlp": QuantizedMLP, "linear": QuantizedLinear}


class CompressedCheckpointError(CheckpointError, ValueError):
    """A compressed checkpoint is missing a tensor, holds one of the wrong shape or dtype, or lists a bad width."""


def quantization_section(model: nn.Module, method: str, spec: QuantSpec, report: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """The config.json "quantization" section describing ``model``'s quantized modules."""
    modules: dict[str, Any] = {}
    for path, m in quantized_modules(model).items():
        if isinstance(m, QuantizedExperts):
            modules[path] = {"kind": "experts", "bits": list(m.widths)}
        elif isinstance(m, QuantizedMLP):
            modules[path] = {"kind": "mlp", "bits": m.w_in.bits}
        else:
            modules[path] = {"kind": "linear", "bits": m.weight.bits}
    section = {"format": QUANT_FORMAT, "method": method, "group_size": spec.group_size,
               "symmetric": spec.symmetric, "modules": modules}
    if report is not None:
        section["report"] = report
    return section


def save_compressed(model: nn.Module, path: str | os.PathLike[str], section: dict[str, Any]) -> Path:
    """Write a model with quantized modules as a compressed checkpoint directory (atomically: all files or none)."""
    path = Path(path)
    aliases = _alias_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    cfg = {**model.config.to_dict(), "quantization": section}
    with output_directory(path) as out:
        write_safetensors(state, out, metadata={"library": "moekit", "quantization": str(QUANT_FORMAT)})
        atomic_write_text(out / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(out)
    return path


def is_compressed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Does the checkpoint's config.json carry a "quantization" section?"""
    return "quantization" in read_config_json(resolve_checkpoint(path))


def _section(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    q = raw.pop("quantization", None)
    if not isinstance(q, dict):
        raise CompressedCheckpointError(f"{where}: no 'quantization' section (not a compressed checkpoint)")
    if q.get("format") != QUANT_FORMAT:
        raise CompressedCheckpointError(f"{where}: quantization.format {q.get('format')!r} is not {QUANT_FORMAT}")
    if q.get("group_size") not in GROUP_SIZES or not isinstance(q.get("symmetric"), bool):
        raise CompressedCheckpointError(f"{where}: quantization.group_size {q.get('group_size')!r} / symmetric "
                                        f"{q.get('symmetric')!r}: expected one of 32, 64, 128, null and a bool")
    if not isinstance(q.get("modules"), dict):
        raise CompressedCheckpointError(f"{where}: quantization.modules must be an object")
    return q


def _skeleton(model: nn.Module, path: str, entry: Any, spec: QuantSpec, where: Path) -> nn.Module:
    """A quantized module for ``path`` with unfilled (meta) buffers of the shapes its widths imply."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in KINDS:
        raise CompressedCheckpointError(f"{where}: quantization.modules[{path!r}].kind {kind!r} is not one of "
                                        f"{', '.join(KINDS)}")
    try:
        like = model.get_submodule(path)
    except AttributeError as e:
        raise CompressedCheckpointError(f"{where}: quantization.modules names {path!r}, which the model does not "
                                        "have") from e
    bits = entry.get("bits")
    widths = bits if kind == "experts" else [bits]
    try:
        if not isinstance(widths, list) or not widths:
            raise ValueError(f"expected {'a list of widths' if kind == 'experts' else 'a width'}, got {bits!r}")
        for b in widths:
            check_width(b)
    except ValueError as e:
        raise CompressedCheckpointError(f"{where}: quantization.modules[{path!r}].bits: {e}") from e

    def empty(shape: tuple[int, ...], b: int):
        return PackedWeight.empty(shape, b, spec.group_for(shape[-1]), spec.symmetric).qt

    expected = {"experts": Experts, "mlp": MLP, "linear": nn.Linear}[kind]
    if not isinstance(like, expected):
        raise CompressedCheckpointError(f"{where}: quantization.modules[{path!r}] is {kind!r}, but the model has a "
                                        f"{type(like).__name__} there")
    if kind == "linear":
        return QuantizedLinear(empty(tuple(like.weight.shape), widths[0]), like.bias)
    if kind == "mlp":
        return QuantizedMLP(like, empty(tuple(like.w_in.shape), widths[0]), empty(tuple(like.w_out.shape), widths[0]))
    if len(widths) != like.n_experts:
        raise CompressedCheckpointError(f"{where}: quantization.modules[{path!r}].bits lists {len(widths)} widths "
                                        f"for {like.n_experts} experts")
    I, D, F = ffn_in_width(like.ffn_dim, like.activation), like.dim, like.ffn_dim
    stacks = {b: (empty((widths.count(b), I, D), b), empty((widths.count(b), D, F), b)) for b in set(widths)}
    return QuantizedExperts(like, widths, stacks)


def load_compressed(path: str | os.PathLike[str], device: str | torch.device | None = None,
                    tokenizer: bool = True) -> nn.Module:
    """A compressed checkpoint (any path ``resolve_checkpoint`` takes) as a ``Transformer`` with quantized
    modules, the float tensors in their stored dtype."""
    directory = resolve_checkpoint(path)
    where = directory / CONFIG_FILE
    raw = read_config_json(directory)
    q = _section(raw, where)
    try:
        cfg = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CompressedCheckpointError(f"{where}: not a valid moekit config ({e})") from e
    spec = QuantSpec(4, q["group_size"], q["symmetric"])
    model = build_empty(cfg)
    for mod_path, entry in q["modules"].items():
        set_module(model, mod_path, _skeleton(model, mod_path, entry, spec, where))
    reader = SafetensorsReader(directory)
    try:
        load_into(model, {k: reader[k] for k in reader}, str(directory))
    except CheckpointError as e:
        raise CompressedCheckpointError(str(e)) from e
    for name, m in model.named_modules():  # dtypes and the packed layout of every quantized tensor
        if isinstance(m, PackedWeight):
            try:
                m.qt
            except ValueError as e:
                part, _, msg = str(e).partition(": ")
                raise CompressedCheckpointError(f"{directory}: tensor {name}.{part}: {msg}") from e
    if device is not None:
        model.to(device)
    if tokenizer:
        from moekit.formats.load import attach_tokenizer

        attach_tokenizer(model, directory)
    return model
