"""`moekit compare` end to end on a tiny budget: results.json, report.md, plots, crossover."""

from __future__ import annotations

import json
import re

import pytest

from moekit.compare.runner import RESULT_FIELDS, compare, crossover_tokens, curve_crossover
from moekit.config import ModelConfig, MoEConfig
from moekit.host import probe_host
from moekit.train.trainer import DataSpec, TrainConfig


def tiny_moe() -> ModelConfig:
    return ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64,
                       moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32), name="tiny-cmp")


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "spawned"])
def test_compare_end_to_end(corpus, tmp_path, isolate):
    pytest.importorskip("matplotlib")
    tc = TrainConfig(steps=6, batch_size=2, seq_len=32, eval_every=3, eval_batches=2, log_every=2, dtype="fp32",
                     warmup_steps=1)
    res = compare(tiny_moe(), tc, DataSpec(corpus=str(corpus / "c.txt"), cache_dir=str(corpus / "cache")),
                  runs_dir=tmp_path, dense_total=not isolate, progress=False, isolate=isolate)
    out = tmp_path / "tiny-cmp"
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"].keys() == res["models"].keys()
    # the dtype and the host that produced the numbers (moekit.host), in results.json and the report
    assert saved["dtype"] == "fp32" and saved["dtype_requested"] == "fp32"
    assert saved["host"] == probe_host().to_dict() and saved["host"]["cpu_model"]
    labels = {"moe", "dense_active"} | ({"dense_total"} if not isolate else set())
    assert set(saved["models"]) == labels
    for label, m in saved["models"].items():
        for f in RESULT_FIELDS:
            assert m.get(f) is not None, (label, f)
        assert m["tokens_trained"] == 6 * 2 * 32
        assert len(m["curve"]) == 2 and m["peak_memory_bytes"] > 0 and m["decode_ms_per_token"] > 0
        # the first step (compilation) is reported apart; the throughput is the steady state's
        assert 0 < m["train_first_step_seconds"] < m["train_seconds"]
        steady = 5 * 2 * 32 / (m["train_seconds"] - m["train_first_step_seconds"])
        assert m["train_tokens_per_s"] == pytest.approx(steady, rel=1e-6)
        assert m["train_tokens_per_s_overall"] == pytest.approx(6 * 2 * 32 / m["train_seconds"], rel=1e-6)
    moe, dense = saved["models"]["moe"], saved["models"]["dense_active"]
    assert moe["total_params"] > dense["total_params"]
    assert abs(moe["active_params"] - dense["active_params"]) / moe["active_params"] < 0.01
    assert moe["config"]["moe"] is not None and dense["config"]["moe"] is None
    assert len(moe["expert_load"]) == 2 and moe["imbalance_curve"]
    report = (out / "report.md").read_text()
    assert f"dtype fp32; host {probe_host().cpu_model}, {probe_host().kind}" in report
    for section in ("| axis |", "total parameters", "active parameters", "forward FLOPs", "weight memory",
                    "final validation loss", "training wall-clock", "training tokens/s (after the first step)",
                    "first training step", "decode latency",
                    "batched prefill", "peak memory", "## Who wins what", "## Plots", "load imbalance"):
        assert section in report, section
    assert re.search(r"\*\*final validation loss[^*]*\*\*: (MoE wins|dense .* wins|a tie)", report)
    for png in ("loss_vs_tokens.png", "loss_vs_flops.png", "loss_vs_time.png", "expert_load.png",
                "load_imbalance.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in report


def test_compare_rejects_dense_config(tmp_path):
    with pytest.raises(ValueError, match="moe"):
        compare(ModelConfig(), runs_dir=tmp_path, plots=False)


def test_crossover_helpers():
    curve = [{"tokens": 100, "val_loss": 3.0}, {"tokens": 200, "val_loss": 2.0}, {"tokens": 300, "val_loss": 1.5}]
    assert crossover_tokens(curve, 2.5) == pytest.approx(150)
    assert crossover_tokens(curve, 1.0) is None
    dense = [{"tokens": 100, "val_loss": 2.5}, {"tokens": 200, "val_loss": 2.2}, {"tokens": 300, "val_loss": 2.0}]
    c = curve_crossover(curve, dense)
    assert c["direction"] == "moe_overtakes" and 100 < c["tokens"] < 200 and c["n_crossings"] == 1
    assert curve_crossover(dense, dense[:1] + [{"tokens": 200, "val_loss": 9.0}]) is None  # equal, never crosses
    # ahead, behind, ahead again: the last crossing is the one that holds to the end
    moe = [{"tokens": t, "val_loss": v} for t, v in [(1, 2.0), (2, 3.0), (3, 2.0), (4, 1.0)]]
    ref = [{"tokens": t, "val_loss": v} for t, v in [(1, 2.5), (2, 2.5), (3, 2.5), (4, 2.5)]]
    c = curve_crossover(moe, ref)
    assert c["direction"] == "moe_overtakes" and 2 < c["tokens"] < 3 and c["n_crossings"] == 2


def test_a_failed_compare_removes_its_partial_output(tmp_path, capsys):
    spec = DataSpec(corpus=str(tmp_path / "missing.txt"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        compare(tiny_moe(), TrainConfig(steps=1, dtype="fp32"), spec, runs_dir=tmp_path / "runs", plots=False)
    assert not (tmp_path / "runs" / "tiny-cmp").exists()
    assert "removed the partial" in capsys.readouterr().err
