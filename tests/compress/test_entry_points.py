"""A compressed checkpoint through the entry points every checkpoint has: ``moekit compress`` on the command line,
``moekit.from_pretrained``, ``moekit generate`` and ``moekit costs --checkpoint``; and generation from it takes the
reference step (its weights are packed, not the tensors the decode kernels read), with the same tokens."""

from __future__ import annotations

import json

import torch
from test_runner import _src

import moekit
import moekit.model.decode as decode
from moekit.cli import main
from moekit.compress.modules import quantized_modules
from moekit.model.generate import sample_tokens
from moekit.model.transformer import KVCache


def test_the_cli_compresses_and_every_entry_point_reads_the_result(tmp_path, capsys):
    _, src = _src(tmp_path)
    dst = tmp_path / "q4"
    assert main(["compress", str(src), str(dst), "--bits", "4.5", "--group-size", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["effective_bits"] <= 4.5 and res["compression"] > 1
    model = moekit.from_pretrained(dst)
    assert quantized_modules(model)  # the packed modules, not a dequantized copy
    assert main(["costs", "--checkpoint", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] > 0
    assert main(["compress", str(src), str(tmp_path / "bad"), "--bits", "1"]) == 2
    assert "bits" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_generation_from_a_compressed_model_takes_the_reference_step(tmp_path, capsys):
    _, src = _src(tmp_path)
    dst = tmp_path / "q8"
    assert main(["compress", str(src), str(dst), "--bits", "9", "--group-size", "32", "--dense", "--json"]) == 0
    capsys.readouterr()
    model = moekit.from_pretrained(dst).eval()
    cache = KVCache(model.config, 1, max_len=16)
    assert not decode.fast_path_applies(model, torch.tensor([[1]]), cache)
    ids = [3, 1, 4, 1, 5]
    out = list(sample_tokens(model, ids, 8, temperature=0.0))
    ref, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(8):
            ref.append(int(model(torch.tensor([seq]), aux=False).logits[0, -1].argmax()))
            seq.append(ref[-1])
    assert out == ref
