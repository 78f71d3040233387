"""``compress`` end to end on tiny models: the budget holds in effective bits, the checkpoint loads and generates,
8-bit logits stay close to the original, every method runs, and bad input fails before anything is written."""

from __future__ import annotations

import pytest
import torch

from moekit.compress import compress, load_compressed
from moekit.compress.modules import QuantizedExperts, QuantizedLinear, QuantizedMLP, quantized_modules
from moekit.config import ModelConfig, MoEConfig
from moekit.model.generate import sample_tokens
from moekit.model.transformer import Transformer


def _src(tmp_path, seed=0, moe=True, **kw):
    torch.manual_seed(seed)
    m = MoEConfig(n_experts=6, top_k=2, expert_ffn_dim=64, n_shared_experts=1) if moe else None
    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64, moe=m, **kw)
    model = Transformer(cfg)
    with torch.no_grad():  # peaked routing: experts see unequal shares of the tokens
        for blk in model.layers:
            if moe:
                blk.ffn.router.weight.mul_(30)
    path = tmp_path / f"src{seed}"
    model.save_pretrained(path)
    return model.eval(), path


def _calib(corpus):
    return dict(calib=str(corpus / "c.txt"), cache_dir=corpus / "cache", calib_sequences=8, eval_batches=2,
                progress=False)


@pytest.mark.parametrize("seed", (0, 1))
def test_mixed_compress_holds_the_budget_loads_and_generates(tmp_path, corpus, seed):
    model, src = _src(tmp_path, seed)
    res = compress(src, tmp_path / "dst", 3.3, method="rtn", group_size=32, **_calib(corpus))
    assert res.effective_bits <= 3.3 and res.allocation_exact
    # the stored file says the same: every packed, scale and zero byte over the quantized weights
    q = load_compressed(tmp_path / "dst")
    mods = quantized_modules(q)
    nbytes = sum(b.numel() * b.element_size() for m in mods.values() for b in m.buffers())
    assert 8 * nbytes / res.quantized_weights == pytest.approx(res.effective_bits)
    assert res.weight_bytes_after == nbytes and res.weight_bytes_before == 4 * res.quantized_weights
    widths = [b for m in mods.values() if isinstance(m, QuantizedExperts) for b in m.widths]
    assert len(set(widths)) > 1  # mixed: the allocation did give experts different widths
    assert res.val_loss_before is not None and res.val_loss_after is not None
    assert sorted(res.routing) == ["layers.0.ffn", "layers.1.ffn"]
    toks = list(sample_tokens(q, [1, 2, 3], max_new_tokens=6, seed=0))
    assert len(toks) == 6 and all(0 <= t < 256 for t in toks)
    assert toks == list(sample_tokens(q, [1, 2, 3], max_new_tokens=6, seed=0))


def test_eight_bit_logits_are_close_to_the_original(tmp_path):
    model, src = _src(tmp_path)
    # rows of 32 and 64 columns: groups of 128 clamp to the row, so 8-bit costs 9 and 8.5 effective bits
    res = compress(src, tmp_path / "dst", 9.0, method="rtn", mixed=False, quantize_dense=True, progress=False)
    assert set(b for w in res.widths.values() for b in (w if isinstance(w, list) else [w])) == {8}
    q = load_compressed(tmp_path / "dst")
    assert any(isinstance(m, QuantizedLinear) for m in q.modules())
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids).logits
    assert (got - ref).abs().max() < 0.02 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("method,kw", [("hqq", {}), ("gptq", {}), ("gptq", {"calibrate_all_experts": True,
                                                                          "act_order": True, "scope": "global"})])
def test_every_method_runs_and_stays_close(tmp_path, corpus, method, kw):
    model, src = _src(tmp_path)
    res = compress(src, tmp_path / "dst", 4.5, method=method, group_size=32, **kw, **_calib(corpus))
    assert res.effective_bits <= 4.5 and res.method == method
    # losses are close to the source's (a random model: both near ln 256)
    assert abs(res.val_loss_after - res.val_loss_before) < 0.05
    assert isinstance(load_compressed(tmp_path / "dst").layers[0].ffn.shared, QuantizedMLP)


def test_gptq_beats_rtn_at_two_bits_on_the_layer_output(tmp_path, corpus):
    _, src = _src(tmp_path)
    rtn = compress(src, tmp_path / "rtn", 3.0, method="rtn", group_size=32, mixed=False, **_calib(corpus))
    gptq = compress(src, tmp_path / "gptq", 3.0, method="gptq", group_size=32, mixed=False, **_calib(corpus))
    assert rtn.effective_bits == gptq.effective_bits == 3.0  # 2-bit codes + fp16 scale and zero per 32
    assert gptq.val_loss_after <= rtn.val_loss_after + 1e-3


def test_a_dense_model_says_why_or_quantizes_its_dense_layers(tmp_path):
    _, src = _src(tmp_path, moe=False)
    with pytest.raises(ValueError, match="no MoE layers.*quantize_dense=True"):
        compress(src, tmp_path / "dst", 4.0, progress=False)
    assert not (tmp_path / "dst").exists()
    # whole-row groups (rows of 32 or 64 columns < 128): 4-bit costs 5 or 4.5 effective bits, 8-bit 9 or 8.5
    res = compress(src, tmp_path / "dst", 5.0, quantize_dense=True, progress=False)
    assert 4.5 < res.effective_bits <= 5.0 and set(res.widths.values()) == {4}
    kinds = {type(m) for m in quantized_modules(load_compressed(tmp_path / "dst")).values()}
    assert kinds == {QuantizedLinear, QuantizedMLP}


def test_bad_input_fails_before_anything_is_written(tmp_path, corpus):
    _, src = _src(tmp_path)
    dst = tmp_path / "dst"
    with pytest.raises(ValueError, match=r"bits: a budget of 2 bits per weight is below the smallest width: 2-bit"):
        compress(src, dst, 2.0, group_size=32, progress=False)
    with pytest.raises(ValueError, match="unsupported width 5"):
        compress(src, dst, 4.0, widths=(4, 5), progress=False)
    with pytest.raises(ValueError, match="'gptq' needs calibration text"):
        compress(src, dst, 4.0, method="gptq", progress=False)
    with pytest.raises(ValueError, match="method: unknown value 'awq'"):
        compress(src, dst, 4.0, method="awq", progress=False)
    with pytest.raises(ValueError, match="group_size"):
        compress(src, dst, 4.0, group_size=100, progress=False)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src0"]
