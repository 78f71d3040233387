"""The compressed checkpoint directory: save/load is bit-exact, and a bad file (a packed tensor of the wrong shape,
a missing scale, a wrong dtype, a width outside 2/3/4/8) is a clear error naming the tensor; a failed write leaves
nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.compress import CompressedCheckpointError, compress, load_compressed
from moekit.compress import checkpoint as ckpt_mod
from moekit.compress.modules import QuantizedExperts, quantized_modules
from moekit.config import ModelConfig, MoEConfig
from moekit.model.transformer import Transformer


def tiny_config(**kw) -> ModelConfig:
    moe = MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=48, n_shared_experts=1, shared_expert_gate=True)
    return ModelConfig(**{**dict(vocab_size=96, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=48, moe=moe),
                          **kw})


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = Transformer(tiny_config(first_dense_layers=1, n_layers=3)).to(torch.bfloat16)
    model.save_pretrained(d / "src")
    res = compress(d / "src", d / "dst", 6.0, method="hqq", group_size=32, quantize_dense=True, dense_bits=8,
                   progress=False)
    return d, res


def test_save_load_is_bit_exact(compressed, tmp_path):
    d, res = compressed
    model = load_compressed(d / "dst")
    state = model.state_dict()
    stored = load_file(str(d / "dst" / "model.safetensors"))
    assert set(stored) <= set(state)
    for k, v in stored.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert model.tok_emb.weight.dtype == torch.bfloat16  # the float tensors keep the stored dtype
    q = quantized_modules(model)
    assert {p: (m.widths if isinstance(m, QuantizedExperts) else None) for p, m in q.items() if
            isinstance(m, QuantizedExperts)} == {p: w for p, w in res.widths.items() if p.endswith("experts")}
    # saved again and loaded again: the same bytes, the same logits
    ckpt_mod.save_compressed(model, tmp_path / "again", json.loads((d / "dst" / "config.json").read_text())
                             ["quantization"])
    again = load_compressed(tmp_path / "again")
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def test_packed_tensor_of_the_wrong_shape_names_it(compressed, tmp_path):
    d, _ = compressed
    names = {}

    def cut(t):
        names["k"] = k = next(k for k in sorted(t) if ".experts.w_in.b" in k and k.endswith(".packed"))
        t[k] = t[k][..., :-1].contiguous()

    bad = _rewrite(d / "dst", tmp_path / "bad", cut)
    with pytest.raises(ValueError, match=rf"tensor {names['k']} has shape"):
        load_compressed(bad)


def test_missing_scale_names_it(compressed, tmp_path):
    d, _ = compressed
    names = {}

    def drop(t):
        names["k"] = k = _first(t, "shared.w_out.scales")
        del t[k]

    with pytest.raises(CompressedCheckpointError, match=r"missing tensor layers\.1\.ffn\.shared\.w_out\.scales"):
        load_compressed(_rewrite(d / "dst", tmp_path / "bad", drop))
    assert names["k"] == "layers.1.ffn.shared.w_out.scales"


def test_wrong_dtype_names_the_tensor(compressed, tmp_path):
    d, _ = compressed

    def widen(t):
        k = "layers.0.attn.wq.weight.scales"
        t[k] = t[k].float()

    with pytest.raises(ValueError, match=r"tensor layers.0.attn.wq.weight.scales: expected torch.float16"):
        load_compressed(_rewrite(d / "dst", tmp_path / "bad", widen))


def test_unsupported_width_in_the_config_names_the_module(compressed, tmp_path):
    d, _ = compressed

    def five(cfg):
        cfg["quantization"]["modules"]["layers.1.ffn.experts"]["bits"][0] = 5

    with pytest.raises(ValueError, match=r"layers.1.ffn.experts.*unsupported width 5"):
        load_compressed(_rewrite(d / "dst", tmp_path / "bad", edit_config=five))

    def unknown(cfg):
        cfg["quantization"]["modules"]["layers.9.ffn.experts"] = {"kind": "experts", "bits": [4] * 4}

    with pytest.raises(ValueError, match="layers.9.ffn.experts"):
        load_compressed(_rewrite(d / "dst", tmp_path / "bad2", edit_config=unknown))
    with pytest.raises(ValueError, match="no 'quantization' section"):
        load_compressed(_rewrite(d / "dst", tmp_path / "bad3", edit_config=lambda c: c.pop("quantization")))


def test_a_failed_write_leaves_no_directory(compressed, tmp_path, monkeypatch):
    d, _ = compressed
    model = load_compressed(d / "dst")
    section = json.loads((d / "dst" / "config.json").read_text())["quantization"]

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "atomic_write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt_mod.save_compressed(model, tmp_path / "out", section)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
