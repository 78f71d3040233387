"""Hugging Face interop: every supported architecture loads with the same logits, exports back, and fails loudly.

Tiny random models are built locally with ``transformers`` config classes (no hub access), with weights
drawn large enough that routing is far from uniform, and with every feature of the issue switched on:
sliding windows (mixtral, mistral, qwen2_moe, gpt_oss), shared experts with and without the sigmoid gate,
dense first layers and MoE every N layers, group-limited routing (softmax/max and sigmoid/top-2-sum), the
correction bias and the routed scaling factor, MLA with and without q LoRA, qk-norm per head and full
width, clip_qkv, gpt-oss sinks / biases / clamped SwiGLU / interleaved experts, YaRN and Llama-3 RoPE.
Logits are compared in float32 within 1e-4 relative to the largest logit. Each architecture also has
negative controls: one documented detail is perturbed and the logits must move far beyond that tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from archs import hf_configs, randomize  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import moekit  # noqa: E402
from moekit.formats import UnsupportedCheckpointError, config_of, convert, export_hf, from_pretrained  # noqa: E402
from moekit.formats.checkpoint import CheckpointError  # noqa: E402
from moekit.model.transformer import KVCache, Transformer  # noqa: E402

RTOL = 1e-4
SEQ = 12  # longer than every sliding window below
_configs = hf_configs
_randomize = randomize
ARCHS = list(_configs())


def _ids(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 100, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


_CACHE: dict[str, tuple[Path, torch.Tensor]] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf")


def hf_checkpoint(arch: str, root: Path) -> tuple[Path, torch.Tensor]:
    """(directory of a saved tiny random HF model of ``arch``, its logits on ``_ids()``), built once."""
    if arch not in _CACHE:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_configs()[arch]()).eval()
        _randomize(model)
        d = root / arch
        model.save_pretrained(d)
        with torch.no_grad():
            _CACHE[arch] = (d, model(_ids()).logits)
    return _CACHE[arch]


def _hf_logits(path: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(_ids()).logits


@torch.no_grad()
def _moekit_logits(model: Transformer, ids: torch.Tensor | None = None) -> torch.Tensor:
    return model.eval()(_ids() if ids is None else ids).logits


# ---------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("arch", ARCHS)
def test_load_matches_transformers(arch: str, workdir: Path) -> None:
    path, ref = hf_checkpoint(arch, workdir)
    model = moekit.from_pretrained(path)
    assert isinstance(model, Transformer) and model.config.hf_arch == arch
    out = model.eval()(_ids())
    assert _rel(out.logits, ref) < RTOL
    for stats in out.stats:  # routing is far from uniform, so a routing bug cannot hide
        if stats is not None:
            E = stats.routed_per_expert.numel()
            assert float(stats.router_entropy) < 0.85 * math.log(E)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers_with_same_logits(arch: str, workdir: Path) -> None:
    path, ref = hf_checkpoint(arch, workdir)
    model = from_pretrained(path)
    out = export_hf(model, workdir / f"{arch}-export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert _rel(_hf_logits(out), ref) < RTOL
    # the exported tensor names are the ones transformers itself writes
    assert set(load_file(out / "model.safetensors")) == set(load_file(path / "model.safetensors"))


@pytest.mark.parametrize("arch", ARCHS)
def test_moekit_format_roundtrip(arch: str, workdir: Path) -> None:
    path, ref = hf_checkpoint(arch, workdir)
    model = from_pretrained(path)
    model.save_pretrained(workdir / f"{arch}-moekit")
    again = moekit.from_pretrained(workdir / f"{arch}-moekit")
    assert again.config == model.config
    assert torch.equal(_moekit_logits(again), _moekit_logits(model))


# ---------------------------------------------------------------------------------------------- negative controls
def _perturbed(model: Transformer, state_fn=None, moe=None, **changes) -> Transformer:
    """The same weights under a config with one detail changed (moe: MoEConfig field changes)."""
    cfg = model.config
    if moe:
        changes["moe"] = dataclasses.replace(cfg.moe, **moe)
    new = Transformer(dataclasses.replace(cfg, **changes))
    state = model.state_dict()
    if state_fn is not None:
        state_fn(state)
    missing, _ = new.load_state_dict(state, strict=False)
    assert not missing, missing
    return new


def _zero_correction_bias(state: dict) -> None:
    for k in state:
        if k.endswith("router.expert_bias"):
            state[k] = torch.zeros_like(state[k])


NEGATIVE = [
    ("mixtral", "no sliding window", dict(sliding_window=None)),
    ("mixtral", "top-k weights not renormalised", dict(moe=dict(softmax_after_topk=False, norm_topk_prob=False))),
    ("qwen2_moe", "shared expert without its sigmoid gate", dict(moe=dict(shared_expert_gate=False))),
    ("qwen2_moe", "renormalised top-k (norm_topk_prob=False in the config)", dict(moe=dict(softmax_after_topk=True))),
    ("qwen2_moe", "no sliding window", dict(sliding_window=None, layer_types=None)),
    ("qwen3_moe", "top-k weights not renormalised", dict(moe=dict(softmax_after_topk=False, norm_topk_prob=False))),
    ("qwen3_moe", "no qk-norm", dict(qk_norm=False)),
    ("olmoe", "no clip_qkv", dict(clip_qkv=None)),
    ("olmoe", "renormalised top-k", dict(moe=dict(softmax_after_topk=True))),
    ("deepseek_v2", "no group-limited routing", dict(moe=dict(n_groups=1, topk_groups=1))),
    ("deepseek_v2", "rotate-half instead of interleaved RoPE", dict(rope_interleaved=False)),
    ("deepseek_v2", "no routed scaling factor", dict(moe=dict(routed_scaling_factor=1.0))),
    ("deepseek_v3", "correction bias dropped", dict(state_fn=_zero_correction_bias)),
    ("deepseek_v3", "no group-limited routing", dict(moe=dict(n_groups=1, topk_groups=1))),
    ("deepseek_v3", "no YaRN (and no mscale)", dict(rope_scaling=None)),
    ("deepseek_v3", "no routed scaling factor", dict(moe=dict(routed_scaling_factor=1.0))),
    ("gpt_oss", "no attention sinks", dict(attn_sinks=False)),
    ("gpt_oss", "SwiGLU without the clamp", dict(moe=dict(swiglu_limit=1e4))),
    ("gpt_oss", "no sliding window", dict(sliding_window=None, layer_types=None)),
    ("gpt_oss", "no YaRN", dict(rope_scaling=None)),
    ("llama", "no Llama-3 RoPE scaling", dict(rope_scaling=None)),
    ("qwen2", "no q/k/v biases", dict(qkv_bias=False)),
    ("mistral", "no sliding window", dict(sliding_window=None)),
]


@pytest.mark.parametrize("arch,what,change", NEGATIVE, ids=[f"{a}-{w}" for a, w, _ in NEGATIVE])
def test_negative_control(arch: str, what: str, change: dict, workdir: Path) -> None:
    path, ref = hf_checkpoint(arch, workdir)
    model = from_pretrained(path)
    assert _rel(_moekit_logits(model), ref) < RTOL
    assert _rel(_moekit_logits(_perturbed(model, **change)), ref) > 100 * RTOL, what


@pytest.mark.parametrize("backend", ["loop", "padded", "grouped"])
def test_expert_biases_and_clamped_swiglu_on_every_backend(backend: str, workdir: Path) -> None:
    from moekit.layer.kernels.grouped import grouped_mm_available

    if backend == "grouped" and not grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("no grouped_mm on this CPU build")
    path, ref = hf_checkpoint("gpt_oss", workdir)
    model = from_pretrained(path)
    for moe in model.moe_layers:
        moe.experts.backend = backend
    assert _rel(_moekit_logits(model), ref) < RTOL


def test_every_architecture_has_a_negative_control() -> None:
    assert {a for a, _, _ in NEGATIVE} == set(ARCHS)


ROPE_CASES = {
    "yarn-truncate": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    "yarn-no-truncate": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": 4096},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": 2048},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "linear": {"rope_type": "linear", "factor": 2.0},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_frequencies_match_transformers(case: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moekit.model.transformer import rope_inv_freq

    scaling = ROPE_CASES[case]
    hf_cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=131072,
                                      rope_parameters={"rope_theta": 50000.0, **scaling})
    ref, ref_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg)
    ours, factor = rope_inv_freq(64, 50000.0, dict(scaling), 131072)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-5, atol=0)  # HF computes in fp32
    assert factor == pytest.approx(ref_factor, rel=1e-6)


# ---------------------------------------------------------------------------------------------- layouts and files
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_fused_expert_layout(arch: str, workdir: Path) -> None:
    path, ref = hf_checkpoint(arch, workdir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    fused = workdir / f"{arch}-fused"
    hf_model.save_pretrained(fused, save_original_format=False)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in load_file(fused / "model.safetensors"))
    model = from_pretrained(fused)
    assert _rel(_moekit_logits(model), ref) < RTOL
    out = export_hf(model, workdir / f"{arch}-fused-export", expert_layout="fused")
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in load_file(out / "model.safetensors"))
    assert _rel(_hf_logits(out), ref) < RTOL


def test_sharded_checkpoints(workdir: Path) -> None:
    path, ref = hf_checkpoint("qwen2_moe", workdir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    sharded = workdir / "qwen2_moe-sharded"
    hf_model.save_pretrained(sharded, max_shard_size="30KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    model = from_pretrained(sharded)
    assert _rel(_moekit_logits(model), ref) < RTOL
    # moekit writes shards too, and replaces an earlier single file (never both layouts in one directory)
    out = workdir / "qwen2_moe-moekit-sharded"
    moekit.save_pretrained(model, out)
    moekit.save_pretrained(model, out, max_shard_bytes=20_000)
    assert not (out / "model.safetensors").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    assert torch.equal(_moekit_logits(from_pretrained(out)), _moekit_logits(model))
    hf_out = export_hf(model, workdir / "qwen2_moe-hf-sharded", max_shard_bytes=20_000)
    assert (hf_out / "model.safetensors.index.json").is_file()
    assert _rel(_hf_logits(hf_out), ref) < RTOL


def test_legacy_config_keys(workdir: Path) -> None:
    """Hub-style config.json: rope_theta + rope_scaling {"type": "yarn"}, aliased expert count, extra V3 keys."""
    path, ref = hf_checkpoint("deepseek_v3", workdir)
    legacy = workdir / "deepseek_v3-legacy"
    shutil.copytree(path, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    cfg["num_local_experts"] = cfg.pop("n_routed_experts")
    cfg.update(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1)
    (legacy / "config.json").write_text(json.dumps(cfg))
    assert _rel(_moekit_logits(from_pretrained(legacy)), ref) < RTOL


def test_multi_token_prediction_layers_are_skipped_like_transformers(workdir: Path) -> None:
    path, ref = hf_checkpoint("deepseek_v3", workdir)
    mtp = workdir / "deepseek_v3-mtp"
    shutil.copytree(path, mtp)
    tensors = load_file(mtp / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, mtp / "model.safetensors", metadata={"format": "pt"})
    assert _rel(_moekit_logits(from_pretrained(mtp)), ref) < RTOL


def _tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("the cat sat on a mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def test_tokenizer_travels_with_the_checkpoint(workdir: Path) -> None:
    pytest.importorskip("tokenizers")
    path, ref = hf_checkpoint("llama", workdir)
    with_tok = workdir / "llama-tok"
    shutil.copytree(path, with_tok)
    _tokenizer_json(with_tok)
    model = from_pretrained(with_tok)
    assert model.tokenizer.encode("the cat sat") == [2, 3, 4]
    moekit_dir = convert(with_tok, workdir / "llama-tok-moekit", to="moekit")
    hf_dir = convert(moekit_dir, workdir / "llama-tok-hf", to="hf")
    assert from_pretrained(hf_dir).tokenizer.encode("on a mat") == [5, 6, 7]
    assert _rel(_hf_logits(hf_dir), ref) < RTOL
    assert json.loads((hf_dir / "config.json").read_text())["bos_token_id"] == 1  # token ids carried over


def test_config_from_hf_dir_reads_without_weights(workdir: Path) -> None:
    path, _ = hf_checkpoint("deepseek_v3", workdir)
    cfg = config_of(path)
    assert cfg.attention == "mla" and cfg.moe.expert_bias and cfg.moe_layers == (1,)
    moekit_dir = convert(path, workdir / "v3-moekit", to="moekit")
    assert config_of(moekit_dir) == cfg


# ---------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3", "gpt_oss", "mistral", "olmoe"])
def test_incremental_decoding_matches_full_forward(arch: str, workdir: Path) -> None:
    path, _ = hf_checkpoint(arch, workdir)
    model = from_pretrained(path).eval()
    ids = _ids(batch=1)
    full = _moekit_logits(model, ids)
    cache = KVCache(model.config, batch=1, max_len=SEQ)
    with torch.no_grad():
        steps = [model(ids[:, :5], cache=cache).logits]  # prefill, then one token at a time
        steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(5, SEQ)]
    assert _rel(torch.cat(steps, dim=1), full) < RTOL


def test_mla_cache_stores_the_latent_only(workdir: Path) -> None:
    path, _ = hf_checkpoint("deepseek_v2", workdir)
    cfg = from_pretrained(path).config
    cache = KVCache(cfg, batch=1, max_len=SEQ)
    per_token = cache.nbytes // (SEQ * 4)
    assert per_token == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # C + r per layer
    mha_equivalent = cfg.n_layers * 2 * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    assert per_token < mha_equivalent / 4


# ---------------------------------------------------------------------------------------------- errors
def _copy(arch: str, workdir: Path, name: str) -> Path:
    path, _ = hf_checkpoint(arch, workdir)
    dst = workdir / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(path, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture_is_named(workdir: Path) -> None:
    d = _copy("mixtral", workdir, "err-arch")
    _edit_config(d, model_type="jamba")
    with pytest.raises(UnsupportedCheckpointError, match="jamba"):
        from_pretrained(d)


def test_quantized_checkpoint_is_refused(workdir: Path) -> None:
    d = _copy("gpt_oss", workdir, "err-quant")
    _edit_config(d, quantization_config={"quant_method": "mxfp4"})
    with pytest.raises(UnsupportedCheckpointError, match="quantization_config.*mxfp4"):
        from_pretrained(d)


def test_mxfp4_tensors_are_refused(workdir: Path) -> None:
    d = _copy("gpt_oss", workdir, "err-mxfp4")

    def quantize(t: dict) -> None:
        t.pop("model.layers.0.mlp.experts.gate_up_proj")
        t["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(4, 48, 1, 16, dtype=torch.uint8)

    _edit_tensors(d, quantize)
    with pytest.raises(UnsupportedCheckpointError, match="gate_up_proj_blocks.*quantized"):
        from_pretrained(d)


def test_unsupported_key_value_is_named(workdir: Path) -> None:
    d = _copy("llama", workdir, "err-rope")
    _edit_config(d, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedCheckpointError, match="llama.*rope_type='dynamic'"):
        from_pretrained(d)
    _edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="gelu")
    with pytest.raises(UnsupportedCheckpointError, match="hidden_act='gelu'"):
        from_pretrained(d)


def test_missing_tensor_is_named(workdir: Path) -> None:
    d = _copy("qwen2_moe", workdir, "err-missing")
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        from_pretrained(d)


def test_wrong_shape_is_named(workdir: Path) -> None:
    d = _copy("deepseek_v3", workdir, "err-shape")

    def shrink(t: dict) -> None:
        t["model.layers.1.self_attn.kv_b_proj.weight"] = t["model.layers.1.self_attn.kv_b_proj.weight"][:, :4].clone()

    _edit_tensors(d, shrink)
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight .*shape \[64, 4\].*\[64, 8\]"):
        from_pretrained(d)


def test_unexpected_tensor_is_named(workdir: Path) -> None:
    d = _copy("mistral", workdir, "err-extra")
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(8)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        from_pretrained(d)


def test_pickle_and_corrupt_files_are_refused(workdir: Path) -> None:
    d = _copy("llama", workdir, "err-pickle")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle"):
        from_pretrained(d)
    (d / "pytorch_model.bin").unlink()
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="corrupt checkpoint file: .*model.safetensors"):
        from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(d)
    with pytest.raises(CheckpointError, match="not found"):
        from_pretrained(workdir / "does-not-exist")


def test_moekit_checkpoint_errors(workdir: Path) -> None:
    path, _ = hf_checkpoint("mixtral", workdir)
    d = workdir / "err-moekit"
    from_pretrained(path).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["dim"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tok_emb\.weight has shape \[100, 32\].*\[100, 48\]"):
        from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(d)


def test_export_refuses_what_the_target_cannot_hold(workdir: Path) -> None:
    path, _ = hf_checkpoint("qwen2_moe", workdir)
    model = from_pretrained(path)
    with pytest.raises(UnsupportedCheckpointError, match="mixtral.*shared experts"):
        export_hf(model, workdir / "err-export", arch="mixtral")
    with pytest.raises(UnsupportedCheckpointError, match="unknown architecture 'jamba'"):
        export_hf(model, workdir / "err-export", arch="jamba")
