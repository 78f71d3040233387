"""Routed experts read from a checkpoint's safetensors files one expert at a time, into memory the caller owns.

Legend: E experts, I input-projection width (2F for SwiGLU), D dim, F ffn width.

A moekit checkpoint stores each MoE layer's experts as stacked tensors (``layers.{i}.ffn.experts.w_in [E, I, D]``,
``w_out [E, D, F]``, optional biases): expert e is one contiguous run of bytes in the file. The store reads that run
with ``os.preadv`` straight into the destination tensor (a pool slot: no intermediate copy), and then tells the
kernel the pages are not needed (``posix_fadvise(..., POSIX_FADV_DONTNEED)``), so the page cache does not quietly
keep the whole model in RAM and the pool's size is the memory the experts take. The offsets come from the file's
safetensors header (8 bytes little-endian header length, then the JSON header: ``data_offsets`` per tensor,
relative to the end of the header; https://github.com/huggingface/safetensors#format).

Where the file system allows it the read bypasses the page cache altogether (``O_DIRECT``: the disk's DMA lands in
a block-aligned bounce buffer, then one copy into the slot): on the 2-core AVX2 host of benchmarks/RESULTS.md a
4.5 MiB expert read cold ran at ~0.9 GB/s this way against ~0.4 GB/s through the page cache (which reads ahead and
copies twice). File systems without ``O_DIRECT`` (tmpfs, some network mounts) use the buffered read above.

A file that is missing, shorter than its header says, or changed under the reader raises
:class:`~moekit.formats.checkpoint.CheckpointError` naming the file, the tensor and the expert.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.formats.checkpoint import INDEX_FILE, MODEL_FILE, CheckpointError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DROP_PAGE_CACHE = hasattr(os, "posix_fadvise")  # (Linux and most Unix: the budget holds; elsewhere it is a cap)
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of the device's logical block (<= 4 KiB)


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

    def __init__(self, directory: str | os.PathLike[str], names: list[str], direct: bool = True):
        self.directory = Path(directory)
        self.direct = direct  # O_DIRECT where the file system has it (see the module docstring)
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
        self._direct_fds: dict[Path, int | None] = {}  # None: the file system refused O_DIRECT
        self._local = threading.local()  # each thread's bounce buffer for O_DIRECT reads
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

    def _direct_fd(self, path: Path) -> int | None:
        with self._lock:
            if path not in self._direct_fds:
                fd = None
                if hasattr(os, "O_DIRECT"):
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    except FileNotFoundError:
                        raise CheckpointError(f"checkpoint file not found: {path}") from None
                    except OSError:  # (EINVAL: not supported here)
                        fd = None
                self._direct_fds[path] = fd
            return self._direct_fds[path]

    def _bounce(self, size: int) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = mmap.mmap(-1, size)  # (anonymous: page-aligned, as O_DIRECT needs)
        return memoryview(buf)[:size]

    def _read_direct(self, fd: int, t: StackedTensor, name: str, expert: int, offset: int, target: Tensor) -> bool:
        """The expert's bytes through the aligned bounce buffer; False where the device refuses the read."""
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + t.expert_bytes) // DIRECT_ALIGN) * DIRECT_ALIGN
        bounce = self._bounce(end - start)
        try:
            n = os.preadv(fd, [bounce], start)
        except OSError as e:
            if e.errno == errno.EINVAL:  # (a block size above DIRECT_ALIGN, or no O_DIRECT after all)
                with self._lock:
                    self._direct_fds[t.path] = None
                return False
            raise CheckpointError(f"{t.path}: cannot read tensor {name} expert {expert} ({e})") from e
        got = min(max(n - (offset - start), 0), t.expert_bytes)
        if got != t.expert_bytes:
            raise CheckpointError(f"{t.path}: truncated: tensor {name} expert {expert} needs bytes {offset}.."
                                  f"{offset + t.expert_bytes}, read {got}")
        # (numpy's copy, not torch's: on the prefetch thread a torch copy would start a second OpenMP team beside
        # the main thread's, whose idle threads then spin on the cores the forward needs)
        src = np.frombuffer(bounce, dtype=np.uint8, count=t.expert_bytes, offset=offset - start)
        np.copyto(target.view(-1).view(torch.uint8).numpy(), src)
        return True

    def read(self, name: str, expert: int, out: Tensor) -> None:
        """``out`` (contiguous, the expert's shape, any float dtype) = expert ``expert`` of tensor ``name``."""
        t = self.tensors[name]
        if tuple(out.shape) != t.expert_shape or not out.is_contiguous():
            raise ValueError(f"read {name}: a contiguous {list(t.expert_shape)} tensor is needed, got "
                             f"{list(out.shape)}")
        target = out if out.dtype == t.dtype else torch.empty(t.expert_shape, dtype=t.dtype)
        offset = t.offset + expert * t.expert_bytes
        direct = self._direct_fd(t.path) if self.direct else None
        if direct is None or not self._read_direct(direct, t, name, expert, offset, target):
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
            self.bytes_read += t.expert_bytes
            self.reads += 1

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._direct_fds.values()]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # (interpreter shutdown)
            pass
