"""The compiled few-token step (``moekit.model.decode``) and fp32 activations over 16-bit weights
(``moekit.model.precision``) against the model's forward, the eager reference.

- the fast path runs (not the reference behind it) for every grouped-query architecture, and its logits are those
  of the forward within 1e-5 in fp32, over several steps and seeds; MLA models take the reference, documented;
- a ragged batch through the fast path equals each row alone;
- 16-bit weights with fp32 activations give the logits of an fp32 model holding the same (rounded) weights, in the
  prompt pass and in the decode step, and the greedy tokens of the all-fp32 model;
- ``MOEKIT_DECODE=eager`` runs the forward itself; past the cache is the forward's clear error.
"""

from __future__ import annotations

import pytest
import torch
from test_generate import ARCHS, build, prompt, rel

import moekit.model.decode as decode
from moekit.model.generate import prefill, sample_tokens
from moekit.model.transformer import KVCache

pytest.importorskip("transformers")

MLA = {"deepseek_v2", "deepseek_v3", "preset:tiny-mla"}


@torch.no_grad()
def run_steps(model, ids, tokens, step, cache_dtype=None):
    cache = KVCache(model.config, 1, max_len=32, dtype=cache_dtype or next(model.parameters()).dtype)
    prefill(model, torch.tensor([ids]), cache, activation_dtype=torch.float32)  # (a no-op for fp32/float64 models)
    return [step(model, torch.tensor([[t]]), cache)[0, -1].float() for t in tokens]


def forward_step(model, ids, cache):
    return model(ids, cache=cache, aux=False).logits


@pytest.mark.parametrize("arch,seed", [(a, 0) for a in ARCHS] + [("qwen3_moe", 1), ("gpt_oss", 1), ("preset:tiny", 2)])
def test_fast_step_matches_the_forward_in_fp32(arch, seed):
    model = build(arch, seed=seed)
    ids = prompt(model, 9, seed=seed + 1)
    cache = KVCache(model.config, 1, max_len=32)
    assert decode.fast_path_applies(model, torch.tensor([[1]]), cache) == (arch not in MLA)
    tokens = prompt(model, 8, seed=seed + 7)
    ref = run_steps(model, ids, tokens, forward_step)
    fast = run_steps(model, ids, tokens, decode.decode_step)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert rel(a, b) < 1e-5, (arch, i)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss", "preset:tiny"])
def test_fast_step_of_a_ragged_batch_equals_each_row_alone(arch):
    model = build(arch)
    caches = []
    for n in (3, 12, 7):
        c = KVCache(model.config, 1, max_len=20)
        prefill(model, torch.tensor([prompt(model, n, seed=n)]), c)
        caches.append(c)
    batch = KVCache.batch(caches)
    nxt = torch.tensor([[5], [6], [7]])
    assert decode.fast_path_applies(model, nxt, batch)
    with torch.no_grad():
        together = decode.decode_step(model, nxt, batch)[:, -1]
        each = [forward_step(model, nxt[b:b + 1], c)[0, -1] for b, c in enumerate(caches)]
    for b, row in enumerate(each):
        assert rel(together[b], row) < 1e-5, (arch, b)
    assert batch.lengths.tolist() == [4, 13, 8]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_bf16_weights_with_fp32_activations_equal_fp32_compute_on_the_rounded_weights(arch, monkeypatch):
    # the host of a CPU without native bf16, where inference keeps fp32 activations over 16-bit weights (on one with
    # AVX512-BF16 or AMX the reference step would compute in bf16: MLA, deepseek_v3's attention, runs the reference)
    monkeypatch.setattr("moekit.host.native_bf16", lambda device, host=None: False)
    model16 = build(arch, torch.bfloat16)
    model32 = build(arch, torch.bfloat16).float()  # the same rounded values, held in fp32
    ids = torch.tensor([prompt(model16, 11)])
    with torch.no_grad():
        wide = model16(ids, aux=False, activation_dtype=torch.float32).logits
        ref = model32(ids, aux=False).logits
    assert wide.dtype == torch.float32 and rel(wide, ref) < 1e-5
    tokens = prompt(model16, 6, seed=3)
    # the decode step keeps fp32 activations over the bf16 weights (an fp32 cache here, to compare exactly)
    fast = run_steps(model16, ids[0].tolist(), tokens, decode.decode_step, cache_dtype=torch.float32)
    ref_steps = run_steps(model32, ids[0].tolist(), tokens, forward_step)
    for i, (a, b) in enumerate(zip(fast, ref_steps)):
        assert rel(a, b) < 1e-5, (arch, i)


def test_the_reference_runs_where_the_fast_path_is_turned_off(monkeypatch):
    model = build("qwen3_moe", torch.float64)
    ids = prompt(model, 9)
    fast = list(sample_tokens(model, ids, 12, temperature=0.0))
    monkeypatch.setenv("MOEKIT_DECODE", "eager")
    assert not decode.fast_path_applies(model, torch.tensor([[1]]), KVCache(model.config, 1, max_len=8))
    calls = []
    monkeypatch.setattr(decode, "_fast_step", lambda *a: calls.append(a))
    assert list(sample_tokens(model, ids, 12, temperature=0.0)) == fast
    assert not calls


def test_past_the_cache_is_a_clear_error():
    model = build("qwen3_moe")
    cache = KVCache(model.config, 1, max_len=7)
    prefill(model, torch.tensor([prompt(model, 7)]), cache)
    with pytest.raises(ValueError, match=r"KV cache holds 7 positions per sequence; 7 are filled and 1 more"):
        decode.decode_step(model, torch.tensor([[1]]), cache)
    assert cache.pos == 7
