"""Training: data, the trainer, its resumable state, and evaluation of checkpoints.

    data.py        corpora (stdlib, text, directories, jsonl, parquet), memory-mapped token cache, batches
    trainer.py     the trainer: AdamW, warmup+cosine, accumulation, autocast, validation, NaN stop
    state.py       atomic, resumable training checkpoints (model + optimizer/RNG state)
    evaluation.py  ``moekit eval`` and ``moekit generate`` (and its ``--benchmark``) on checkpoints

Imports: everything below it (``moekit.config``, ``host``, ``layer``, ``model``, ``formats``, ``parallel``); never
``moekit.compare`` or the CLI.
"""

from moekit.train.data import prepare_data
from moekit.train.evaluation import benchmark_generation, eval_checkpoint, generate_text
from moekit.train.trainer import DataSpec, NonFiniteLossError, TrainConfig, TrainResult, run_training, train

__all__ = ["DataSpec", "NonFiniteLossError", "TrainConfig", "TrainResult", "benchmark_generation", "eval_checkpoint",
           "generate_text", "prepare_data", "run_training", "train"]
