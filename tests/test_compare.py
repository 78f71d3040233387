"""`moekit compare` end to end on a tiny budget; the CLI verbs; the README quickstart in tiny mode."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli import build_parser
from moekit.compare import RESULT_FIELDS, compare, crossover_tokens, curve_crossover
from moekit.config import ModelConfig, MoEConfig
from moekit.host import probe_host
from moekit.train import DataSpec, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"class C{i}:\n    def m(self, x):\n        return x + {i}\n\n" for i in range(300))


def tiny_moe() -> ModelConfig:
    return ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64,
                       moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32), name="tiny-cmp")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    (d / "c.txt").write_text(TEXT)
    return d


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


VERBS = ["compare", "train", "generate", "eval", "costs", "convert", "upcycle"]


def _moekit(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "moekit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb(verb):
    r = _moekit(verb, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: moekit {verb}" in r.stdout
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]
    for action in sub._actions:
        assert action.help, f"moekit {verb}: option {action.option_strings or action.dest} has no help text"


def test_costs_cli_json():
    r = _moekit("costs", "--preset", "mixtral-8x7b", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert abs(d["total_params"] / 46.7e9 - 1) < 0.01 and abs(d["active_params"] / 12.9e9 - 1) < 0.01


def test_cli_errors_are_clear(tmp_path):
    r = _moekit("train", "--out", str(tmp_path / "r"), "--corpus", str(tmp_path / "nope.txt"), "--steps", "1")
    assert r.returncode == 2 and "nope.txt" in r.stderr and "Traceback" not in r.stderr
    r = _moekit("costs", "--preset", "small", "--set", "moe.top_k=99")
    assert r.returncode != 0 and "top_k" in r.stderr
    r = _moekit("generate", str(tmp_path / "no-run"))
    assert r.returncode == 2 and "no-run" in r.stderr


def test_cli_train_generate_eval(corpus, tmp_path):
    run = tmp_path / "run"
    common = ["--corpus", str(corpus / "c.txt"), "--cache-dir", str(corpus / "cache")]
    r = _moekit("train", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                "--eval-every", "4", "--eval-batches", "1", "--out", str(run), "--quiet", *common)
    assert r.returncode == 0, r.stderr
    assert "trained 4 steps" in r.stdout
    r = _moekit("generate", str(run), "--prompt", "class ", "--max-new-tokens", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    r = _moekit("eval", str(run), "--max-batches", "1", "--batch-size", "2", "--seq-len", "32", "--json", *common)
    assert r.returncode == 0, r.stderr
    assert {"val_loss", "perplexity", "bits_per_byte"} <= set(json.loads(r.stdout))


def test_readme_quickstart_commands_in_tiny_mode(corpus, tmp_path):
    """The README's two set-up commands, run as written with extra arguments that make them tiny."""
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/compare.sh" in readme and "./scripts/test.sh" in readme
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("runs where the README's .venv exists (CI creates it through ./scripts/test.sh)")
    r = subprocess.run(["./scripts/compare.sh", "--preset", "tiny", "--steps", "2", "--batch-size", "2",
                        "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--quiet",
                        "--corpus", str(corpus / "c.txt"), "--cache-dir", str(corpus / "cache"),
                        "--runs-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "tiny" / "report.md").is_file()
    r = subprocess.run(["./scripts/test.sh", "tests/test_config.py"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "passed" in r.stdout


def test_cli_upcycle_convert_costs_on_hf_checkpoint(tmp_path):
    """HF llama -> `moekit upcycle` -> `moekit convert --to hf` -> transformers loads it, same logits."""
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    llama = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref = llama(ids).logits
    r = _moekit("upcycle", str(tmp_path / "llama"), str(tmp_path / "moe"), "--n-experts", "4", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    r = _moekit("convert", str(tmp_path / "moe"), str(tmp_path / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert float((mixtral(ids).logits - ref).abs().max() / ref.abs().max()) < 1e-4
    r = _moekit("costs", "--checkpoint", str(tmp_path / "hf"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_params"] == sum(p.numel() for p in mixtral.parameters())
    r = _moekit("convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "moekit")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "model.safetensors").is_file()
    r = _moekit("convert", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--to", "hf")
    assert r.returncode == 2 and "nowhere" in r.stderr
