"""Safetensors checkpoint directories: lazy memory-mapped reading, atomic (sharded) writing, moekit's format.

moekit's own checkpoint format is a directory holding

    config.json          ModelConfig.to_json()
    model.safetensors    model.state_dict(); a tensor shared by several modules (tied embeddings, a shared
                         router) is stored once, under its first name. The metadata key "hf_token_ids" keeps
                         the bos/eos/pad ids of a Hugging Face source for a later export.
    tokenizer files      when the model carries a tokenizer (``model.tokenizer``), see moekit/formats/tokenizer.py

Large checkpoints may be sharded the Hugging Face way: ``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {name: file}}``).

Reading never unpickles anything: tensors come from ``safetensors.safe_open`` (the file is memory-mapped
and each tensor is read when asked for); a ``pytorch_model.bin`` is refused with a message saying so.
Every file is written to a temporary name in the same directory and moved into place with ``os.replace``,
so a reader never sees a half-written file; the index is written last. A whole output directory (a saved or
converted model) is written into a temporary directory first (``output_directory``): a failed write leaves
nothing behind.

Errors name the file (``CheckpointError``) and, for tensors, the tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.config import ModelConfig

log = logging.getLogger("moekit")

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, incomplete, corrupt or does not match its config; the message names it."""


# ---------------------------------------------------------------------------------------------- reading
class SafetensorsReader(Mapping[str, Tensor]):
    """The tensors of a checkpoint directory (single file or sharded with an index), read lazily.

    ``reader[name]`` loads one tensor; ``shape(name)``/``dtype(name)`` read only the header.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        from safetensors import safe_open  # noqa: F401  (fail early if safetensors is missing)

        self.directory = Path(directory)
        self._handles: dict[str, Any] = {}
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.directory}")
        single, index = self.directory / MODEL_FILE, self.directory / INDEX_FILE
        if single.is_file():
            self._files = {single.name: single}
            self._map = {k: single.name for k in self._open(single).keys()}
        elif index.is_file():
            data = _read_json(index)
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no 'weight_map' object")
            self._files = {}
            for fname in sorted(set(weight_map.values())):
                f = self.directory / fname
                if not f.is_file():
                    raise CheckpointError(f"{index} names the shard {fname}, which is missing: {f}")
                self._files[fname] = f
            self._map = dict(weight_map)
            for fname, f in self._files.items():  # the index must agree with the shards' headers
                in_file = set(self._open(f).keys())
                listed = {k for k, v in self._map.items() if v == fname}
                if listed - in_file:
                    missing = sorted(listed - in_file)
                    raise CheckpointError(f"{f}: tensor {missing[0]} is listed in {INDEX_FILE} but not stored "
                                          f"in the shard ({len(missing)} missing)")
        else:
            pickled = [n for n in _PICKLE_FILES if (self.directory / n).exists()]
            if pickled:
                raise CheckpointError(f"{self.directory}: only safetensors checkpoints are loaded, found {pickled[0]} "
                                      "(a pickle file; convert it to safetensors with a trusted tool first)")
            raise CheckpointError(f"{self.directory}: no {MODEL_FILE} and no {INDEX_FILE}")

    def _open(self, path: Path) -> Any:
        from safetensors import SafetensorError, safe_open

        key = path.name
        if key not in self._handles:
            try:
                self._handles[key] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"corrupt checkpoint file: {path} ({e})") from e
        return self._handles[key]

    def file_of(self, name: str) -> Path:
        return self._files[self._map[name]]

    def metadata(self) -> dict[str, str]:
        """The string metadata of the (first) safetensors file."""
        first = next(iter(self._files.values()))
        return self._open(first).metadata() or {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._map:
            raise KeyError(name)
        from safetensors import SafetensorError

        path = self.file_of(name)
        try:
            return self._open(path).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"corrupt checkpoint file: {path}: cannot read tensor {name} ({e})") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of(name)).get_slice(name).get_shape())

    def __contains__(self, name: object) -> bool:
        return name in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


def read_config_json(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory as a dict (errors name the file)."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    return _read_json(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint file: {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"corrupt checkpoint file: {path} does not hold a JSON object")
    return data


# ---------------------------------------------------------------------------------------------- writing
def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(tensors: dict[str, Tensor], directory: str | os.PathLike[str],
                      max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors``, or as shards plus an index when they exceed ``max_shard_bytes``.

    Files of the other layout left over from an earlier write in the same directory are removed, so
    the directory never holds both a single file and an index.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    total = sum(sizes.values())
    shards: list[dict[str, Tensor]] = []
    if max_shard_bytes is None or total <= max_shard_bytes:
        shards = [tensors]
    else:
        current: dict[str, Tensor] = {}
        used = 0
        for k, v in tensors.items():
            if current and used + sizes[k] > max_shard_bytes:
                shards.append(current)
                current, used = {}, 0
            current[k] = v
            used += sizes[k]
        shards.append(current)
    stale = [p for p in directory.iterdir() if p.name in (MODEL_FILE, INDEX_FILE) or _SHARD_RE.match(p.name)]
    written: list[Path] = []
    if len(shards) == 1:
        path = directory / MODEL_FILE
        _atomic_save_file(shards[0], path, metadata)
        written.append(path)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            path = directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            _atomic_save_file(shard, path, metadata)
            written.append(path)
            weight_map.update({k: path.name for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        written.append(directory / INDEX_FILE)
    for p in stale:
        if p not in written:
            p.unlink(missing_ok=True)
    return written


@contextlib.contextmanager
def output_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A whole output directory or nothing: the block writes into a fresh temporary directory beside ``path``.
    When it ends without an error, a new ``path`` is that directory renamed (one atomic step); into an existing
    ``path`` each file is moved in whole (``os.replace``), and the model files of an earlier write that the new
    one does not have (the other shard layout) are removed. On an error the temporary directory is removed and
    ``path`` is as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        written = {f.name for f in tmp.iterdir()}
        for f in tmp.iterdir():
            target = path / f.name
            if target.is_dir() and not f.is_dir():
                shutil.rmtree(target)
            os.replace(f, target)
        for f in path.iterdir():
            if f.name not in written and (f.name in (MODEL_FILE, INDEX_FILE) or _SHARD_RE.match(f.name)):
                f.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- moekit format
def _alias_names(model: Any) -> dict[str, str]:
    """{state_dict name: canonical name} for entries that share a tensor with an earlier entry.

    ``model`` is an ``nn.Module`` (tensors compared by identity, so this works on the meta device too) or
    any object with ``state_dict()`` (tensors compared by their memory).
    """
    if isinstance(model, torch.nn.Module):
        items = [(name, id(t)) for name, t in model.state_dict(keep_vars=True).items()]
    else:
        items = [(name, (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                         tuple(t.stride()))) for name, t in model.state_dict().items()]
    first: dict[Any, str] = {}
    aliases: dict[str, str] = {}
    for name, key in items:
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def save_pretrained(model: Any, path: str | os.PathLike[str], max_shard_bytes: int | None = None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a ``moekit.model.transformer.Transformer``, or any object with ``config`` and ``state_dict()``)
    in moekit's checkpoint format into directory ``path``.

    Tensors shared by several modules are stored once; the tokenizer attached as ``model.tokenizer``
    (``moekit.from_pretrained`` attaches the checkpoint's) is saved alongside; ``extra_files`` ({name: text}, e.g.
    a pruned model's ``pruning.json``) are written into the same directory, in the same atomic step. Returns the
    directory.
    """
    path = Path(path)
    aliases = _alias_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    metadata = {"library": "moekit"}
    token_ids = getattr(model, "hf_token_ids", None)
    if token_ids:  # bos/eos/pad ids of a Hugging Face source, for a later export
        metadata["hf_token_ids"] = json.dumps(token_ids)
    with output_directory(path) as out:  # all the files or none
        write_safetensors(state, out, max_shard_bytes, metadata=metadata)
        atomic_write_text(out / CONFIG_FILE, model.config.to_json())
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(out)
        for name, text in (extra_files or {}).items():
            atomic_write_text(out / name, text)
    return path


