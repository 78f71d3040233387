"""moekit: Mixture-of-Experts transformers and their dense twins, side by side.

The public API, importable from here; the subpackages, in the order their imports run (each imports only the
ones before it):

    config.py, host.py  configs (ModelConfig, MoEConfig) and the host probe / dtype resolver
    layer/              the MoE layer: router, dispatch, experts (and their kernels), losses
    model/              the transformer, its cost model, presets, sampling
    formats/            model files: moekit's safetensors format, Hugging Face, tokenizers, path resolution
    upcycling.py        dense -> MoE sparse upcycling
    parallel/           expert + data parallelism on torch.distributed
    train/              data, trainer, training checkpoints, evaluation
    compress/           quantized experts with per-expert widths (``moekit compress``; ``moekit.compress.compress``)
    serve/              the batched generation engine and the OpenAI-compatible server (``moekit serve``)
    compare/            ``moekit compare`` and its report
    cli.py              the command line: verbs mapped to the functions above
"""

import moekit.compress  # noqa: F401 (registers the compressed checkpoints with from_pretrained)
from moekit.config import ModelConfig, MoEConfig
from moekit.formats import CheckpointError, convert, export_hf, from_pretrained, save_pretrained
from moekit.layer import MoE, MoEOutput, MoEStats, Router, RoutingResult
from moekit.model import KVCache, ModelOutput, Transformer
from moekit.upcycling import upcycle

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "ModelOutput", "MoE", "MoEConfig", "MoEOutput", "MoEStats",
    "Router", "RoutingResult", "Transformer", "__version__", "convert", "export_hf", "from_pretrained",
    "save_pretrained", "upcycle",
]
