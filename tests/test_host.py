"""The host probe and the dtype resolver: ``auto`` is bf16 only where the device computes bf16 natively."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hosts import fake_host

import moekit.host as host_mod
from moekit.cli import DTYPE_CHOICES as CLI_CHOICES
from moekit.cli import build_parser
from moekit.config import ModelConfig, MoEConfig
from moekit.host import DTYPE_CHOICES, probe_host, resolve_dtype, weights_dtype
from moekit.train.data import prepare_data
from moekit.train.trainer import TrainConfig, train

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind, expected", [("AVX2", "fp32"), ("AVX-512", "fp32"), ("AVX-512-BF16", "bf16"),
                                            ("AMX", "bf16"), ("ARM", "fp32"), ("ARM-BF16", "bf16")])
def test_auto_resolves_by_host_kind(kind, expected):
    h = fake_host(kind)
    assert h.kind == kind
    assert resolve_dtype("auto", CPU, host=h) == expected
    assert h.native_bf16 == (expected == "bf16")


def test_avx512_bf16_flags_under_avx2_kernels_are_not_native():
    """ATEN_CPU_CAPABILITY=avx2 on an AVX-512-BF16 CPU: ATen's AVX2 kernels emulate bf16, so auto is fp32."""
    h = host_mod.HostInfo(cpu_model="x", machine="x86_64", cpu_capability="AVX2",
                          flags=("avx2", "avx512f", "avx512_bf16"), cpu_count=2)
    assert h.kind == "AVX2" and not h.native_bf16
    assert resolve_dtype("auto", CPU, host=h) == "fp32"


@pytest.mark.parametrize("cuda_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_device(monkeypatch, cuda_bf16, expected):
    monkeypatch.setattr(host_mod, "cuda_native_bf16", lambda device: cuda_bf16)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("auto", "cuda:0") == expected


@pytest.mark.parametrize("kind", ["AVX2", "AVX-512-BF16", "AMX"])
@pytest.mark.parametrize("explicit", ["bf16", "fp32"])
def test_explicit_values_are_kept(kind, explicit):
    assert resolve_dtype(explicit, CPU, host=fake_host(kind)) == explicit


def test_explicit_bf16_on_a_host_without_native_bf16_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(host_mod, "_WARNED", set())
    avx2 = fake_host("AVX2")
    with caplog.at_level(logging.WARNING, logger="moekit"):
        assert resolve_dtype("bf16", CPU, host=avx2) == "bf16"
        assert resolve_dtype("bf16", CPU, host=avx2) == "bf16"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "\n" not in msg and "emulates" in msg and "slower" in msg and "test CPU (AVX2)" in msg
    caplog.clear()
    monkeypatch.setattr(host_mod, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="moekit"):
        resolve_dtype("bf16", CPU, host=fake_host("AVX-512-BF16"))
        resolve_dtype("auto", CPU, host=avx2)
    assert not caplog.records  # native bf16, and auto (which picks fp32 there), say nothing


@pytest.mark.parametrize("bad", ["fp8", "auto16", "float16", ""])
def test_bad_dtype_values_name_the_choices(bad):
    with pytest.raises(ValueError, match=r"dtype: expected one of auto, bf16, fp32, got"):
        resolve_dtype(bad, CPU)
    with pytest.raises(ValueError, match=r"dtype: expected one of auto, bf16, fp32"):
        TrainConfig(dtype=bad)
    with pytest.raises(ValueError, match=r"dtype: expected one of auto, bf16, fp32"):
        weights_dtype(bad, torch.float32)


@pytest.mark.parametrize("verb", ["train --out x", "compare", "generate ckpt", "eval ckpt"])
@pytest.mark.parametrize("bad", ["fp8", "auto16"])
def test_cli_rejects_bad_dtypes_listing_the_choices(capsys, verb, bad):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*verb.split(), "--dtype", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and all(repr(c) in err for c in DTYPE_CHOICES)


def test_cli_choices_are_the_resolvers():
    assert CLI_CHOICES == DTYPE_CHOICES
    assert build_parser().parse_args(["train", "--out", "x"]).dtype is None  # -> TrainConfig's default, auto
    assert TrainConfig().dtype == "auto"
    assert build_parser().parse_args(["generate", "ckpt"]).dtype == "auto"


@pytest.mark.parametrize("kind", ["AVX2", "AVX-512-BF16"])
def test_inference_weights_dtype(kind):
    h = fake_host(kind)
    native = kind != "AVX2"
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert weights_dtype(None, bf16, CPU, host=h) == (bf16 if native else fp32)  # a bf16 checkpoint
    assert weights_dtype("auto", bf16, CPU, host=h) == (bf16 if native else fp32)
    assert weights_dtype(None, fp32, CPU, host=h) == fp32  # never cast down unasked
    assert weights_dtype(None, fp16, CPU, host=h) == fp32
    assert weights_dtype("bf16", fp32, CPU, host=h) == bf16  # asked for: kept (with a warning where emulated)
    assert weights_dtype("fp32", bf16, CPU, host=h) == fp32
    assert weights_dtype(torch.float64, bf16, CPU, host=h) == torch.float64


def test_from_pretrained_picks_the_compute_dtype_for_the_host(tmp_path, monkeypatch):
    import moekit

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16))
    moekit.Transformer(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for kind, expected in [("AVX2", torch.float32), ("AVX-512-BF16", torch.bfloat16)]:
        monkeypatch.setattr(host_mod, "probe_host", lambda kind=kind: fake_host(kind))
        assert moekit.from_pretrained(tmp_path / "bf16").tok_emb.weight.dtype == expected
        assert moekit.from_pretrained(tmp_path / "bf16", dtype="stored").tok_emb.weight.dtype == torch.bfloat16
        assert moekit.from_pretrained(tmp_path / "bf16", dtype="fp32").tok_emb.weight.dtype == torch.float32


def test_probe_reads_this_host_and_the_override(monkeypatch):
    h = probe_host()
    assert h.cpu_model and h.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert h.to_dict()["kind"] == h.kind and json.dumps(h.to_dict())
    assert h.kind in h.describe()
    probe_host.cache_clear()
    try:
        monkeypatch.setenv("MOEKIT_HOST_FLAGS", "avx2")
        assert probe_host().flags == ("avx2",) and not probe_host().native_bf16
    finally:
        monkeypatch.delenv("MOEKIT_HOST_FLAGS")
        probe_host.cache_clear()


def test_train_config_json_records_the_dtype_and_the_host(tmp_path):
    (tmp_path / "c.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    ds, tok = prepare_data(str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "cache"), progress=False)
    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16))
    tc = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=0, log_every=1, warmup_steps=1)  # dtype auto
    train(cfg, tc, ds, tmp_path / "run", tokenizer=tok, progress=False)
    rec = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert rec["dtype_requested"] == "auto"
    assert rec["dtype"] == resolve_dtype("auto", CPU)
    assert rec["host"] == probe_host().to_dict() and rec["device"] == "cpu"
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["train_config"]["dtype"] == rec["dtype"]  # the checkpoint keeps what ran
