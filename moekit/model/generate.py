"""Sampling from a model with a KV cache, streaming tokens as they are produced.

Legend: B batch, S sequence, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from moekit.model.transformer import KVCache, Transformer


@torch.no_grad()
def sample_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1): prefill the prompt, then decode with the cache."""
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if not prompt_ids:
        raise ValueError("prompt: must hold at least one token")
    cfg = model.config
    if len(prompt_ids) + max_new_tokens > cfg.max_seq_len:
        # keep the most recent context that leaves room for the new tokens
        keep = max(1, cfg.max_seq_len - max_new_tokens)
        prompt_ids = prompt_ids[-keep:]
        max_new_tokens = min(max_new_tokens, cfg.max_seq_len - len(prompt_ids))
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    cache = KVCache(cfg, batch=1, device=device, dtype=next(model.parameters()).dtype)
    ids_BS = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        logits_V = model(ids_BS, cache=cache, aux=False).logits[0, -1].float()
        nxt = _pick(logits_V, temperature, top_k, gen)
        yield nxt
        ids_BS = torch.tensor([[nxt]], device=device)


def _pick(logits_V: Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k is not None and top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=gen))
