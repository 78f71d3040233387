"""moekit: Mixture-of-Experts transformers and their dense twins, side by side."""

from moekit.config import ModelConfig, MoEConfig
from moekit.moe import MoE, MoEOutput, MoEStats
from moekit.model import KVCache, ModelOutput, Transformer
from moekit.router import Router, RoutingResult

__version__ = "0.1.0"

__all__ = [
    "KVCache", "ModelConfig", "ModelOutput", "MoE", "MoEConfig", "MoEOutput", "MoEStats", "Router",
    "RoutingResult", "Transformer", "__version__",
]
