"""Training data: corpora, a tokenized memory-mapped cache, and batch sampling.

Pipeline (``prepare_data`` is the one entry point the trainer calls)::

    corpus spec --load_corpus--> Corpus (documents in a fixed order, each tagged train/val)
            --tokenizer (byte / trained BPE / loaded tokenizer.json)-->
            cache entry: train.bin, val.bin (uint16, or uint32 for vocab > 65536) + meta.json
            --> TokenDataset (np.memmap) --> get_batch / val_batches / BatchSampler

Corpora
-------
``"stdlib"`` (the default)
    The ``.py`` files of this interpreter's standard library (``sysconfig.get_paths()["stdlib"]``),
    sorted by relative path. ``site-packages``/``dist-packages`` are always excluded, and so are test
    packages (any path component ``test``, ``tests`` or ``idle_test``) unless ``include_tests=True``:
    they are more than half of the bytes and full of deliberately odd data (encoding torture tests,
    generated tables), and without them CPython 3.11's stdlib is ~12 MB, under the default 16 MiB cap.
    Validation files are picked by a hash of their relative path (``sha256 < val_fraction``), so the
    split is by whole file (train and val never share a file) and identical on every run and machine.
    ``val_fraction`` is a share of the files: with 0.05, CPython 3.11 gets 41 of 731 files, ~10% of bytes.
    When the files exceed ``max_bytes``, both splits are shrunk by the same factor: files are taken
    in sorted order until a split's share is spent, the last one cut at a line end.
A text file, a directory, a ``.jsonl`` or a ``.parquet`` file
    A directory is walked recursively (hidden entries skipped) in sorted relative-path order and
    takes ``*.txt *.md *.markdown *.rst *.text *.py`` as one document per file, plus ``*.jsonl`` and
    ``*.parquet`` files read record by record. ``.jsonl``/``.parquet`` documents are the string in
    ``text_field`` (default ``"text"``). Without ``val_path`` the last ``val_fraction`` of the bytes
    (in document order) is the validation split: whole trailing documents, plus the tail of the
    document that straddles the boundary, cut at a line end when one is near. With ``val_path``
    (any of the same kinds) that corpus is the validation split and the first is all training.
    ``max_bytes`` (default: no cap) keeps only the first ``max_bytes`` bytes (cut at a character).

Documents are concatenated; when the tokenizer has an end-of-text id (a BPE trained here has
``<|endoftext|>``) it follows every document. The byte tokenizer has no spare id, so byte-level
documents simply follow each other (Python files end with a newline anyway). Undecodable bytes in
a source become U+FFFD. Sources are streamed document by document, so memory holds one document
(a whole text file, or one record) plus one ``encode_batch`` batch, never the corpus.

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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from moekit.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_STDLIB_MAX_BYTES = 16 * 2**20
DEFAULT_BPE_VOCAB_SIZE = 8192
DEFAULT_BPE_TRAIN_BYTES = 128 * 2**20  # BPE merges stop improving long before this; training stays quick
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text", ".py")
RECORD_SUFFIXES = (".jsonl", ".parquet")
SPLITS = ("train", "val")
CACHE_FORMAT = 1  # bump when the tokenized layout or the split rules change: old entries are then ignored

_STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "__pycache__"})
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_NEWLINE_SEARCH = 1 << 16  # how far past a split point to look for a line end before cutting mid-line
_CHUNK_CHARS = 1 << 16  # long documents are handed to BPE in pieces of about this size
_BATCH_CHARS = 1 << 22  # text per encode_batch call: large enough to keep every core busy
_PARQUET_EXTRA = "pip install 'moekit[parquet]'"


# ====================================================================== corpora
@dataclass
class Corpus:
    """Documents in a fixed order, each tagged ``"train"`` or ``"val"``.

    ``pieces()`` re-reads the sources on every call (nothing is held in memory), yielding
    ``(split, raw_utf8_bytes)``; ``identity`` is what the cache key hashes; ``total_bytes`` is the
    (approximate, for progress bars) number of bytes ``pieces()`` will yield.
    """

    name: str
    identity: dict[str, Any]
    total_bytes: int
    _pieces: Callable[[], Iterator[tuple[str, bytes]]]

    def pieces(self) -> Iterator[tuple[str, bytes]]:
        return self._pieces()

    def texts(self, split: str) -> Iterator[str]:
        """The documents of one split, decoded (invalid UTF-8 becomes U+FFFD)."""
        _check_split(split)
        for s, raw in self._pieces():
            if s == split:
                yield raw.decode("utf-8", errors="replace")


def load_corpus(
    spec: str | os.PathLike[str] = "stdlib",
    *,
    val_path: str | os.PathLike[str] | None = None,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    max_bytes: int | None = None,
) -> Corpus:
    """``"stdlib"`` or a path (text file, directory, ``.jsonl``, ``.parquet``); see the module docstring.

    ``"stdlib"`` always means the built-in corpus; write ``./stdlib`` for a path of that name.
    ``max_bytes=None`` means 16 MiB for ``"stdlib"`` and no cap for a path.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1 (or None), got {max_bytes}")
    if os.fspath(spec) == "stdlib":
        if val_path is not None:
            raise ValueError("val_path cannot be combined with the 'stdlib' corpus (it has its own split)")
        return stdlib_corpus(max_bytes=DEFAULT_STDLIB_MAX_BYTES if max_bytes is None else max_bytes,
                             val_fraction=val_fraction)
    train = _FileSet(spec, text_field)
    if val_path is None:
        return _tail_split_corpus(train, val_fraction, max_bytes)
    val = _FileSet(val_path, text_field)

    def pieces() -> Iterator[tuple[str, bytes]]:
        for raw in _cap(train.documents(), max_bytes):
            yield "train", raw
        for raw in _cap(val.documents(), max_bytes):
            yield "val", raw

    identity = {"kind": "paths", "train": train.identity(), "val": val.identity(), "max_bytes": max_bytes}
    total = _capped(train.total_bytes(), max_bytes) + _capped(val.total_bytes(), max_bytes)
    return Corpus(name=train.name, identity=identity, total_bytes=total, _pieces=pieces)


