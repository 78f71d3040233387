"""Tokenizers: the built-in byte-level one and byte-level BPE backed by Hugging Face ``tokenizers``.

Every tokenizer implements the small :class:`Tokenizer` interface (``encode``, ``encode_batch``,
``decode``, ``vocab_size``, ``eot_id``, ``save``, ``identity``), and :func:`load_tokenizer` turns a
name or a directory back into one.

On disk a tokenizer directory holds

* ``tokenizer_config.json`` with a ``"moekit_tokenizer"`` key (``"byte"`` or ``"bpe"``) that tells
  :func:`load_tokenizer` which class to build, and
* for BPE, the Hugging Face ``tokenizer.json``. The config also carries ``"tokenizer_class":
  "PreTrainedTokenizerFast"`` so ``transformers.AutoTokenizer`` can open a moekit BPE directory.

A directory with a ``tokenizer.json`` but no moekit marker (a Hugging Face checkpoint) loads as a
:class:`BPETokenizer` too; its own ``tokenizer_config.json`` is kept and written back on ``save``.

``tokenizers`` is an optional dependency (``pip install 'moekit[bpe]'``); it is imported only when a
BPE tokenizer is trained or loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from moekit.formats.checkpoint import atomic_write_text

CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
MARKER_KEY = "moekit_tokenizer"
EOT_TOKEN = "<|endoftext|>"
# Looked up, in this order, when a loaded tokenizer.json does not name its end-of-text token.
_EOT_CANDIDATES = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")

_BPE_EXTRA = "pip install 'moekit[bpe]'"


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:  # the extra is optional: say exactly how to get it
        raise ImportError(f"BPE tokenizers need the Hugging Face 'tokenizers' package: {_BPE_EXTRA}") from e
    return tokenizers


def _as_int_list(ids: Iterable[int] | Any) -> list[int]:
    """Accept a list, a numpy array or a torch tensor of ids."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


