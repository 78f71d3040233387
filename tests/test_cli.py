"""The command line: every verb's help, one bad value per numeric flag, clear errors, no partial outputs, the
checkpoint paths the Python API accepts too, and the README quickstart in tiny mode."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli import NONNEGATIVE_FLOAT, NONNEGATIVE_INT, PORT, POSITIVE_FLOAT, POSITIVE_INT, build_parser

ROOT = Path(__file__).resolve().parents[1]


VERBS = ["compare", "train", "generate", "eval", "costs", "convert", "compress", "upcycle", "serve"]


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


# the positional arguments each verb needs before a flag can be checked on its own
_REQUIRED = {"train": ["--out", "x"], "generate": ["ckpt"], "eval": ["ckpt"], "convert": ["a", "b", "--to", "hf"],
             "upcycle": ["a", "b"], "compare": [], "costs": [], "compress": ["a", "b", "--bits", "4"],
             "serve": ["ckpt"], "shift": ["a", "b"], "prune": ["a", "b"]}
_BAD = {POSITIVE_INT.expects: "0", NONNEGATIVE_INT.expects: "-1", POSITIVE_FLOAT.expects: "0",
        NONNEGATIVE_FLOAT.expects: "-0.5", PORT.expects: "65536"}


def _numeric_flags():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for verb, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and getattr(action.type, "expects", None):
                yield verb, action.option_strings[0], action.type.expects


NUMERIC_FLAGS = list(_numeric_flags())


def test_every_numeric_flag_is_validated():
    """No flag takes a bare int/float: each names what it accepts (a test below tries a bad value on each)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [(verb, a.option_strings[0]) for verb, p in sub.choices.items() for a in p._actions
            if a.option_strings and a.type in (int, float)]
    assert not bare
    assert len(NUMERIC_FLAGS) > 40 and {v for v, _, _ in NUMERIC_FLAGS} == set(_REQUIRED)


@pytest.mark.parametrize("verb, flag, expects", NUMERIC_FLAGS, ids=[f"{v}{f}" for v, f, _ in NUMERIC_FLAGS])
def test_one_bad_value_per_numeric_flag(capsys, verb, flag, expects):
    for bad in (_BAD[expects], "abc"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([verb, *_REQUIRED[verb], flag, bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and f"expected {expects}, got" in err and bad in err, err


def test_generate_with_a_negative_token_count_is_an_error(tmp_path):
    r = _moekit("generate", str(tmp_path), "--max-new-tokens", "-3")
    assert r.returncode == 2 and "--max-new-tokens: expected an integer >= 1, got -3" in r.stderr


def test_every_preset_trains_with_no_flags():
    """seq_len defaults to 256, or to the preset's context where that is shorter (preset tiny: 128)."""
    from moekit.model.presets import PRESETS, get_preset
    from moekit.train import TrainConfig

    for name in PRESETS:
        cfg = get_preset(name)
        tc = TrainConfig().for_model(cfg)
        assert tc.seq_len == min(256, cfg.max_seq_len), name
    with pytest.raises(ValueError, match=r"seq_len: 999 tokens exceed the model's context \(max_seq_len=128\)"):
        TrainConfig(seq_len=999).for_model(get_preset("tiny"))


def test_train_with_the_tiny_preset_defaults_then_every_path_to_its_checkpoint(corpus, tmp_path):
    """`moekit train --preset tiny` with no sequence flags; then the run directory, checkpoints/, the latest
    pointer and the step directory all load, from the CLI and from Python alike."""
    run = tmp_path / "run"
    common = ["--corpus", str(corpus / "c.txt"), "--cache-dir", str(corpus / "cache")]
    r = _moekit("train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--out",
                str(run), "--quiet", *common)
    assert r.returncode == 0, r.stderr
    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    ref = moekit.from_pretrained(step).state_dict()
    for path in (run, run / "checkpoints", run / "checkpoints" / "latest", step):
        state = moekit.from_pretrained(path).state_dict()
        assert all(torch.equal(state[k], v) for k, v in ref.items()), path
    r = _moekit("generate", str(run / "checkpoints" / "latest"), "--max-new-tokens", "3", "--seed", "0")
    assert r.returncode == 0, r.stderr  # the CLI resolves through the same function (moekit.formats.paths)
    with pytest.raises(moekit.CheckpointError, match="not a checkpoint directory"):
        moekit.from_pretrained(tmp_path)
    # the user's own benchmark of a checkpoint on this host
    r = _moekit("generate", str(run), "--benchmark", "--prompt-tokens", "16", "--max-new-tokens", "4", "--rounds", "1",
                "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert b["prompt_tokens"] == 16 and b["prompt_tokens_per_s"] > 0 and b["decode_tokens_per_s"] > 0
    assert b["weight_bytes_per_decode_token"] > 0 and 0 < b["bandwidth_fraction"] < 5 and b["host"]["kind"]
    r = _moekit("generate", str(run), "--benchmark", "--prompt-tokens", "200", "--max-new-tokens", "4")
    assert r.returncode == 2 and "the model's context is 128" in r.stderr


def test_a_failed_train_leaves_no_run_directory(corpus, tmp_path):
    common = ["--corpus", str(corpus / "c.txt"), "--cache-dir", str(corpus / "cache"), "--quiet"]
    r = _moekit("train", "--preset", "tiny", "--seq-len", "999", "--steps", "1", "--out", str(tmp_path / "a"), *common)
    assert r.returncode == 2 and "seq_len: 999 tokens exceed" in r.stderr and not (tmp_path / "a").exists()
    # fails inside the trainer, after the run directory was made (a non-finite loss before any checkpoint): removed
    r = _moekit("train", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--lr", "1e30", "--warmup-steps",
                "0", "--eval-every", "0", "--out", str(tmp_path / "b"), *common)
    assert r.returncode == 2 and "loss is" in r.stderr and not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()  # an existing directory is the user's: kept
    r = _moekit("train", "--preset", "tiny", "--seq-len", "999", "--out", str(tmp_path / "c"), *common)
    assert r.returncode == 2 and (tmp_path / "c").is_dir()


def test_a_failed_convert_leaves_nothing(tmp_path):
    from moekit.config import ModelConfig, MoEConfig

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16, n_shared_experts=1,
                                    shared_expert_gate=True))
    moekit.Transformer(cfg).save_pretrained(tmp_path / "src")
    r = _moekit("convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hf", "--arch", "mixtral")
    assert r.returncode == 2 and "mixtral" in r.stderr
    assert not (tmp_path / "dst").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