def is_moekit_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """A moekit config.json (no Hugging Face ``model_type`` key)."""
    cfg = read_config_json(directory)
    return "model_type" not in cfg


def build_empty(cfg: ModelConfig) -> torch.nn.Module:
    """A Transformer whose parameters are not allocated (meta device); fill it with :func:`load_into`."""
    from moekit.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


def load_into(model: torch.nn.Module, state: dict[str, Tensor], where: str) -> torch.nn.Module:
    """Assign ``state`` (every parameter and persistent buffer, shapes checked) to a model from
    :func:`build_empty`, then rebuild the non-persistent RoPE tables. ``where`` names the source in errors."""
    from moekit.model.transformer import rope_tables

    expected = model.state_dict()
    aliases = _alias_names(model)
    for alias, canonical in aliases.items():
        if alias not in state and canonical in state:
            state[alias] = state[canonical]
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for k in expected:  # model order: the first mismatch reported is the earliest tensor
        v = state[k]
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {list(v.shape)}, the config expects "
                                  f"{list(expected[k].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    cfg = model.config
    cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos, sin
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: tensor {left[0]} was not loaded")
    return model


def load_pretrained_moekit(path: str | os.PathLike[str], dtype: torch.dtype | None = None,
                           device: str | torch.device | None = None) -> torch.nn.Module:
    """Load a moekit-format checkpoint directory (see the module docstring) in its stored dtypes, or cast to
    ``dtype``; ``moekit.from_pretrained`` picks the dtype for the host."""
    path = Path(path)
    raw = read_config_json(path)
    try:
        cfg = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: not a valid moekit config ({e})") from e
    reader = SafetensorsReader(path)
    state = {k: reader[k] for k in reader}
    model = load_into(build_empty(cfg), state, str(path))
    token_ids = reader.metadata().get("hf_token_ids")
    if token_ids:
        model.hf_token_ids = json.loads(token_ids)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model
