"""Trainer, checkpoints, resume, error paths, eval and generate on tiny configs."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.train.data import prepare_data
from moekit.train.evaluation import eval_checkpoint, generate_text
from moekit.train.state import CheckpointError, latest_checkpoint, load_checkpoint, read_model
from moekit.train.trainer import NonFiniteLossError, TrainConfig, lr_at, train

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


def tiny(moe: bool = True, **moe_kw) -> ModelConfig:
    m = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=32, **moe_kw) if moe else None
    return ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64, moe=m, name="t")


def tcfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=10, eval_batches=2,
                log_every=5, dtype="fp32")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "code.txt").write_text(TEXT)
    ds, tok = prepare_data(str(d / "code.txt"), cache_dir=str(d / "cache"), progress=False)
    return ds, tok, d / "code.txt", d / "cache"


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_loss_falls(data, tmp_path, moe):
    ds, tok, _, _ = data
    res = train(tiny(moe, expert_bias=True), tcfg(steps=40, eval_every=20), ds, tmp_path, tokenizer=tok,
                progress=False)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in recs if "lm_loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert res.curve[-1]["val_loss"] < res.curve[0]["val_loss"] + 1e-6
    assert res.final_val_loss is not None and math.isfinite(res.final_val_loss)
    if moe:
        train_recs = [r for r in recs if "lm_loss" in r]
        assert len(train_recs[-1]["load_imbalance"]) == 2 and len(train_recs[-1]["dropped_frac"]) == 2
        assert len(res.expert_load) == 2 and abs(sum(res.expert_load[0]) - 1) < 1e-5


def test_first_step_is_reported_apart_from_the_steady_throughput(data, tmp_path, monkeypatch):
    """A slow first step (as torch.compile's) counts in the wall-clock and the overall tokens/s, not in the
    steady-state tokens/s."""
    import time

    from moekit.model.transformer import Transformer

    forward, calls = Transformer.forward, []

    def slow_first(self, *a, **k):
        if not calls:
            time.sleep(1.0)
        calls.append(1)
        return forward(self, *a, **k)

    monkeypatch.setattr(Transformer, "forward", slow_first)
    tc = tcfg(steps=4, eval_every=0)
    res = train(tiny(True), tc, data[0], tmp_path, tokenizer=data[1], progress=False)
    assert res.first_step_seconds >= 1.0 and res.train_seconds > res.first_step_seconds
    later = res.train_seconds - res.first_step_seconds
    assert res.steady_tokens_per_s == pytest.approx(3 * tc.tokens_per_step / later, rel=1e-6)
    assert res.tokens_per_s == pytest.approx(4 * tc.tokens_per_step / res.train_seconds, rel=1e-6)
    assert res.steady_tokens_per_s > 1.5 * res.tokens_per_s  # the 1 s first step weighs on this tiny run


def test_resume_equals_uninterrupted(data, tmp_path):
    ds, tok, _, _ = data
    cfg = tiny(True, expert_bias=True, input_jitter_eps=0.01)  # jitter exercises the torch RNG state too
    tc = tcfg(steps=20, grad_accum=2)
    full = train(cfg, tc, ds, tmp_path / "full", tokenizer=tok, progress=False)
    train(cfg, tc, ds, tmp_path / "split", tokenizer=tok, progress=False, stop_at=10)
    assert latest_checkpoint(tmp_path / "split").name == "step-000010"
    resumed = train(cfg, tc, ds, tmp_path / "split", tokenizer=tok, progress=False, resume=True)
    a, _, _ = load_checkpoint(tmp_path / "full")
    b, _, _ = load_checkpoint(tmp_path / "split")
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    assert resumed.final_val_loss == full.final_val_loss
    assert resumed.tokens == full.tokens

    def losses(run):
        return [json.loads(x).get("lm_loss") for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [x for x in losses("full") if x is not None] == [x for x in losses("split") if x is not None]


def test_checkpoint_round_trip_and_errors(data, tmp_path):
    ds, tok, _, _ = data
    train(tiny(True, expert_bias=True), tcfg(steps=4, eval_every=0), ds, tmp_path, tokenizer=tok, progress=False)
    ckpt = latest_checkpoint(tmp_path)
    model, state, tensors = load_checkpoint(tmp_path)
    again = read_model(ckpt)
    assert state["step"] == 4 and "optimizer" in tensors
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, again.state_dict()[k], rtol=0, atol=0)
    assert model.moe_layers[0].router.expert_bias.abs().sum() > 0  # the balancing bias was saved
    # corrupt weights
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    # missing file
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_model(ckpt)
    with pytest.raises(CheckpointError, match="no such run"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / ".." / "..")


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_data(str(tmp_path / "missing.txt"), cache_dir=str(tmp_path / "c"), progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        prepare_data(str(tmp_path / "empty.txt"), cache_dir=str(tmp_path / "c"), progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    ds, tok, _, _ = data
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 6:  # after step 6 the weights become NaN; step 7's loss is NaN
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(NonFiniteLossError, match="step 6"):
        train(tiny(True), tcfg(steps=12, save_every=5, eval_every=0), ds, tmp_path, tokenizer=tok, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-000005"
    model, state, _ = load_checkpoint(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedule():
    tc = tcfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1)
    assert lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(99, tc) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, tc) < lr_at(30, tc)


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")


def test_bf16_autocast_trains(data, tmp_path):
    ds, tok, _, _ = data
    res = train(tiny(True), tcfg(steps=6, dtype="bf16", eval_every=6), ds, tmp_path, tokenizer=tok, progress=False)
    assert math.isfinite(res.final_val_loss)


def test_eval_and_generate(data, tmp_path):
    ds, tok, path, cache = data
    train(tiny(True), tcfg(steps=30, eval_every=0), ds, tmp_path, tokenizer=tok, progress=False)
    res = eval_checkpoint(tmp_path, corpus=str(path), cache_dir=str(cache), batch_size=2, seq_len=32,
                          max_batches=2, progress=False)
    assert res["perplexity"] == pytest.approx(math.exp(res["val_loss"]))
    assert 0 < res["bits_per_byte"] < 8
    text = "".join(generate_text(tmp_path, "def ", max_new_tokens=20, temperature=0, seed=0))
    assert isinstance(text, str) and len(text) > 0
    again = "".join(generate_text(tmp_path, "def ", max_new_tokens=20, temperature=0, seed=0))
    assert text == again  # greedy decoding is deterministic


def test_shared_router_model_round_trips(tmp_path):
    from moekit.model.transformer import Transformer
    from moekit.train.state import write_model

    model = Transformer(tiny(True, shared_router=True, expert_bias=True))
    with torch.no_grad():
        model.moe_layers[0].router.expert_bias += 0.25
    write_model(model, tmp_path)
    again = read_model(tmp_path)
    assert again.moe_layers[0].router is again.moe_layers[1].router  # still one shared module
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_expert_parallel_training_matches_one_process_and_resumes_across_layouts(data, tmp_path):
    """`moekit train --nproc 2 --ep 2` (gloo, 2 processes) gives the losses of one process on the same global
    batches; a run stopped at ep=2 resumes in one process and ends exactly where one process ends."""
    from moekit.train.trainer import DataSpec, run_training

    _, _, path, cache = data
    spec = DataSpec(corpus=str(path), cache_dir=str(cache))
    cfg = tiny(True, expert_bias=True, z_loss_coef=1e-3)
    tc = tcfg(steps=8, eval_every=4, log_every=1, ep=1)
    one = run_training(cfg, tc, spec, tmp_path / "one", progress=False)
    two = run_training(cfg, dataclasses.replace(tc, ep=2), spec, tmp_path / "two", progress=False, nproc=2)

    def curve(run, key):
        recs = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in recs if key in r]

    np.testing.assert_allclose(curve("two", "lm_loss"), curve("one", "lm_loss"), rtol=0, atol=2e-5)
    np.testing.assert_allclose(curve("two", "load_imbalance"), curve("one", "load_imbalance"), rtol=0, atol=1e-6)
    assert two.final_val_loss == pytest.approx(one.final_val_loss, abs=2e-5)
    recv = curve("two", "ep/tokens_recv")
    assert recv and all(len(r) == 2 and sum(r) > 0 for r in recv)
    # stopped at ep=2 after 4 steps, resumed in one process: ends where the single-process run ends
    run_training(cfg, dataclasses.replace(tc, ep=2), spec, tmp_path / "mixed", progress=False, nproc=2, stop_at=4)
    assert latest_checkpoint(tmp_path / "mixed").name == "step-000004"
    mixed = run_training(cfg, tc, spec, tmp_path / "mixed", progress=False, resume=True)
    assert mixed.final_val_loss == pytest.approx(one.final_val_loss, abs=2e-5)
    a, _, _ = load_checkpoint(tmp_path / "one")
    b, _, _ = load_checkpoint(tmp_path / "mixed")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-4, msg=k)
