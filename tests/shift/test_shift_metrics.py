"""Expert-shift metrics on hand-built routings whose answers are known (identical, permuted, one expert swapped, a
pruned model's renumbered experts), against a float64 reference of each definition, and the recorder end to end."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.model.transformer import Transformer
from moekit.shift import ShiftCounts, compare_routings, layer_shift, record, shift, shift_counts


def _routing(T=64, E=8, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs_TE = torch.rand(T, E, generator=g, dtype=torch.float64).softmax(-1)
    return probs_TE.topk(K, -1).indices, probs_TE


def reference_shift(ref_idx, ref_p, oth_idx, oth_p):
    """Each definition token by token in plain Python over float64."""
    T, K = ref_idx.shape
    lost = [K - len(set(ref_idx[t].tolist()) & set(oth_idx[t].tolist())) for t in range(T)]
    kl = sum(sum(float(p) * math.log(float(p) / float(q)) for p, q in zip(ref_p[t], oth_p[t]) if p > 0)
             for t in range(T)) / T
    return dict(changed_any=sum(n >= 1 for n in lost) / T, changed_half=sum(n >= math.ceil(K / 2) for n in lost) / T,
                changed_all=sum(n == K for n in lost) / T,
                top1_agreement=sum(int(ref_idx[t, 0]) == int(oth_idx[t, 0]) for t in range(T)) / T, kl=kl)


@pytest.mark.parametrize("K", (1, 2, 3))
def test_identical_routings_have_no_shift(K):
    idx, p = _routing(K=K)
    s = layer_shift(idx, p, idx.clone(), p.clone())
    assert (s.changed_any, s.changed_half, s.changed_all, s.top1_agreement) == (0, 0, 0, 1)
    assert s.kl == pytest.approx(0, abs=1e-12) and s.load_tv == 0 and s.load_ref == s.load_other


def test_a_permutation_without_fixed_points_changes_every_token():
    idx, p = _routing(K=2)
    idx = idx % 4  # the reference uses experts 0-3 only (topk_idx need not come from p for the counts)
    idx = torch.where(idx[:, :1] == idx[:, 1:], torch.stack([idx[:, 0], (idx[:, 0] + 1) % 4], 1), idx)
    perm = torch.roll(torch.arange(8), 4)  # expert e -> e + 4: no token keeps any of its experts
    s = layer_shift(idx, p, perm[idx], p[:, torch.argsort(perm)])
    assert (s.changed_any, s.changed_half, s.changed_all, s.top1_agreement) == (1, 1, 1, 0)
    assert s.kl > 0 and s.load_tv == 1


def test_a_permutation_changes_the_tokens_whose_expert_set_moved():
    idx, p = _routing(K=2, seed=1)
    perm = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])  # swap experts 0 and 1: a token holding both keeps its set
    s = layer_shift(idx, p, perm[idx], p[:, perm])
    moved = [set(a) != set(b) for a, b in zip(idx.tolist(), perm[idx].tolist())]
    assert s.changed_any == pytest.approx(sum(moved) / len(moved))
    assert s.changed_any < 1


def test_one_expert_swapped_changes_exactly_the_tokens_that_used_it():
    idx, p = _routing(T=200, K=2, seed=3)
    unused = 7 if not (idx == 7).any() else None
    oth = idx.clone()
    uses_3 = (idx == 3).any(-1)
    target = unused if unused is not None else 8  # a ninth expert nobody chose before
    oth[idx == 3] = target
    oth_p = torch.cat([p, torch.zeros(200, 1, dtype=p.dtype)], 1) if target == 8 else p
    ref_p = torch.cat([p, torch.zeros(200, 1, dtype=p.dtype)], 1) if target == 8 else p
    s = layer_shift(idx, ref_p, oth, oth_p)
    assert s.changed_any == pytest.approx(float(uses_3.double().mean()))
    assert s.changed_all == 0  # K=2 and only one of a token's experts moved
    assert s.top1_agreement == pytest.approx(1 - float((idx[:, 0] == 3).double().mean()))
    # the load moved from expert 3 to the target, nowhere else
    assert s.load_other[3] == 0 and s.load_other[target] == pytest.approx(s.load_ref[3] + s.load_ref[target])


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_random_routings_match_the_float64_reference(seed):
    idx, p = _routing(T=50, K=3, seed=seed)
    oidx, op = _routing(T=50, K=3, seed=seed + 10)
    s = layer_shift(idx, p, oidx, op)
    ref = reference_shift(idx, p, oidx, op)
    for k, v in ref.items():
        assert getattr(s, k) == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_batches_add_up_to_the_whole():
    idx, p = _routing(T=90, seed=4)
    oidx, op = _routing(T=90, seed=5)
    parts = [shift_counts(idx[a:b], p[a:b], oidx[a:b], op[a:b]) for a, b in ((0, 30), (30, 31), (31, 90))]
    total: ShiftCounts = parts[0] + parts[1] + parts[2]
    whole = shift_counts(idx, p, oidx, op)
    t, w = total.result(), whole.result()
    for k in ("tokens", "changed_any", "changed_half", "changed_all", "top1_agreement", "kl", "load_tv"):
        assert getattr(t, k) == pytest.approx(getattr(w, k), rel=1e-12), k
    assert t.load_ref == pytest.approx(w.load_ref) and t.load_other == pytest.approx(w.load_other)


def test_a_pruned_models_experts_are_mapped_back():
    idx, p = _routing(T=40, E=8, K=2, seed=6)
    kept = [0, 2, 3, 5, 6, 7]
    # the pruned model routes exactly as the reference restricted to the kept experts
    pk = p[:, kept] / p[:, kept].sum(-1, keepdim=True)
    oidx = pk.topk(2, -1).indices
    s = layer_shift(idx, p, oidx, pk, expert_map=kept)
    lost_any = ~torch.isin(idx, torch.tensor(kept)).all(-1)
    # a token changed exactly when one of its experts was removed
    assert s.changed_any == pytest.approx(float(lost_any.double().mean()))
    assert s.kl == pytest.approx(0, abs=1e-9)  # the same distribution over the kept experts
    assert s.load_other[1] == 0 and s.load_other[4] == 0
    with pytest.raises(ValueError, match="pass expert_map"):
        layer_shift(idx, p, oidx, pk)
    with pytest.raises(ValueError, match="expert_map: must name 6 distinct experts"):
        layer_shift(idx, p, oidx, pk, expert_map=[0, 0, 3, 5, 6, 7])


def test_mismatched_shapes_are_named():
    idx, p = _routing(T=10)
    with pytest.raises(ValueError, match="reference: expected topk_idx"):
        layer_shift(idx[:5], p, idx, p)
    with pytest.raises(ValueError, match="other: routes 5 tokens"):
        layer_shift(idx, p, idx[:5], p[:5])


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64,
                      moe=MoEConfig(n_experts=6, top_k=2, expert_ffn_dim=32))
    return Transformer(cfg).eval()


def test_the_recorder_sees_the_layers_own_routing_and_a_changed_router_shows_up(tmp_path, corpus):
    a = _model()
    b = _model()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 16))
    batches = [(x, x)]
    ra, la = record(a, batches)
    rb, lb = record(b, batches)
    assert la == lb and set(ra.calls) == {"layers.0.ffn", "layers.1.ffn"}
    idx, probs = ra.routing("layers.0.ffn")
    assert idx.shape == (32, 2) and probs.shape == (32, 6)
    same = compare_routings(ra, rb)
    assert all(s.changed_any == 0 and s.top1_agreement == 1 for s in same)
    with torch.no_grad():  # a perturbed router in layer 1 only: layer 0 keeps its routing
        b.layers[1].ffn.router.weight.add_(torch.randn_like(b.layers[1].ffn.router.weight))
    rb, _ = record(b, batches)
    moved = compare_routings(ra, rb)
    assert moved[0].changed_any == 0 and moved[1].changed_any > 0
    # the verb end to end: both checkpoints, the corpus's validation windows, the report files
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    rep = shift(tmp_path / "a", tmp_path / "b", corpus=str(corpus / "c.txt"), batches=2, batch_size=2,
                seq_len=32, out=tmp_path / "rep", plots=False, cache_dir=corpus / "cache", progress=False)
    assert rep.layers[0].changed_any == 0 and rep.layers[1].changed_any > 0 and rep.tokens == 2 * 2 * 32
    assert (tmp_path / "rep" / "shift.json").is_file()
    assert "| layers.1.ffn |" in (tmp_path / "rep" / "shift.md").read_text()
