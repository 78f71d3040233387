"""The batched sampler against a float64 reference of each transform (penalties, temperature, top-k, top-p)."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.serve.sampling import SamplingParams, sample


def reference_probs(logits_V: torch.Tensor, p: SamplingParams, counts_V: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution one row is drawn from, written out plainly in float64 (OpenAI's penalties, then
    temperature, top-k, and the nucleus: the smallest top set whose mass reaches top_p)."""
    x = logits_V.double().clone()
    if counts_V is not None:
        c = counts_V.double()
        x = x - p.frequency_penalty * c - p.presence_penalty * (c > 0).double()
    x = x / p.temperature
    order = sorted(range(x.numel()), key=lambda i: -float(x[i]))
    if p.top_k:
        order = order[:p.top_k]
    z = torch.tensor([float(x[i]) for i in order], dtype=torch.float64).softmax(0)
    keep, mass = [], 0.0
    for i, pi in zip(order, z.tolist()):
        keep.append((i, pi))
        mass += pi
        if mass >= p.top_p:
            break
    out = torch.zeros_like(x)
    total = sum(pi for _, pi in keep)
    for i, pi in keep:
        out[i] = pi / total
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                                dict(temperature=0.9, top_k=8, top_p=0.6),
                                dict(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5)])
def test_draws_follow_the_reference_distribution(seed, kw):
    torch.manual_seed(seed)
    V, n = 12, 6000
    logits_V = torch.randn(V) * 2
    counts_V = torch.randint(0, 3, (V,)).to(torch.int32)
    p = SamplingParams(seed=seed, **kw)
    ref = reference_probs(logits_V, p, counts_V)
    # n rows of the same logits, each with its own generator: one batched call
    gens = [torch.Generator().manual_seed(seed * 100000 + i) for i in range(n)]
    toks = sample(logits_V.expand(n, V), [p] * n, gens, counts_V.expand(n, V))
    freq = torch.bincount(torch.tensor(toks), minlength=V).double() / n
    assert (freq[ref == 0] == 0).all(), "a token outside top-k / the nucleus was drawn"
    # each frequency within 5 standard errors of its probability
    se = (ref * (1 - ref) / n).sqrt()
    assert ((freq - ref).abs() <= 5 * se + 1e-12).all(), (freq, ref)


def test_greedy_rows_take_the_argmax_of_the_penalised_logits_beside_sampled_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    counts = torch.zeros(3, 20, dtype=torch.int32)
    best = int(logits[1].argmax())
    counts[1, best] = 4
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, frequency_penalty=2.0),
              SamplingParams(temperature=1.0, seed=3)]
    toks = sample(logits, params, [None, None, params[2].generator()], counts)
    assert toks[0] == int(logits[0].argmax())
    assert toks[1] == int((logits[1] - 2.0 * counts[1]).argmax()) and toks[1] != best
    assert 0 <= toks[2] < 20


def test_top_k_one_is_greedy_and_draws_nothing():
    p = SamplingParams(temperature=0.8, top_k=1)
    assert p.greedy and p.generator() is None
    logits = torch.randn(4, 9)
    assert sample(logits, [p] * 4, [None] * 4) == logits.argmax(-1).tolist()


def test_a_seed_repeats_its_draws():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, seed=11)
    a = [sample(logits, [p], [g])[0] for g in [p.generator()] for _ in range(20)]
    g2 = p.generator()
    b = [sample(logits, [p], [g2])[0] for _ in range(20)]
    assert a == b and len(set(a)) > 1
    assert math.isclose(SamplingParams(stop="ab").stop_max_len, 2) and SamplingParams(stop="ab").stop == ("ab",)
