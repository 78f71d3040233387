"""Hugging Face interop: load HF checkpoints of MoE and dense architectures, export them back.

    model = moekit.from_pretrained("path/to/dir")       # HF (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
                                                         # deepseek_v3, gpt_oss, llama, qwen2, mistral) or moekit
    model(input_ids).logits                              # the source model's logits
    model.save_pretrained("out")                         # moekit's format
    export_hf(model, "out_hf")                           # the source architecture's HF format

Modules: ``config_map`` (config.json <-> ModelConfig), ``weights`` (tensor names and layouts, both
directions), ``load`` (load_hf, which ``moekit.from_pretrained`` calls), ``export`` (export_hf). The facts they
implement are in ../shared/reference/hf-moe-formats.md (beside the project). Imports: ``moekit.formats.checkpoint``,
``moekit.config`` and ``moekit.model`` (nothing from training or above).
"""

from moekit.formats.hf.config_map import (
    ARCHITECTURES,
    DENSE_ARCHS,
    MOE_ARCHS,
    UnsupportedCheckpointError,
    config_to_hf,
    export_problems,
    hf_to_config,
    infer_arch,
)
from moekit.formats.hf.export import export_hf
from moekit.formats.hf.load import load_hf

__all__ = [
    "ARCHITECTURES", "DENSE_ARCHS", "MOE_ARCHS", "UnsupportedCheckpointError", "config_to_hf", "export_hf",
    "export_problems", "hf_to_config", "infer_arch", "load_hf",
]
