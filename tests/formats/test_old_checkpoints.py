"""Checkpoints written before the layout change still load, compute the same logits, and resume.

``tests/data/run-739b182/`` is a ``moekit train`` run directory written by commit 739b182 (the flat layout):
preset tiny narrowed to d=16, 2 layers, 4 experts of 16, 2 steps in fp32, with ``expected_logits.json`` (the first
8 logits at each of 12 positions, computed by that commit).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import moekit
from moekit.train import TrainConfig, train
from moekit.train.data import prepare_data
from moekit.train.state import load_checkpoint

OLD_RUN = Path(__file__).resolve().parents[1] / "data" / "run-739b182"


def test_an_old_run_directory_loads_with_the_same_logits():
    expected = json.loads((OLD_RUN / "expected_logits.json").read_text())
    model = moekit.from_pretrained(OLD_RUN).eval()
    ids = torch.tensor([expected["input_ids"]])
    with torch.no_grad():
        logits = model(ids, aux=False).logits[0, :, :8]
    assert torch.allclose(logits, torch.tensor(expected["logits_first8"]), rtol=1e-5, atol=1e-6)


def test_an_old_run_resumes(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    (tmp_path / "c.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    data, tok = prepare_data(str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "cache"), progress=False)
    _, state, _ = load_checkpoint(run)
    assert state["step"] == 2
    tc = TrainConfig(**{**state["train_config"], "steps": 3})
    res = train(None, tc, data, run, tokenizer=tok, resume=True, progress=False)
    assert res.steps == 3 and load_checkpoint(run)[1]["step"] == 3
