"""Training data: corpora, a tokenized memory-mapped cache, and batch sampling.

Pipeline (``prepare_data`` is the one entry point the trainer calls; the corpora are in ``corpora.py``)::

    corpus spec --load_corpus--> Corpus (documents in a fixed order, each tagged train/val)
            --tokenizer (byte / trained BPE / loaded tokenizer.json)-->
            cache entry: train.bin, val.bin (uint16, or uint32 for vocab > 65536) + meta.json
            --> TokenDataset (np.memmap) --> get_batch / val_batches / BatchSampler

Cache
-----
Entries live under ``cache_dir`` (argument), else ``$MOEKIT_CACHE/tokens``, else
``$XDG_CACHE_HOME/moekit/tokens`` (``~/.cache/moekit/tokens``). An entry's name ends with a hash of
the corpus identity (resolved paths + sizes + mtimes, or Python version + stdlib file list; split
settings; ``max_bytes``; ``text_field``) and the tokenizer identity (kind + hash of its vocabulary),
so editing a file or changing a setting makes a new entry and nothing stale is ever read. Files are
written to temp names and moved in with ``os.replace``; ``meta.json`` goes last, so an entry with a
meta is complete. A BPE tokenizer trained by ``prepare_data(tokenizer="bpe")`` is cached likewise
(``bpe-*/tokenizer.json``, keyed by the corpus and the BPE settings).

Batches and resuming
--------------------
``TokenDataset.get_batch`` draws random windows with the ``torch.Generator`` it is given (a CPU
generator), so the caller owns the sampling state. ``BatchSampler`` wraps that for the trainer: it
owns a seeded generator and exposes ``state_dict()``/``load_state_dict()`` (the generator state and
the number of batches drawn), so a resumed run draws exactly the batches an uninterrupted run would.
``val_batches`` walks the validation tokens in order in non-overlapping windows (the final partial
window, fewer than ``seq_len`` tokens, is skipped).

The meta records UTF-8 bytes and tokens per split, so evaluation can report bits per byte:
``loss_nats_per_token / ln 2 / bytes_per_token(split)`` (``TokenDataset.bits_per_byte``).

Imports: ``moekit.formats.tokenizer`` and ``moekit.train.corpora``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from moekit.formats.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe
from moekit.train.corpora import DEFAULT_VAL_FRACTION, SPLITS, Corpus, check_split, load_corpus

DEFAULT_BPE_VOCAB_SIZE = 8192
DEFAULT_BPE_TRAIN_BYTES = 128 * 2**20  # BPE merges stop improving long before this; training stays quick
CACHE_FORMAT = 1  # bump when the tokenized layout or the split rules change: old entries are then ignored

_CHUNK_CHARS = 1 << 16  # long documents are handed to BPE in pieces of about this size
_BATCH_CHARS = 1 << 22  # text per encode_batch call: large enough to keep every core busy





# ====================================================================== tokenizing into the cache
def default_cache_dir() -> Path:
    """``$MOEKIT_CACHE/tokens``, else ``$XDG_CACHE_HOME/moekit/tokens``, else ``~/.cache/moekit/tokens``."""
    env = os.environ.get("MOEKIT_CACHE")
    if env:
        return Path(env).expanduser() / "tokens"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "moekit" / "tokens"


def _token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _entry_name(prefix: str, corpus_name: str, key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(corpus_name).name or "corpus")[:40]
    return f"{prefix}{slug}-{key[:20]}"


def _chunks(text: str) -> list[str]:
    """Cut a long document where GPT-2's pre-tokenizer always has a boundary: a newline between two
    non-space characters. Each chunk then encodes to exactly what the whole would, and ``encode_batch``
    can spread one huge file over all cores. (Another tokenizer's pre-tokenizer may differ there.)"""
    if len(text) <= 2 * _CHUNK_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > 2 * _CHUNK_CHARS:
        m = _SAFE_CUT.search(text, start + _CHUNK_CHARS)
        if m is None:
            break
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return out


_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


class _SplitWriter:
    """Appends token arrays of one split to a temp file, batching texts for ``encode_batch``."""

    def __init__(self, tok: Tokenizer, path: Path, dtype: np.dtype[Any]) -> None:
        self.tok, self.path, self.dtype = tok, path, dtype
        self.tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        self.file: BinaryIO = self.tmp.open("wb")
        self.tokens = self.bytes = self.documents = 0
        self._texts: list[str] = []
        self._eot_after: list[bool] = []  # whether a chunk ends its document
        self._chars = 0

    def add(self, text: str) -> None:
        self.documents += 1
        self.bytes += len(text.encode("utf-8"))
        if isinstance(self.tok, ByteTokenizer):
            # the byte tokenizer is the identity on UTF-8: skip the per-id Python list
            self._write(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
            return
        chunks = _chunks(text)
        self._texts.extend(chunks)
        self._eot_after.extend([False] * (len(chunks) - 1) + [True])
        self._chars += len(text)
        if self._chars >= _BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self._texts:
            return
        encoded = self.tok.encode_batch(self._texts)
        eot = self.tok.eot_id
        parts: list[Sequence[int]] = []
        for ids, last in zip(encoded, self._eot_after, strict=True):
            parts.append(ids)
            if last and eot is not None:
                parts.append((eot,))
        n = sum(len(p) for p in parts)
        self._write(np.fromiter(itertools.chain.from_iterable(parts), dtype=self.dtype, count=n))
        self._texts, self._eot_after, self._chars = [], [], 0

    def _write(self, arr: np.ndarray) -> None:
        self.file.write(arr.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(arr)

    def finish(self) -> None:
        self.flush()
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def _tokenize_corpus(corpus: Corpus, tok: Tokenizer, entry: Path, key: str, progress: bool) -> dict[str, Any]:
    """Tokenize every split of ``corpus`` into ``entry``; returns the meta (written last)."""
    entry.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(tok, entry / f"{s}.bin", dtype) for s in SPLITS}
    t0 = time.perf_counter()
    bar = tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {corpus.name}",
               disable=not progress or not sys.stderr.isatty())
    try:
        for split, raw in corpus.pieces():
            writers[split].add(raw.decode("utf-8", errors="replace"))
            bar.update(len(raw))
        for s, w in writers.items():
            w.flush()
            if w.tokens == 0:
                what = "training" if s == "train" else "validation"
                raise ValueError(f"corpus {corpus.name}: the {what} split is empty (no text / zero tokens)")
        for w in writers.values():
            w.finish()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.total = bar.n  # the total was an estimate (cuts at line ends): end the bar at 100%
        bar.close()
    seconds = time.perf_counter() - t0
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "corpus": corpus.name,
        "corpus_identity": corpus.identity,
        "tokenizer": {"kind": tok.kind, "identity": tok.identity(), "vocab_size": tok.vocab_size,
                      "eot_id": tok.eot_id},
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "splits": {s: {"tokens": w.tokens, "bytes": w.bytes, "documents": w.documents} for s, w in writers.items()},
        "tokenize_seconds": round(seconds, 3),
        "created_unix": time.time(),
    }
    tmp = entry / f".meta.json.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, entry / "meta.json")
    return meta


