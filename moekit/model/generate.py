"""Generation with the KV cache: the prompt pass (chunked, last position's logits only), then one token per step,
streamed; and greedy decoding of several sequences of different lengths in one batched step.

Legend: B batch, S sequence, V vocab.

Every step after the prompt pass goes through ``moekit.model.decode.decode_step`` (the compiled few-token step, or
the model's forward where it does not apply).

The prompt pass runs the prompt into the cache ``chunk_size`` tokens at a time (a long prompt never holds the
activations of all its positions at once) and computes the output head for its last position only
(``Transformer.forward(logits_to_keep=1)``). A prompt and its new tokens must fit the model's context: a longer
request is a ``ValueError`` naming the numbers (``sample_tokens(truncate=True)`` keeps the most recent context
instead, as ``moekit generate`` does, and says so in its docstring).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from moekit.model import precision
from moekit.model.decode import decode_step
from moekit.model.transformer import KVCache, Transformer

PREFILL_CHUNK = 512  # prompt tokens per forward of the prompt pass


def check_request(model: Transformer, n_prompt: int, max_new_tokens: int) -> None:
    """A clear error for a request that cannot run: no prompt, no new token, or more than the model's context."""
    if n_prompt < 1:
        raise ValueError("prompt: must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    ctx = model.config.max_seq_len
    if n_prompt + max_new_tokens > ctx:
        raise ValueError(f"max_seq_len: a prompt of {n_prompt} tokens and {max_new_tokens} new tokens need "
                         f"{n_prompt + max_new_tokens} positions; the model's context is {ctx}")


@torch.no_grad()
def prefill(model: Transformer, ids_BS: Tensor, cache: KVCache, chunk_size: int | None = PREFILL_CHUNK,
            activation_dtype: torch.dtype | None = None) -> Tensor:
    """Run the prompt ``ids_BS`` into ``cache`` (``chunk_size`` tokens per forward; None: all at once) and return
    the logits of its last position, [B, V]. Chunked and one-shot prompt passes give the same cache and logits
    (tests/model/test_generate.py). ``activation_dtype`` (None: ``precision.activation_dtype``, fp32 over 16-bit
    weights on a CPU without bf16 instructions, else the weights') is the forward's residual-stream dtype."""
    act = activation_dtype or precision.activation_dtype(model)
    S = ids_BS.shape[1]
    step = S if chunk_size is None else chunk_size
    if step < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    logits = None
    for i in range(0, S, step):
        logits = model(ids_BS[:, i:i + step], cache=cache, aux=False, logits_to_keep=1, activation_dtype=act).logits
    return logits[:, -1]


def _cache_for(model: Transformer, batch: int, max_len: int) -> KVCache:
    p = next(model.parameters())
    return KVCache(model.config, batch=batch, max_len=max_len, device=p.device, dtype=p.dtype)


@torch.no_grad()
def sample_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int | None = None, chunk_size: int | None = PREFILL_CHUNK,
                  truncate: bool = False) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1): the prompt pass, then one decode step per token.

    A prompt plus ``max_new_tokens`` longer than the model's context raises ``ValueError`` naming the numbers;
    with ``truncate=True`` the prompt keeps its most recent tokens instead (and the new tokens stop at the context).
    """
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    cfg = model.config
    if truncate and prompt_ids and len(prompt_ids) + max_new_tokens > cfg.max_seq_len:
        keep = max(1, cfg.max_seq_len - max_new_tokens)
        prompt_ids = prompt_ids[-keep:]
        max_new_tokens = min(max_new_tokens, cfg.max_seq_len - len(prompt_ids))
    check_request(model, len(prompt_ids), max_new_tokens)
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    cache = _cache_for(model, 1, len(prompt_ids) + max_new_tokens)
    logits_V = prefill(model, torch.tensor([prompt_ids], device=device), cache, chunk_size)[0]
    for i in range(max_new_tokens):
        nxt = _pick(logits_V.float(), temperature, top_k, gen)
        yield nxt
        if i + 1 < max_new_tokens:
            logits_V = decode_step(model, torch.tensor([[nxt]], device=device), cache)[0, -1]


@torch.no_grad()
def greedy_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                 chunk_size: int | None = PREFILL_CHUNK) -> list[list[int]]:
    """Greedy continuations of several prompts of different lengths, decoded together: each prompt's pass runs
    alone (batch 1), their caches are stacked (``KVCache.batch``), then every step decodes all of them at once,
    each at its own position. The same tokens as decoding each prompt alone (tests/model/test_generate.py)."""
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    for p in prompts:
        check_request(model, len(p), max_new_tokens)
    model.eval()
    device = next(model.parameters()).device
    max_len = max(len(p) for p in prompts) + max_new_tokens
    caches, first = [], []
    for p in prompts:
        cache = _cache_for(model, 1, max_len)
        first.append(int(prefill(model, torch.tensor([p], device=device), cache, chunk_size)[0].argmax()))
        caches.append(cache)
    cache = KVCache.batch(caches)
    out = [[t] for t in first]
    nxt_B1 = torch.tensor(first, device=device)[:, None]
    for _ in range(max_new_tokens - 1):
        nxt_B1 = decode_step(model, nxt_B1, cache)[:, -1].argmax(-1, keepdim=True)
        for row, t in zip(out, nxt_B1[:, 0].tolist()):
            row.append(t)
    return out


def _pick(logits_V: Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k is not None and top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=gen))
