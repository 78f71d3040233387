"""Hugging Face interop: load HF checkpoints of MoE and dense architectures, export them back.

    model = moekit.from_pretrained("path/to/dir")       # HF (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
                                                         # deepseek_v3, gpt_oss, llama, qwen2, mistral) or moekit
    model(input_ids).logits                              # the source model's logits
    model.save_pretrained("out")                         # moekit's format
    export_hf(model, "out_hf")                           # the source architecture's HF format

Modules: ``config_map`` (config.json <-> ModelConfig), ``weights`` (tensor names and layouts, both
directions), ``load`` (from_pretrained), ``export`` (export_hf, convert). The facts they implement are
in /work/shared/reference/hf-moe-formats.md.
"""

from moekit.checkpoint_io import CheckpointError, save_pretrained
from moekit.hf.config_map import (
                                  ARCHITECTURES,
                                  DENSE_ARCHS,
                                  MOE_ARCHS,
                                  UnsupportedCheckpointError,
                                  config_to_hf,
                                  export_problems,
                                  hf_to_config,
                                  infer_arch,
)
from moekit.hf.export import convert, export_hf
from moekit.hf.load import config_from_hf_dir, from_pretrained

__all__ = [
    "ARCHITECTURES", "CheckpointError", "DENSE_ARCHS", "MOE_ARCHS", "UnsupportedCheckpointError", "config_from_hf_dir",
    "config_to_hf", "convert", "export_hf", "export_problems", "from_pretrained", "hf_to_config", "infer_arch",
    "save_pretrained",
]