def _entry_is_complete(entry: Path, key: str) -> bool:
    """A meta with our key and bins of the recorded length (anything else is rebuilt)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        return meta.get("format") == CACHE_FORMAT and meta.get("key") == key and all(
            (entry / f"{s}.bin").stat().st_size == meta["splits"][s]["tokens"] * itemsize for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ====================================================================== dataset and batches
class TokenDataset:
    """The memory-mapped token arrays of one cache entry (``train.bin``, ``val.bin``, ``meta.json``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"token cache entry not found: {meta_path}")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self._data = {s: np.memmap(self.directory / f"{s}.bin", dtype=dtype, mode="r") for s in SPLITS}
        self.reused_cache = False  # set by prepare_data: True when no tokenizing happened

    @property
    def name(self) -> str:
        return str(self.meta["corpus"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokens(self, split: str) -> np.memmap:
        """The raw token array of a split (read-only memmap)."""
        check_split(split)
        return self._data[split]

    def num_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of text behind the split's tokens."""
        check_split(split)
        return int(self.meta["splits"][split]["bytes"])

    def bytes_per_token(self, split: str) -> float:
        return self.num_bytes(split) / self.num_tokens(split)

    def bits_per_byte(self, loss_nats_per_token: float, split: str = "val") -> float:
        """Convert a mean cross-entropy (nats per token) into bits per UTF-8 byte."""
        return loss_nats_per_token / math.log(2) / self.bytes_per_token(split)

    def _need(self, split: str, seq_len: int) -> np.memmap:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        data = self.tokens(split)
        if len(data) < seq_len + 1:
            raise ValueError(f"corpus {self.name}: the {split} split has {len(data)} tokens, too short for one "
                             f"sequence of seq_len={seq_len} (needs {seq_len + 1}); use a bigger corpus or a "
                             f"smaller seq_len")
        return data

    def get_batch(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows at uniform random offsets: ``x`` and ``y = x`` shifted by one (int64).

        Offsets come from ``torch.randint(..., generator=generator)`` (a CPU generator; ``None``: the
        global RNG), so the same generator state gives the same batch.
        """
        data = self._need(split, seq_len)
        ix = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator).numpy()
        window = data[ix[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        return _to_device(np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:]), device)

    def num_val_batches(self, batch_size: int, seq_len: int, split: str = "val") -> int:
        n_seq = (len(self._need(split, seq_len)) - 1) // seq_len
        return math.ceil(n_seq / batch_size)

    def val_batches(
        self,
        batch_size: int,
        seq_len: int,
        max_batches: int | None = None,
        split: str = "val",
        device: str | torch.device | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start of ``split``, in order.

        Row ``r`` of batch ``b`` starts at token ``(b * batch_size + r) * seq_len``; the last batch may
        have fewer rows; the trailing ``< seq_len`` tokens are not used.
        """
        data = self._need(split, seq_len)
        n_seq = (len(data) - 1) // seq_len
        if max_batches is not None:
            n_seq = min(n_seq, max_batches * batch_size)
        for first in range(0, n_seq, batch_size):
            rows = min(batch_size, n_seq - first)
            start = first * seq_len
            chunk = np.asarray(data[start:start + rows * seq_len + 1], dtype=np.int64)
            yield _to_device(chunk[:-1].reshape(rows, seq_len), chunk[1:].reshape(rows, seq_len), device)


def _to_device(x: np.ndarray, y: np.ndarray, device: str | torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if device is not None and torch.device(device).type == "cuda":
        # pinned host memory makes the copy asynchronous
        return xt.pin_memory().to(device, non_blocking=True), yt.pin_memory().to(device, non_blocking=True)
    if device is not None:
        return xt.to(device), yt.to(device)
    return xt, yt


class BatchSampler:
    """Endless random training batches with a resumable state.

    It owns a CPU ``torch.Generator`` seeded with ``seed``; ``state_dict()`` holds that generator's
    state and the number of batches drawn, and ``load_state_dict()`` restores both, so the batches
    after a resume are exactly those an uninterrupted run would have drawn.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        split: str = "train",
        device: str | torch.device | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.split, self.device = split, device
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        dataset._need(split, seq_len)  # fail now, not at the first step

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.dataset.get_batch(self.split, self.batch_size, self.seq_len, self.generator, self.device)
        self.batches_drawn += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
        self.batches_drawn = int(state["batches_drawn"])


# ====================================================================== the entry point
def prepare_data(
    corpus: str | os.PathLike[str] = "stdlib",
    tokenizer: str | os.PathLike[str] | Tokenizer = "byte",
    *,
    val_path: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    cache_dir: str | os.PathLike[str] | None = None,
    bpe_vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
    bpe_train_bytes: int = DEFAULT_BPE_TRAIN_BYTES,
    max_bytes: int | None = None,
    progress: bool = True,
) -> tuple[TokenDataset, Tokenizer]:
    """Load (or build once and cache) the tokenized train/val splits of ``corpus``.

    ``tokenizer``: ``"byte"``; ``"bpe"`` (a byte-level BPE of ``bpe_vocab_size`` trained on at most
    ``bpe_train_bytes`` of the training split, itself cached); a tokenizer directory or
    ``tokenizer.json`` path (e.g. a Hugging Face checkpoint); or a :class:`Tokenizer`.
    Returns the dataset and the tokenizer (save the latter with the model checkpoint).
    """
    c = load_corpus(corpus, val_path=val_path, text_field=text_field, val_fraction=val_fraction, max_bytes=max_bytes)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tok: Tokenizer
    if not isinstance(tokenizer, Tokenizer) and os.fspath(tokenizer) == "bpe":
        tok = _cached_bpe(c, root, bpe_vocab_size, bpe_train_bytes, progress)
    else:
        tok = load_tokenizer(tokenizer)
    key = _stable_hash({"format": CACHE_FORMAT, "corpus": c.identity, "tokenizer": tok.identity(),
                        "eot_id": tok.eot_id})
    entry = root / _entry_name("", c.name, key)
    reused = _entry_is_complete(entry, key)
    if not reused:
        _tokenize_corpus(c, tok, entry, key, progress)
    ds = TokenDataset(entry)
    ds.reused_cache = reused
    return ds, tok


def _cached_bpe(corpus: Corpus, root: Path, vocab_size: int, train_bytes: int, progress: bool) -> BPETokenizer:
    """Train a BPE on the corpus's training split, or load the one trained before with the same settings."""
    key = _stable_hash({"format": CACHE_FORMAT, "corpus": corpus.identity, "vocab_size": vocab_size,
                        "train_bytes": train_bytes})
    entry = root / _entry_name("bpe-", corpus.name, key)
    if (entry / "tokenizer_config.json").is_file() and (entry / "tokenizer.json").is_file():
        return BPETokenizer.from_directory(entry)

    def texts() -> Iterator[str]:
        left = train_bytes
        for text in corpus.texts("train"):
            for chunk in _chunks(text):
                if left <= 0:
                    return
                left -= len(chunk)
                yield chunk

    tok = train_bpe(texts(), vocab_size, show_progress=progress and sys.stderr.isatty())
    tok.save(entry)  # tokenizer.json first, the config (our completeness marker) last
    return tok
