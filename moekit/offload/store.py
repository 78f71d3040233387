"""Routed experts read from a checkpoint's safetensors files one expert at a time, into memory the caller owns.

Legend: E experts, I input-projection width (2F for SwiGLU), D dim, F ffn width.

A moekit checkpoint stores each MoE layer's experts as stacked tensors (``layers.{i}.ffn.experts.w_in [E, I, D]``,
``w_out [E, D, F]``, optional biases): expert e is one contiguous run of bytes in the file. The store reads that run
with ``os.preadv`` straight into the destination tensor (a pool slot: no intermediate copy), and then tells the
kernel the pages are not needed (``posix_fadvise(..., POSIX_FADV_DONTNEED)``), so the page cache does not quietly
keep the whole model in RAM and the pool's size is the memory the experts take. The offsets come from the file's
safetensors header (8 bytes little-endian header length, then the JSON header: ``data_offsets`` per tensor,
relative to the end of the header; https://github.com/huggingface/safetensors#format).

A file that is missing, shorter than its header says, or changed under the reader raises
:class:`~moekit.formats.checkpoint.CheckpointError` naming the file, the tensor and the expert.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.formats.checkpoint import INDEX_FILE, MODEL_FILE, CheckpointError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DROP_PAGE_CACHE = hasattr(os, "posix_fadvise")  # (Linux and most Unix: the budget holds; elsewhere it is a cap)


@dataclass(frozen=True)
class StackedTensor:
    """Where one stacked ``[E, ...]`` tensor lies: its file, the byte offset of expert 0, the bytes per expert."""

    name: str
    path: Path
    offset: int
    expert_bytes: int
    n_experts: int
    expert_shape: tuple[int, ...]
    dtype: torch.dtype


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    if len(raw) < n:
        raise CheckpointError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes)")
    try:
        return json.loads(raw), 8 + n
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e


def tensor_files(directory: Path) -> dict[str, Path]:
    """tensor name -> the file holding it, for a single-file or sharded (indexed) checkpoint."""
    single, index = directory / MODEL_FILE, directory / INDEX_FILE
    if single.is_file():
        header, _ = read_header(single)
        return {k: single for k in header if k != "__metadata__"}
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return {k: directory / v for k, v in weight_map.items()}
    raise CheckpointError(f"{directory}: no {MODEL_FILE} and no {INDEX_FILE}")


class ExpertStore:
    """Reads expert e of a stacked tensor into a given tensor. Thread-safe (``os.preadv`` takes an offset: the
    prefetch thread and the forward may read at once)."""

    def __init__(self, directory: str | os.PathLike[str], names: list[str]):
        self.directory = Path(directory)
        files = tensor_files(self.directory)
        headers: dict[Path, tuple[dict, int]] = {}
        self.tensors: dict[str, StackedTensor] = {}
        for name in names:
            if name not in files:
                raise CheckpointError(f"{self.directory}: tensor {name} is not in the checkpoint")
            path = files[name]
            if path not in headers:
                headers[path] = read_header(path)
            header, start = headers[path]
            meta = header.get(name)
            if meta is None:
                raise CheckpointError(f"{path}: tensor {name} is listed in {INDEX_FILE} but not stored in the file")
            dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has dtype {meta['dtype']}: offloading reads "
                                      f"{sorted(SAFETENSORS_DTYPES)} expert weights")
            shape = tuple(meta["shape"])
            begin, end = meta["data_offsets"]
            if not shape or (end - begin) % shape[0]:
                raise CheckpointError(f"{path}: tensor {name} of shape {list(shape)} is not a stack of experts")
            t = StackedTensor(name, path, start + begin, (end - begin) // shape[0], shape[0], shape[1:], dtype)
            size = os.path.getsize(path)
            if start + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {start + end}, the file has "
                                      f"{size} bytes")
            self.tensors[name] = t
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise CheckpointError(f"checkpoint file not found: {path}") from None
            return fd

    def read(self, name: str, expert: int, out: Tensor) -> None:
        """``out`` (contiguous, the expert's shape, any float dtype) = expert ``expert`` of tensor ``name``."""
        t = self.tensors[name]
        if tuple(out.shape) != t.expert_shape or not out.is_contiguous():
            raise ValueError(f"read {name}: a contiguous {list(t.expert_shape)} tensor is needed, got "
                             f"{list(out.shape)}")
        target = out if out.dtype == t.dtype else torch.empty(t.expert_shape, dtype=t.dtype)
        offset = t.offset + expert * t.expert_bytes
        fd = self._fd(t.path)
        buf = memoryview(target.view(-1).view(torch.uint8).numpy())
        try:
            n = os.preadv(fd, [buf], offset)
        except OSError as e:
            raise CheckpointError(f"{t.path}: cannot read tensor {name} expert {expert} ({e})") from e
        if n != t.expert_bytes:
            raise CheckpointError(f"{t.path}: truncated: tensor {name} expert {expert} needs bytes {offset}.."
                                  f"{offset + t.expert_bytes}, read {n}")
        if DROP_PAGE_CACHE:  # (the pages just read: the pool holds the expert now, the cache need not)
            os.posix_fadvise(fd, offset, t.expert_bytes, os.POSIX_FADV_DONTNEED)
        if target is not out:
            out.copy_(target)
        with self._lock:
            self.bytes_read += n
            self.reads += 1

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # (interpreter shutdown)
            pass
