"""``moekit compress --sweep``: every budget compressed uniform and mixed, the report, its JSON and plots written
in one piece, nothing left behind by a failure."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main
from moekit.compress.sweep import parse_budgets, sweep
from moekit.config import ModelConfig, MoEConfig
from moekit.model.transformer import Transformer


def _src(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64,
                      moe=MoEConfig(n_experts=6, top_k=2, expert_ffn_dim=64))
    model = Transformer(cfg)
    with torch.no_grad():
        for blk in model.layers:
            blk.ffn.router.weight.mul_(30)  # peaked routing: the mixed allocation has unequal experts to work with
    model.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_sweep_writes_the_report_json_and_plots(tmp_path, corpus):
    pytest.importorskip("matplotlib")
    src = _src(tmp_path)
    out = tmp_path / "sweep"
    res = sweep(src, out, [8, 3.5], group_size=32, calib=str(corpus / "c.txt"), seeds=2, decode_tokens=2,
                progress=False, cache_dir=corpus / "cache", calib_sequences=8, eval_batches=2)
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json", "sweep.png", "widths.png"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    runs = res["runs"]
    assert [(r["bits"], r["allocation"], r["seed"]) for r in runs] == [
        (8, "uniform", 0), (3.5, "uniform", 0), (8, "mixed", 0), (8, "mixed", 1), (3.5, "mixed", 0),
        (3.5, "mixed", 1)]
    for r in runs:
        assert r["effective_bits"] <= r["bits"] + 1e-9
        assert r["perplexity_after"] > 0 and r["decode_tokens_per_s"] > 0 and r["decode_vs_source"] > 0
        assert len(r["expert_widths"]) == 2 and all(len(w) == 6 for w in r["expert_widths"])
    three = [r for r in runs if r["bits"] == 3.5]  # (g32: 2-bit costs 3.0 bits, 3-bit 4.0)
    assert len({b for w in three[1]["expert_widths"] for b in w}) > 1  # mixed gave the experts different widths
    assert three[0]["compression"] > 4 and runs[0]["compression"] > 2  # fp32 source: 8-bit codes are > 2x smaller
    report = (out / "report.md").read_text()
    assert "| 3.5 | mixed |" in report and "| 8 | uniform |" in report and "Source perplexity" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sweep.")]  # the work directory was renamed


def test_a_failed_sweep_leaves_nothing_and_bad_input_is_named(tmp_path):
    src = _src(tmp_path)
    out = tmp_path / "sweep"
    with pytest.raises(ValueError):
        sweep(src, out, [4, 1], group_size=32, decode_tokens=2, plots=False, progress=False)  # 1 bit: no width fits
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".sweep.")]
    out.mkdir()
    with pytest.raises(ValueError, match="exists"):
        sweep(src, out, [4], plots=False, progress=False)
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_budgets("8,x")
    with pytest.raises(ValueError, match="positive"):
        parse_budgets("4,-2")
    assert parse_budgets("8,4,2.5") == [8.0, 4.0, 2.5]


def test_the_cli_sweeps_without_plots_and_refuses_mixed_arguments(tmp_path, capsys):
    src = _src(tmp_path)
    assert main(["compress", str(src), "--sweep", "8,4", "--out", str(tmp_path / "s"), "--group-size", "32",
                 "--no-plots", "--decode-tokens", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["report.md", "results.json"]
    assert "| 4 | uniform |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no DST"):
        main(["compress", str(src), str(tmp_path / "d"), "--sweep", "8,4", "--out", str(tmp_path / "s2")])
    with pytest.raises(SystemExit, match="--bits B"):
        main(["compress", str(src), str(tmp_path / "d")])
    assert main(["compress", str(src), "--sweep", "8,4", "--out", str(tmp_path / "s")]) == 2  # exists