def stdlib_corpus(
    *,
    max_bytes: int = DEFAULT_STDLIB_MAX_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    include_tests: bool = False,
) -> Corpus:
    """The Python standard library source of the running interpreter (see the module docstring)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root, rels, splits = _stdlib_files(val_fraction, include_tests)
    stats = [(root / r).stat() for r in rels]
    sizes = {s: sum(st.st_size for st, sp in zip(stats, splits, strict=True) if sp == s) for s in SPLITS}
    if sizes["train"] + sizes["val"] <= max_bytes:
        budgets = dict(sizes)
    else:  # shrink both splits by the same factor, so the val share stays what the hash picked
        val_budget = max(1, round(max_bytes * sizes["val"] / (sizes["train"] + sizes["val"])))
        budgets = {"train": max(1, max_bytes - val_budget), "val": val_budget}

    def pieces() -> Iterator[tuple[str, bytes]]:
        left = dict(budgets)
        for rel, split in zip(rels, splits, strict=True):
            if left[split] <= 0:
                continue
            raw = (root / rel).read_bytes()
            if len(raw) > left[split]:
                raw = _cut_at_line(raw, left[split])
                left[split] = 0  # a cut file is the last one of its split
            else:
                left[split] -= len(raw)
            if raw:
                yield split, raw

    listing = "\n".join(f"{r.as_posix()} {st.st_size} {st.st_mtime_ns}" for r, st in zip(rels, stats, strict=True))
    identity = {
        "kind": "stdlib", "python": sys.version, "root": str(root.resolve()), "include_tests": include_tests,
        "files": hashlib.sha256(listing.encode()).hexdigest(), "val_fraction": val_fraction, "budgets": budgets,
    }
    total = sum(min(sizes[s], budgets[s]) for s in SPLITS)
    return Corpus(name="stdlib", identity=identity, total_bytes=total, _pieces=pieces)


def stdlib_split(val_fraction: float = DEFAULT_VAL_FRACTION, include_tests: bool = False) -> dict[str, list[str]]:
    """The stdlib files (relative POSIX paths, sorted) of each split, before any ``max_bytes`` cap."""
    _, rels, splits = _stdlib_files(val_fraction, include_tests)
    return {s: [r.as_posix() for r, sp in zip(rels, splits, strict=True) if sp == s] for s in SPLITS}


def _stdlib_files(val_fraction: float, include_tests: bool) -> tuple[Path, list[Path], list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib directory not found: {root}")
    rels = [r for r in _walk_sorted(root, (".py",))
            if not (_STDLIB_EXCLUDED & set(r.parts)) and (include_tests or not (_STDLIB_TEST_DIRS & set(r.parts)))]
    if not rels:
        raise ValueError(f"stdlib corpus at {root}: no .py files found")
    splits = ["val" if _hash_fraction(r.as_posix()) < val_fraction else "train" for r in rels]
    if "val" not in splits or "train" not in splits:
        raise ValueError(f"stdlib corpus at {root}: val_fraction={val_fraction} leaves a split without files")
    return root, rels, splits


class _FileSet:
    """The files behind one path argument, in order, and the raw documents they hold."""

    def __init__(self, path: str | os.PathLike[str], text_field: str) -> None:
        self.name = os.fspath(path)
        self.path = Path(path).expanduser()
        self.text_field = text_field
        if not self.path.exists():
            raise FileNotFoundError(f"corpus path not found: {self.path}")
        if self.path.is_dir():
            rels = _walk_sorted(self.path, TEXT_SUFFIXES + RECORD_SUFFIXES)
            if not rels:
                raise ValueError(f"corpus directory {self.path} is empty: no "
                                 f"{' '.join('*' + s for s in TEXT_SUFFIXES + RECORD_SUFFIXES)} files")
            self.files = [self.path / r for r in rels]
        else:
            self.files = [self.path]
        self._total: int | None = None

    def identity(self) -> dict[str, Any]:
        listing = []
        for f in self.files:
            st = f.stat()
            listing.append(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}")
        ident: dict[str, Any] = {"root": str(self.path.resolve()),
                                 "files": hashlib.sha256("\n".join(listing).encode()).hexdigest()}
        if any(f.suffix in RECORD_SUFFIXES for f in self.files):
            ident["text_field"] = self.text_field  # only records have fields: a text corpus ignores it
        return ident

    def documents(self) -> Iterator[bytes]:
        for f in self.files:
            if f.suffix == ".jsonl":
                yield from _jsonl_documents(f, self.text_field)
            elif f.suffix == ".parquet":
                yield from _parquet_documents(f, self.text_field)
            else:
                yield f.read_bytes()

    def total_bytes(self) -> int:
        """Bytes ``documents()`` yields; a record file is parsed once for this (which also validates it)."""
        if self._total is None:
            total = 0
            for f in self.files:
                if f.suffix in RECORD_SUFFIXES:
                    total += sum(len(d) for d in (_jsonl_documents(f, self.text_field) if f.suffix == ".jsonl"
                                                  else _parquet_documents(f, self.text_field)))
                else:
                    total += f.stat().st_size
            if total == 0:
                raise ValueError(f"corpus {self.path} is empty: no text")
            self._total = total
        return self._total


def _tail_split_corpus(files: _FileSet, val_fraction: float, max_bytes: int | None) -> Corpus:
    """The last ``val_fraction`` of the (capped) bytes is validation."""
    limit = _capped(files.total_bytes(), max_bytes)
    boundary = limit - max(1, round(limit * val_fraction))
    if boundary <= 0:
        raise ValueError(f"corpus {files.path} is too small to split ({limit} bytes)")

    def pieces() -> Iterator[tuple[str, bytes]]:
        pos = 0
        for raw in _cap(files.documents(), max_bytes):
            end = pos + len(raw)
            if end <= boundary:
                yield "train", raw
            elif pos >= boundary:
                yield "val", raw
            else:
                cut = _split_point(raw, boundary - pos)
                if cut > 0:
                    yield "train", raw[:cut]
                if cut < len(raw):
                    yield "val", raw[cut:]
            pos = end

    identity = {"kind": "path", **files.identity(), "val_fraction": val_fraction, "max_bytes": max_bytes}
    return Corpus(name=files.name, identity=identity, total_bytes=limit, _pieces=pieces)


def _jsonl_documents(path: Path, field: str) -> Iterator[bytes]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{lineno}: no field {field!r} in this record (set text_field)")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
            # "replace": a JSON escape can produce a lone surrogate, which UTF-8 cannot hold
            yield text.encode("utf-8", errors="replace")


def _parquet_documents(path: Path, field: str) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: {_PARQUET_EXTRA}") from e
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(names)}; set text_field)")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row}: column {field!r} is {type(text).__name__}, not a string")
            yield text.encode("utf-8", errors="replace")


def _walk_sorted(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Relative paths of matching files under ``root``, sorted; hidden entries and symlinked dirs skipped."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath).relative_to(root)
        out.extend(base / n for n in filenames if not n.startswith(".") and n.endswith(suffixes))
    return sorted(out, key=lambda p: p.as_posix())


def _hash_fraction(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key`` (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _char_start(raw: bytes, i: int) -> int:
    """Move ``i`` back to the start of a UTF-8 character so a cut never splits one."""
    while 0 < i < len(raw) and (raw[i] & 0xC0) == 0x80:
        i -= 1
    return i


def _cut_at_line(raw: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of ``raw``, ending after a newline when there is one."""
    nl = raw.rfind(b"\n", 0, limit)
    return raw[: nl + 1] if nl >= 0 else raw[: _char_start(raw, limit)]


def _split_point(raw: bytes, at: int) -> int:
    """Where to cut a document that straddles the train/val boundary: the next line end, if near."""
    nl = raw.find(b"\n", at, at + _NEWLINE_SEARCH)
    if 0 <= nl < len(raw) - 1:  # leave at least one byte on the val side
        return nl + 1
    return _char_start(raw, at)


def _cap(docs: Iterator[bytes], max_bytes: int | None) -> Iterator[bytes]:
    if max_bytes is None:
        yield from docs
        return
    left = max_bytes
    for raw in docs:
        if len(raw) >= left:
            yield raw[: _char_start(raw, left)]
            return
        left -= len(raw)
        yield raw


def _capped(n: int, max_bytes: int | None) -> int:
    return n if max_bytes is None else min(n, max_bytes)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


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
        _check_split(split)
        return self._data[split]

    def num_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of text behind the split's tokens."""
        _check_split(split)
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
