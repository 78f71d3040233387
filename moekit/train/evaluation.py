"""``moekit eval`` and ``moekit generate``: score and sample a trained checkpoint."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moekit.model.transformer import Transformer
from moekit.train.trainer import TrainConfig, evaluate, resolve_device


def load_for_inference(path: str | Path, dtype: str = "auto", device: str = "auto",
                       expert_memory_gb: float | None = None) -> tuple[Transformer, Any, Path]:
    """(model, tokenizer, directory) of a run directory, a training checkpoint, or a moekit or Hugging
    Face checkpoint directory (with its tokenizer.json), on ``device`` in the compute ``dtype``
    (``auto``: the stored dtype where the host computes it natively, else fp32, ``moekit.host.weights_dtype``).
    ``expert_memory_gb``: the routed experts stay on disk, read into a pool of that many GiB
    (``moekit.offload.load_offloaded``; the CPU)."""
    from moekit.formats import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    model = _load_model(ckpt, dtype, resolve_device(device), expert_memory_gb)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"{ckpt}: no tokenizer files (tokenizer.json / tokenizer_config.json) to encode text with")
    return model, tok, ckpt


def _load_model(checkpoint: str | Path, dtype: str, dev: torch.device, expert_memory_gb: float | None,
                tokenizer: bool = True) -> Transformer:
    """``from_pretrained``, or with ``expert_memory_gb`` ``moekit.offload.load_offloaded`` (the CPU only)."""
    if expert_memory_gb is None:
        from moekit.formats import from_pretrained

        return from_pretrained(checkpoint, dtype=dtype, device=dev, tokenizer=tokenizer)
    from moekit.offload import load_offloaded

    if dev.type != "cpu":
        raise ValueError(f"expert_memory: offloaded experts run on the CPU, not on {dev}")
    return load_offloaded(checkpoint, expert_memory_gb, dtype=dtype, tokenizer=tokenizer)


def generate_text(checkpoint: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int | None = None, device: str = "auto",
                  dtype: str = "auto", expert_memory_gb: float | None = None) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece as it is sampled (text, not token ids).

    ``dtype``: the compute dtype (``auto``: see :func:`load_for_inference`); ``expert_memory_gb``: offloaded
    routed experts (ditto)."""
    from moekit.model.generate import sample_tokens

    model, tok, _ = load_for_inference(checkpoint, dtype=dtype, device=device, expert_memory_gb=expert_memory_gb)
    ids: list[int] = []
    shown = ""
    # a prompt longer than the context keeps its most recent tokens (sample_tokens' documented truncation)
    for t in sample_tokens(model, tok.encode(prompt), max_new_tokens, temperature, top_k, seed, truncate=True):
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
                    progress: bool = True, dtype: str = "auto",
                    expert_memory_gb: float | None = None) -> dict[str, Any]:
    """Validation loss (nats/token), perplexity and bits per byte of a checkpoint on a corpus's val split,
    computed in ``dtype`` (``auto``: see :func:`load_for_inference`; ``expert_memory_gb`` too)."""
    from moekit.train.data import prepare_data

    model, tok, ckpt = load_for_inference(checkpoint, dtype=dtype, device=device, expert_memory_gb=expert_memory_gb)
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


@torch.no_grad()
def benchmark_generation(checkpoint: str | Path, prompt_tokens: int = 512, new_tokens: int = 128, rounds: int = 3,
                         dtype: str = "auto", device: str = "auto", probe_bandwidth: bool = True,
                         expert_memory_gb: float | None = None) -> dict[str, Any]:
    """``moekit generate CKPT --benchmark``: prompt and decode tokens/s of a checkpoint on this host, and the share of
    the host's read bandwidth that decode reaches on the weights a token reads.

    A seeded random prompt of ``prompt_tokens`` ids; the prompt pass (``prefill``: chunked, last position's head only)
    and ``new_tokens`` greedy decode steps at batch 1, timed apart; the first round (compiling the kernels) is
    reported apart from the medians of the next ``rounds``. Bytes per decode token: the weights multiplied per
    token (``costs.matmul_params_per_token``) in the weights' dtype; bandwidth: ``moekit.host.read_bandwidth``.
    """
    import statistics
    import time

    from moekit.host import probe_host, read_bandwidth
    from moekit.model.costs import costs
    from moekit.model.decode import decode_step
    from moekit.model.generate import check_request, prefill
    from moekit.model.transformer import KVCache
    from moekit.offload import offload_stats

    if rounds < 1:
        raise ValueError(f"rounds: must be >= 1, got {rounds}")
    t_load = time.perf_counter()
    dev = resolve_device(device)
    model = _load_model(checkpoint, dtype, dev, expert_memory_gb, tokenizer=False).eval()
    load_s = time.perf_counter() - t_load
    cfg = model.config
    check_request(model, prompt_tokens, new_tokens)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    wdtype = model.tok_emb.weight.dtype

    def one_round() -> tuple[float, float]:
        cache = KVCache(cfg, 1, max_len=prompt_tokens + new_tokens, device=dev, dtype=wdtype)
        t0 = time.perf_counter()
        nxt = prefill(model, ids, cache).argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            nxt = decode_step(model, nxt, cache)[:, -1].argmax(-1, keepdim=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / max(1, new_tokens - 1)

    first = one_round()
    timed = [one_round() for _ in range(rounds)]
    prompt_s = statistics.median(t for t, _ in timed)
    step_s = statistics.median(s for _, s in timed)
    bytes_per_token = costs(cfg).matmul_params_per_token * torch.empty((), dtype=wdtype).element_size()
    bandwidth = read_bandwidth() if probe_bandwidth and dev.type == "cpu" else None
    achieved = bytes_per_token / step_s
    return {
        "checkpoint": str(checkpoint), "dtype": str(wdtype).removeprefix("torch."), "device": str(dev),
        "host": probe_host().to_dict(), "threads": torch.get_num_threads(), "load_seconds": load_s,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds,
        "prompt_tokens_per_s": prompt_tokens / prompt_s, "decode_tokens_per_s": 1 / step_s,
        "first_round_prompt_seconds": first[0], "first_round_decode_ms_per_token": 1000 * first[1],
        "weight_bytes_per_decode_token": bytes_per_token, "decode_weight_bytes_per_s": achieved,
        "read_bandwidth_bytes_per_s": bandwidth,
        "bandwidth_fraction": None if bandwidth is None else achieved / bandwidth,
        "offload": offload_stats(model) if expert_memory_gb is not None else None,
    }
