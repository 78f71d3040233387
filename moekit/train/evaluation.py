"""``moekit eval`` and ``moekit generate``: score and sample a trained checkpoint."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moekit.model.transformer import Transformer
from moekit.train.trainer import TrainConfig, evaluate, resolve_device


def load_for_inference(path: str | Path, dtype: str = "auto", device: str = "auto") -> tuple[Transformer, Any, Path]:
    """(model, tokenizer, directory) of a run directory, a training checkpoint, or a moekit or Hugging
    Face checkpoint directory (with its tokenizer.json), on ``device`` in the compute ``dtype``
    (``auto``: the stored dtype where the host computes it natively, else fp32, ``moekit.host.weights_dtype``)."""
    from moekit.formats import from_pretrained, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    model = from_pretrained(ckpt, dtype=dtype, device=resolve_device(device))
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"{ckpt}: no tokenizer files (tokenizer.json / tokenizer_config.json) to encode text with")
    return model, tok, ckpt


def generate_text(checkpoint: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int | None = None, device: str = "auto",
                  dtype: str = "auto") -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece as it is sampled (text, not token ids).

    ``dtype``: the compute dtype (``auto``: see :func:`load_for_inference`)."""
    from moekit.model.generate import sample_tokens

    model, tok, _ = load_for_inference(checkpoint, dtype=dtype, device=device)
    ids: list[int] = []
    shown = ""
    for t in sample_tokens(model, tok.encode(prompt), max_new_tokens, temperature, top_k, seed):
        ids.append(t)
        text = tok.decode(ids)
        # a byte-level token can end mid-character: hold back until the character is complete
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    text = tok.decode(ids)
    if len(text) > len(shown):
        yield text[len(shown):]


def eval_checkpoint(checkpoint: str | Path, corpus: str = "stdlib", val_path: str | None = None,
                    text_field: str = "text", batch_size: int = 8, seq_len: int | None = None,
                    max_batches: int | None = None, cache_dir: str | None = None, device: str = "auto",
                    progress: bool = True, dtype: str = "auto") -> dict[str, Any]:
    """Validation loss (nats/token), perplexity and bits per byte of a checkpoint on a corpus's val split,
    computed in ``dtype`` (``auto``: see :func:`load_for_inference`)."""
    from moekit.train.data import prepare_data

    model, tok, ckpt = load_for_inference(checkpoint, dtype=dtype, device=device)
    data, _ = prepare_data(corpus=corpus, tokenizer=tok, val_path=val_path, text_field=text_field,
                           cache_dir=cache_dir, progress=progress)
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    tc = TrainConfig(batch_size=batch_size, seq_len=seq_len, dtype="fp32")  # no autocast: the weights' dtype
    dev = resolve_device(device)
    n_batches = data.num_val_batches(batch_size, seq_len)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    with torch.no_grad():
        loss = evaluate(model, data, tc, dev, max_batches=n_batches)
    return {
        "checkpoint": str(ckpt),
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": data.bits_per_byte(loss, "val"),
        "tokens": n_batches * batch_size * seq_len,
        "seq_len": seq_len,
        "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
        "dtype_requested": dtype,
    }
