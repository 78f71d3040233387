"""Corpora: what ``moekit train --corpus`` reads, as documents in a fixed order, each tagged train or val.

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

Imports: nothing of moekit (the standard library, numpy, and pyarrow for parquet).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_STDLIB_MAX_BYTES = 16 * 2**20
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text", ".py")
RECORD_SUFFIXES = (".jsonl", ".parquet")
SPLITS = ("train", "val")

_STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "__pycache__"})
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_NEWLINE_SEARCH = 1 << 16  # how far past a split point to look for a line end before cutting mid-line
_PARQUET_EXTRA = "pip install 'moekit[parquet]'"


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
        check_split(split)
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


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