class Tokenizer(ABC):
    """What the data pipeline, the trainer and generation need from a tokenizer."""

    kind: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id ``encode`` can return (the model's embedding rows)."""

    @property
    def eot_id(self) -> int | None:
        """The end-of-text id appended after each document, or ``None`` when there is none."""
        return None

    @property
    def config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` fields it was loaded with (a copy; e.g. ``chat_template``, ``bos_token``)."""
        return {}

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; never adds BOS/EOS tokens."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; never raises (invalid UTF-8 and unknown ids become U+FFFD or are dropped)."""

    @abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer into ``directory`` (created if needed) and return it."""

    @abstractmethod
    def identity(self) -> str:
        """A stable hash of everything that determines the ids (part of the token-cache key)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255: nothing to train, nothing to download, no special tokens."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        # "surrogatepass" so a str holding lone surrogates (from JSON escapes) still encodes
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Iterable[int]) -> str:
        # An id outside 0..255 (a model whose embedding is padded past 256) becomes 0xFF, which is
        # never valid UTF-8 and so decodes to U+FFFD instead of raising.
        data = bytes(i if 0 <= i < 256 else 0xFF for i in _as_int_list(ids))
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_json(d / CONFIG_FILE, {MARKER_KEY: self.kind, "vocab_size": self.vocab_size})
        return d

    def identity(self) -> str:
        return "byte-v1"


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (byte-level BPE when trained here; any tokenizer.json when loaded)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any, config: dict[str, Any] | None = None) -> None:
        self._tok = hf_tokenizer
        # the source directory's tokenizer_config.json (kept so save() does not lose HF fields)
        self._config = dict(config or {})
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # added tokens may sit above get_vocab_size(); the embedding must cover the largest id
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._eot_id = self._find_eot()
        self._identity: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | os.PathLike[str], config: dict[str, Any] | None = None) -> BPETokenizer:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        tokenizers = _import_tokenizers()
        try:
            tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise ValueError(f"{p}: not a valid tokenizer.json ({e})") from e
        return cls(tok, config)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> BPETokenizer:
        d = Path(directory)
        cfg_path = d / CONFIG_FILE
        config = _read_json(cfg_path) if cfg_path.is_file() else {}
        return cls.from_file(d / TOKENIZER_FILE, config)

    # ------------------------------------------------------------------ interface
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_id(self) -> int | None:
        return self._eot_id

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking (tokenizers >= 0.20); both run on all cores
        fn = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # unknown ids are dropped by tokenizers; the ByteLevel decoder replaces invalid UTF-8
        valid = [i for i in _as_int_list(ids) if 0 <= i < self._vocab_size]
        return self._tok.decode(valid, skip_special_tokens=False)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / TOKENIZER_FILE, self._tok.to_str(pretty=True))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._config, MARKER_KEY: self.kind}
        if self._eot_id is not None:
            eot = self._tok.id_to_token(self._eot_id)
            config.setdefault("eos_token", eot)
        _write_json(d / CONFIG_FILE, config)
        return d

    def identity(self) -> str:
        if self._identity is None:
            blob = self._tok.to_str(pretty=False).encode("utf-8")
            self._identity = "bpe-" + hashlib.sha256(blob).hexdigest()[:32]
        return self._identity

    # ------------------------------------------------------------------ helpers
    def _find_eot(self) -> int | None:
        eos = self._config.get("eos_token")
        if isinstance(eos, dict):  # the HF AddedToken form {"content": ...}
            eos = eos.get("content")
        for token in ([eos] if isinstance(eos, str) else []) + list(_EOT_CANDIDATES):
            tid = self._tok.token_to_id(token)
            if tid is not None:
                return int(tid)
        return None


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (EOT_TOKEN,),
    show_progress: bool = False,
) -> BPETokenizer:
    """Train a GPT-2 style byte-level BPE (no normaliser, no prefix space, no BOS) on ``texts``.

    ``vocab_size`` counts the 256 byte symbols and the special tokens; a small corpus may stop with
    fewer merges, so read :attr:`BPETokenizer.vocab_size` afterwards.
    """
    n_min = 256 + len(special_tokens) + 1
    if vocab_size < n_min:
        raise ValueError(f"bpe vocab_size must be >= {n_min} (256 bytes + special tokens + 1 merge), got {vocab_size}")
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok, {"eos_token": special_tokens[0]} if special_tokens else None)


def load_tokenizer(name_or_path: str | os.PathLike[str] | Tokenizer) -> Tokenizer:
    """``"byte"``, a tokenizer directory (moekit or Hugging Face), or a ``tokenizer.json`` file.

    A :class:`Tokenizer` instance is returned as is.
    """
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    name = os.fspath(name_or_path)
    if name == "byte":
        return ByteTokenizer()
    p = Path(name).expanduser()
    if not p.exists():
        if name == "bpe":
            raise ValueError("a 'bpe' tokenizer has to be trained first: use prepare_data(tokenizer='bpe') "
                             "or train_bpe(), then load the saved directory")
        raise FileNotFoundError(f"tokenizer not found: {p} "
                                "(expected 'byte', a tokenizer directory or a tokenizer.json)")
    if p.is_file():
        return BPETokenizer.from_file(p)
    cfg_path = p / CONFIG_FILE
    config = _read_json(cfg_path) if cfg_path.is_file() else {}
    kind = config.get(MARKER_KEY)
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    if (p / TOKENIZER_FILE).is_file():
        return BPETokenizer.from_file(p / TOKENIZER_FILE, config)
    if kind == BPETokenizer.kind:
        raise FileNotFoundError(f"{p}: {CONFIG_FILE} says 'bpe' but {TOKENIZER_FILE} is missing")
    raise ValueError(f"{p}: no {TOKENIZER_FILE} and no moekit {CONFIG_FILE}; only Hugging Face fast "
                     "tokenizers (tokenizer.json) and moekit tokenizers can be loaded")


# ---------------------------------------------------------------------- small file helpers
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
