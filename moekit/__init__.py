"""moekit: Mixture-of-Experts transformers and their dense twins, side by side."""

from moekit.checkpoint_io import CheckpointError, save_pretrained  # noqa: I001  (after model: no cycle)
from moekit.config import ModelConfig, MoEConfig
from moekit.hf import convert, export_hf, from_pretrained
from moekit.model import KVCache, ModelOutput, Transformer
from moekit.moe import MoE, MoEOutput, MoEStats
from moekit.router import Router, RoutingResult
from moekit.upcycle import upcycle

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "ModelOutput", "MoE", "MoEConfig", "MoEOutput", "MoEStats",
    "Router", "RoutingResult", "Transformer", "__version__", "convert", "export_hf", "from_pretrained",
    "save_pretrained", "upcycle",
]
