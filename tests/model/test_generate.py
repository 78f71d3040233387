"""The inference path (the prompt pass, the cached decode step and its kernels, batched decode) against the eager
reference (the whole sequence through the model again at every step, no cache), on tiny random models of every
architecture moekit loads and of moekit's own presets.

- greedy continuations identical for 32 tokens (float64, where rounding cannot flip an argmax or a routing choice);
- logits within 1e-5 of the reference in fp32;
- the prompt pass's last-position logits equal the last row of the full logits;
- chunked prefill equals one-shot prefill; batched decode of sequences of different lengths equals each alone;
- the eager fallback (compiled kernels off) gives the same; past the cache or the context is a clear error.
"""

from __future__ import annotations

import pytest
import torch
from archs import moekit_config, randomize

import moekit.layer.kernels.decode as decode_mod
from moekit.model.generate import check_request, greedy_batch, prefill, sample_tokens
from moekit.model.presets import get_preset
from moekit.model.transformer import KVCache, Transformer

pytest.importorskip("transformers")  # the architectures' configs are built with its config classes

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "llama", "qwen2",
         "mistral", "preset:tiny", "preset:tiny-mla"]
N_NEW = 32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest |b| (the tolerance the Hugging Face tests use too)."""
    return float((a - b).abs().max() / b.abs().max())


def build(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    cfg = get_preset(arch.removeprefix("preset:")) if arch.startswith("preset:") else moekit_config(arch)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    randomize(model, seed)
    return model.to(dtype).eval()


def prompt(model: Transformer, n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_greedy(model: Transformer, ids: list[int], n_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """The eager reference: every step runs the whole sequence again, without a cache."""
    ids, out, logits = list(ids), [], []
    for _ in range(n_new):
        row = model(torch.tensor([ids]), aux=False).logits[0, -1]
        logits.append(row)
        out.append(int(row.argmax()))
        ids.append(out[-1])
    return out, logits


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuation_equals_the_reference(arch):
    model = build(arch, torch.float64)
    ids = prompt(model, 9)
    ref, _ = reference_greedy(model, ids, N_NEW)
    assert list(sample_tokens(model, ids, N_NEW, temperature=0.0)) == ref


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_logits_match_the_reference_in_fp32(arch):
    model = build(arch)
    ids = prompt(model, 9)
    toks, ref_logits = reference_greedy(model, ids, 8)
    cache = KVCache(model.config, 1, max_len=32)
    with torch.no_grad():
        logits = [prefill(model, torch.tensor([ids]), cache)[0]]
        for t in toks[:-1]:
            logits.append(model(torch.tensor([[t]]), cache=cache, aux=False).logits[0, -1])
    for i, (a, b) in enumerate(zip(logits, ref_logits)):
        assert rel(a, b) < 1e-5, (arch, i)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_pass_last_logits_equal_the_last_row_of_the_full_logits(arch):
    model = build(arch)
    ids = torch.tensor([prompt(model, 11), prompt(model, 11, seed=2)])
    with torch.no_grad():
        full = model(ids, aux=False).logits
        last = model(ids, aux=False, logits_to_keep=1).logits
        three = model(ids, aux=False, logits_to_keep=3).logits
    assert last.shape == (2, 1, model.config.vocab_size) and three.shape[1] == 3
    assert rel(last[:, 0], full[:, -1]) < 1e-6 and rel(three, full[:, -3:]) < 1e-6
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, targets=ids, logits_to_keep=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_one_shot(arch):
    model = build(arch)
    ids = torch.tensor([prompt(model, 23)])
    one, chunked = KVCache(model.config, 1, max_len=32), KVCache(model.config, 1, max_len=32)
    a = prefill(model, ids, one, chunk_size=None)
    b = prefill(model, ids, chunked, chunk_size=5)  # 5 + 5 + 5 + 5 + 3, each chunk attending to the cache
    assert rel(b, a) < 1e-5
    assert one.pos == chunked.pos == 23
    for ka, kb in zip(one.k + one.v, chunked.k + chunked.v):
        assert rel(kb, ka) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_decode_of_different_lengths_equals_each_alone(arch):
    model = build(arch, torch.float64)
    prompts = [prompt(model, n, seed=n) for n in (3, 12, 7)]
    alone = [list(sample_tokens(model, p, N_NEW, temperature=0.0)) for p in prompts]
    assert greedy_batch(model, prompts, N_NEW) == alone
    # and the batched step's logits, row by row, in fp32
    model32 = build(arch)
    caches = []
    for p in prompts:
        c = KVCache(model32.config, 1, max_len=20)
        prefill(model32, torch.tensor([p]), c)
        caches.append(c)
    batch = KVCache.batch(caches)
    nxt = torch.tensor([[5], [6], [7]])
    with torch.no_grad():
        together = model32(nxt, cache=batch, aux=False).logits[:, -1]
        each = [model32(nxt[b:b + 1], cache=c, aux=False).logits[0, -1] for b, c in enumerate(caches)]
    for b, row in enumerate(each):
        assert rel(together[b], row) < 1e-5, (arch, b)
    assert batch.lengths.tolist() == [4, 13, 8] and batch.pos == 13


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss", "preset:tiny"])
def test_the_eager_fallback_gives_the_same_tokens(monkeypatch, arch):
    """With the compiled decode kernels unavailable (no C++ compiler, or MOEKIT_KERNELS=eager) the eager
    per-expert path runs, and the continuation is the same."""
    model = build(arch, torch.float64)
    ids = prompt(model, 9)
    fast = list(sample_tokens(model, ids, 16, temperature=0.0))
    ran = []
    original = decode_mod.decode_eager

    def spy(*a, **k):
        ran.append(1)
        return original(*a, **k)

    monkeypatch.setattr(decode_mod.DECODE_KERNEL, "enabled", False)
    monkeypatch.setattr(decode_mod.ROUTED_DECODE, "enabled", False)
    monkeypatch.setattr("moekit.layer.experts.decode_eager", spy)
    assert list(sample_tokens(model, ids, 16, temperature=0.0)) == fast
    assert ran or model.config.moe is None  # the eager path did run


def test_past_the_cache_or_the_context_is_a_clear_error():
    model = build("preset:tiny")
    ctx = model.config.max_seq_len
    cache = KVCache(model.config, 1, max_len=8)
    prefill(model, torch.tensor([prompt(model, 6)]), cache)
    with pytest.raises(ValueError, match=r"KV cache holds 8 positions per sequence; 6 are filled and 3 more"):
        model(torch.tensor([[1, 2, 3]]), cache=cache, aux=False)
    with pytest.raises(ValueError, match=rf"a prompt of {ctx} tokens and 5 new tokens need {ctx + 5} positions; "
                                         rf"the model's context is {ctx}"):
        list(sample_tokens(model, prompt(model, ctx), 5))
    with pytest.raises(ValueError, match="max_new_tokens: must be >= 1, got 0"):
        check_request(model, 3, 0)
    with pytest.raises(ValueError, match="prompt: must hold at least one token"):
        list(sample_tokens(model, [], 3))
    # the documented truncation keeps the most recent context
    long = prompt(model, ctx + 10)
    got = list(sample_tokens(model, long, 4, temperature=0.0, truncate=True))
    assert got == list(sample_tokens(model, long[-(ctx - 4):], 4, temperature=0.0))
