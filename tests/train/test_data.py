"""Tokenizers, corpora, the token cache and batch sampling (moekit.formats.tokenizer, moekit.train.data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.formats.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from moekit.train import data
from moekit.train.corpora import load_corpus, stdlib_split
from moekit.train.data import BatchSampler, TokenDataset, prepare_data

SAMPLE = (
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    "héllo wörld, ünïcödé 😀 — done\n"
)


def _text_corpus(tmp_path: Path, n_lines: int = 400) -> tuple[Path, str]:
    lines = [f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog ünï\n" for i in range(n_lines)]
    text = "".join(lines)
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    return p, text


def _bytes(ds: TokenDataset, split: str) -> bytes:
    """The tokens of a byte-tokenized split, as the bytes they stand for."""
    return np.asarray(ds.tokens(split)).astype(np.uint8).tobytes()


def _all_bytes(ds: TokenDataset) -> bytes:
    return _bytes(ds, "train") + _bytes(ds, "val")


# ---------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip_and_invalid_bytes(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(torch.tensor(ids)) == SAMPLE  # tensors are accepted too
    # invalid UTF-8, a truncated multi-byte character and ids past 255 decode to U+FFFD, never raise
    assert tok.decode([0xFF, 0xFE, 65]) == "\ufffd\ufffdA"
    assert tok.decode(list("😀".encode())[:2]) == "\ufffd"
    assert tok.decode([72, 300, -1, 105]) == "H\ufffd\ufffdi"
    assert tok.eot_id is None
    saved = tok.save(tmp_path / "tok")
    assert isinstance(load_tokenizer(saved), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert load_tokenizer(tok) is tok


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="trained"):
        load_tokenizer("bpe")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_bpe_train_save_load_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from moekit.formats.tokenizer import BPETokenizer, train_bpe

    texts = [SAMPLE * 20, "the quick brown fox jumps over the lazy dog\n" * 50]
    tok = train_bpe(texts, vocab_size=400)
    assert isinstance(tok, BPETokenizer) and 257 < tok.vocab_size <= 400
    assert tok.eot_id is not None and tok.decode([tok.eot_id]) == "<|endoftext|>"
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert len(ids) < len(SAMPLE.encode()) / 2  # it compresses
    assert tok.encode_batch([SAMPLE, "x"]) == [ids, tok.encode("x")]
    # half of a multi-byte character, and unknown ids, decode without raising
    assert "\ufffd" in tok.decode(tok.encode("😀")[:1] or [0])
    assert tok.decode([10**6] + ids) == SAMPLE

    d = tok.save(tmp_path / "bpe")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["moekit_tokenizer"] == "bpe" and (d / "tokenizer.json").is_file()
    for src in (d, d / "tokenizer.json"):
        loaded = load_tokenizer(src)
        assert isinstance(loaded, BPETokenizer)
        assert loaded.encode(SAMPLE) == ids and loaded.vocab_size == tok.vocab_size
        assert loaded.identity() == tok.identity()
        assert loaded.eot_id == tok.eot_id


def test_bpe_loads_a_hugging_face_directory(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from moekit.formats.tokenizer import BPETokenizer, train_bpe

    tok = train_bpe([SAMPLE * 10], vocab_size=300, special_tokens=("<s>", "</s>"))
    hf = tmp_path / "hf_ckpt"
    hf.mkdir()
    tok.hf_tokenizer.save(str(hf / "tokenizer.json"))  # just the HF file, no moekit marker
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "model_max_length": 7}))
    loaded = load_tokenizer(hf)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.eot_id == tok.hf_tokenizer.token_to_id("</s>")
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    out = loaded.save(tmp_path / "resaved")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 7 and cfg["moekit_tokenizer"] == "bpe"  # the HF fields survive


# ---------------------------------------------------------------------- the stdlib corpus
def test_stdlib_corpus_is_deterministic_with_disjoint_splits(tmp_path: Path) -> None:
    ds1, _ = prepare_data("stdlib", cache_dir=tmp_path / "c1", max_bytes=200_000, progress=False)
    ds2, _ = prepare_data("stdlib", cache_dir=tmp_path / "c2", max_bytes=200_000, progress=False)
    for s in ("train", "val"):
        assert ds1.num_tokens(s) > 0
        np.testing.assert_array_equal(ds1.tokens(s), ds2.tokens(s))
    assert ds1.num_tokens("train") + ds1.num_tokens("val") <= 200_000
    assert ds1.num_tokens("val") < ds1.num_tokens("train")
    files = stdlib_split()
    assert files == stdlib_split()
    assert files["train"] == sorted(files["train"]) and files["val"]
    assert not set(files["train"]) & set(files["val"])
    assert not any("site-packages" in f or "/test/" in f"/{f}" for f in files["train"] + files["val"])
    assert 0.02 < len(files["val"]) / (len(files["train"]) + len(files["val"])) < 0.10


# ---------------------------------------------------------------------- path corpora
def test_text_file_tail_is_validation(tmp_path: Path) -> None:
    path, text = _text_corpus(tmp_path)
    ds, tok = prepare_data(path, cache_dir=tmp_path / "cache", val_fraction=0.1, progress=False)
    raw = text.encode()
    assert _all_bytes(ds) == raw  # nothing lost, nothing added, order kept
    val = _bytes(ds, "val")
    assert raw.endswith(val) and val.startswith(b"line ")  # cut at a line end
    assert 0.08 < len(val) / len(raw) < 0.12
    assert ds.num_bytes("train") == ds.num_tokens("train") and ds.bytes_per_token("val") == 1.0
    assert tok.vocab_size == ds.vocab_size == 256


def test_directory_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    files = {"b.md": "# bee\n" * 50, "a.txt": "alpha\n" * 50, "sub/c.py": "x = 1\n" * 50}
    for name, body in files.items():
        (root / name).write_text(body)
    (root / ".hidden.txt").write_text("nope\n")
    (root / ".git" / "x.txt").write_text("nope\n")
    (root / "image.bin").write_bytes(b"\x00\x01")
    ds, _ = prepare_data(root, cache_dir=tmp_path / "cache", progress=False)
    assert _all_bytes(ds) == "".join(files[k] for k in ("a.txt", "b.md", "sub/c.py")).encode()


def test_jsonl_corpus_and_separate_val_path(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    docs = [f"story {i}: once upon a time ü\n" * 3 for i in range(40)]
    train.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    val = tmp_path / "val.txt"
    val.write_text("held out text\n" * 20)
    ds, _ = prepare_data(train, text_field="body", val_path=val, cache_dir=tmp_path / "cache", progress=False)
    assert _bytes(ds, "train") == "".join(docs).encode()
    assert _bytes(ds, "val") == val.read_bytes()
    assert ds.meta["splits"]["train"]["documents"] == 40


def test_parquet_corpus(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i} of the parquet table\n" * 4 for i in range(60)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(60))}), path)
    ds, _ = prepare_data(path, cache_dir=tmp_path / "cache", progress=False)
    assert _all_bytes(ds) == "".join(texts).encode()
    with pytest.raises(ValueError, match=r"d\.parquet.*'content'"):
        prepare_data(path, text_field="content", cache_dir=tmp_path / "cache", progress=False)


def test_clear_errors_name_the_path(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    missing = tmp_path / "no_such_corpus.txt"
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        prepare_data(missing, cache_dir=cache, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        prepare_data(empty, cache_dir=cache, progress=False)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    (empty_dir / "notes.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="empty_dir"):
        prepare_data(empty_dir, cache_dir=cache, progress=False)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(ValueError, match="blank.jsonl"):
        prepare_data(blank, cache_dir=cache, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text here"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*'text'"):
        prepare_data(bad, cache_dir=cache, progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2"):
        prepare_data(broken, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(empty, val_fraction=0.0)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few bytes only\n" * 3)
    ds, _ = prepare_data(tiny, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match=r"tiny\.txt.*val.*seq_len=64"):
        ds.get_batch("val", 2, 64)
    with pytest.raises(ValueError, match="split"):
        ds.num_tokens("test")


# ---------------------------------------------------------------------- the cache
def test_cache_is_reused_and_keyed_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, text = _text_corpus(tmp_path)
    cache = tmp_path / "cache"
    ds1, _ = prepare_data(path, cache_dir=cache, progress=False)
    assert not ds1.reused_cache
    bin_path = ds1.directory / "train.bin"
    mtime = bin_path.stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-tokenized although the cache is valid")

    monkeypatch.setattr(data, "_tokenize_corpus", fail)
    ds2, _ = prepare_data(path, cache_dir=cache, progress=False)
    assert ds2.reused_cache and ds2.directory == ds1.directory
    assert bin_path.stat().st_mtime_ns == mtime
    monkeypatch.undo()

    path.write_text(text + "one more line\n")  # a changed file gets a new entry
    ds3, _ = prepare_data(path, cache_dir=cache, progress=False)
    assert not ds3.reused_cache and ds3.directory != ds1.directory
    assert ds3.num_bytes("train") + ds3.num_bytes("val") == len(text.encode()) + 14
    ds4, _ = prepare_data(path, cache_dir=cache, val_fraction=0.2, progress=False)  # so does a setting
    assert not ds4.reused_cache and ds4.directory != ds3.directory
    assert not list(cache.rglob("*.tmp.*"))  # temp files were all moved into place

    # a truncated bin (an interrupted copy, a full disk) is detected and rebuilt
    with (ds4.directory / "val.bin").open("r+b") as f:
        f.truncate(10)
    ds5, _ = prepare_data(path, cache_dir=cache, val_fraction=0.2, progress=False)
    assert not ds5.reused_cache and ds5.num_tokens("val") == ds4.meta["splits"]["val"]["tokens"]


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _text_corpus(tmp_path, n_lines=50)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "envcache"))
    ds, _ = prepare_data(path, progress=False)
    assert ds.directory.parent == tmp_path / "envcache" / "tokens"
    assert data.default_cache_dir() == tmp_path / "envcache" / "tokens"


def test_large_vocab_uses_uint32() -> None:
    assert data._token_dtype(256) == np.uint16 and data._token_dtype(65536) == np.uint16
    assert data._token_dtype(65537) == np.uint32


# ---------------------------------------------------------------------- batches
def test_batches_shapes_shift_and_determinism(tmp_path: Path) -> None:
    path, _ = _text_corpus(tmp_path)
    ds, _ = prepare_data(path, cache_dir=tmp_path / "cache", progress=False)
    x, y = ds.get_batch("train", 8, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(np.asarray(ds.tokens("train"), dtype=np.int64))
    for row_x, row_y in zip(x, y, strict=True):  # each row is a real window of the split
        starts = [i for i in range(len(train) - 32) if torch.equal(train[i:i + 32], row_x)]
        assert any(torch.equal(train[i + 1:i + 33], row_y) for i in starts)
    x2, y2 = ds.get_batch("train", 8, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = ds.get_batch("train", 8, 32, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


def test_val_batches_cover_the_split_in_order(tmp_path: Path) -> None:
    path, _ = _text_corpus(tmp_path)
    ds, _ = prepare_data(path, cache_dir=tmp_path / "cache", progress=False)
    val = np.asarray(ds.tokens("val"), dtype=np.int64)
    seq_len, bs = 16, 4
    batches = list(ds.val_batches(bs, seq_len))
    n_seq = (len(val) - 1) // seq_len
    assert len(batches) == ds.num_val_batches(bs, seq_len) == math.ceil(n_seq / bs)
    xs = torch.cat([x for x, _ in batches]).reshape(-1).numpy()
    ys = torch.cat([y for _, y in batches]).reshape(-1).numpy()
    np.testing.assert_array_equal(xs, val[: n_seq * seq_len])
    np.testing.assert_array_equal(ys, val[1: n_seq * seq_len + 1])
    assert len(list(ds.val_batches(bs, seq_len, max_batches=2))) == 2
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, ds.val_batches(bs, seq_len), strict=True))


def test_batch_sampler_resumes_exactly(tmp_path: Path) -> None:
    path, _ = _text_corpus(tmp_path)
    ds, _ = prepare_data(path, cache_dir=tmp_path / "cache", progress=False)
    a = BatchSampler(ds, batch_size=4, seq_len=16, seed=123)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(2)]
    b = BatchSampler(ds, batch_size=4, seq_len=16, seed=999)
    b.load_state_dict(state)
    assert b.batches_drawn == 3
    for (ex, ey), (gx, gy) in zip(expected, [next(b) for _ in range(2)], strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(ds, batch_size=4, seq_len=10**6)


def test_bits_per_byte(tmp_path: Path) -> None:
    path, _ = _text_corpus(tmp_path, n_lines=50)
    ds, _ = prepare_data(path, cache_dir=tmp_path / "cache", progress=False)
    assert ds.bits_per_byte(math.log(2)) == pytest.approx(1.0)  # byte level: 1 nat/token = 1/ln2 bits/byte


# ---------------------------------------------------------------------- BPE through prepare_data
def test_prepare_data_with_bpe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tokenizers")
    from moekit.formats.tokenizer import BPETokenizer

    path, text = _text_corpus(tmp_path, n_lines=600)
    cache = tmp_path / "cache"
    ds, tok = prepare_data(path, "bpe", bpe_vocab_size=320, cache_dir=cache, progress=False)
    assert isinstance(tok, BPETokenizer) and ds.vocab_size == tok.vocab_size <= 320
    assert ds.meta["dtype"] == "uint16"
    assert ds.bytes_per_token("train") > 1.5  # BPE merges: several bytes per token
    assert ds.num_bytes("train") + ds.num_bytes("val") == len(text.encode())
    # each split is one document followed by end-of-text, and decodes back to the text
    train = ds.tokens("train").tolist()
    assert train[-1] == tok.eot_id and tok.eot_id not in train[:-1]
    joined = tok.decode(train[:-1]) + tok.decode(ds.tokens("val").tolist()[:-1])
    assert joined == text

    # the trained tokenizer is cached too: neither training nor tokenizing happens again
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("BPE retrained / corpus re-tokenized")

    monkeypatch.setattr(data, "train_bpe", fail)
    monkeypatch.setattr(data, "_tokenize_corpus", fail)
    ds2, tok2 = prepare_data(path, "bpe", bpe_vocab_size=320, cache_dir=cache, progress=False)
    assert ds2.reused_cache and tok2.identity() == tok.identity()
    monkeypatch.undo()

    # a saved tokenizer directory is accepted as the tokenizer argument, and hits the same cache
    saved = tok.save(tmp_path / "saved_tok")
    ds3, _ = prepare_data(path, saved, cache_dir=cache, progress=False)
    assert ds3.reused_cache and ds3.directory == ds.directory


def test_long_documents_are_chunked_without_changing_the_tokens(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tokenizers")
    from moekit.formats.tokenizer import train_bpe

    path, text = _text_corpus(tmp_path, n_lines=300)
    text = text.replace("jumps", "  jumps\n\n   over\n") + "x \n  y\n"  # awkward whitespace runs
    path.write_text(text)
    tok = train_bpe([text], vocab_size=300)
    monkeypatch.setattr(data, "_CHUNK_CHARS", 200)  # force many chunks
    assert len(data._chunks(text)) > 10 and "".join(data._chunks(text)) == text
    ds, _ = prepare_data(path, tok, val_path=path, cache_dir=tmp_path / "cache", progress=False)
    assert ds.tokens("train").tolist() == tok.encode(text) + [tok.eot_id]


def test_tokenizer_interface_is_abstract() -> None:
    with pytest.raises(TypeError):
        Tokenizer()  # type: ignore[abstract]
