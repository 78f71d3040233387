"""Training checkpoints: model, tokenizer, optimizer, schedule position, data position and RNG state.

A run directory holds versioned checkpoints and a pointer to the newest complete one:

    run/
      checkpoints/step-000100/   config.json, model.safetensors, tokenizer files,
                                 trainer_state.json (step, tokens, config), trainer_state.pt (optimizer, RNG)
      checkpoints/latest          text file naming the newest complete step directory

A checkpoint is written into a temporary directory, fsynced and renamed into place; only then is
``latest`` replaced (``os.replace`` is atomic), so a crash mid-write leaves the previous checkpoint
intact. Weights go through safetensors; the small optimizer/RNG state is loaded with
``torch.load(weights_only=True)`` (no pickle code execution).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from moekit.formats.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    MODEL_FILE,
    CheckpointError,
    load_pretrained_moekit,
    save_pretrained,
)
from moekit.formats.paths import CHECKPOINTS_DIR, LATEST, latest_in_run
from moekit.model.transformer import Transformer

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model(model: Transformer, directory: str | Path) -> None:
    """config.json + model.safetensors in moekit's format (shared tensors stored once)."""
    save_pretrained(model, directory)


def read_model(directory: str | Path, map_location: str | torch.device = "cpu") -> Transformer:
    """Rebuild a model from config.json + safetensors; every tensor must be present and match."""
    directory = Path(directory)
    for p in (directory / CONFIG_FILE,):
        if not p.is_file():
            raise CheckpointError(f"missing checkpoint file: {p}")
    if not (directory / MODEL_FILE).is_file() and not (directory / INDEX_FILE).is_file():
        raise CheckpointError(f"missing checkpoint file: {directory / MODEL_FILE}")
    return load_pretrained_moekit(directory, device=map_location)


def save_checkpoint(run_dir: str | Path, step: int, model: Transformer, tokenizer: Any | None,
                    trainer_state: dict[str, Any], tensors: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write checkpoint ``step`` under ``run_dir/checkpoints`` and point ``latest`` at it."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    try:
        write_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / STATE_JSON).write_text(json.dumps(trainer_state, indent=2) + "\n")
        torch.save(tensors, tmp / STATE_PT)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    # prune older complete checkpoints
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint directory of a run (or the path itself if it is one)."""
    path = Path(run_dir)
    if (path / STATE_JSON).is_file():
        return path
    return latest_in_run(path)


def load_checkpoint(path: str | Path) -> tuple[Transformer, dict[str, Any], dict[str, Any]]:
    """(model, trainer_state json, tensors) of a checkpoint directory or a run's latest checkpoint."""
    ckpt = latest_checkpoint(path)
    model = read_model(ckpt)
    state_json, state_pt = ckpt / STATE_JSON, ckpt / STATE_PT
    for p in (state_json, state_pt):
        if not p.is_file():
            raise CheckpointError(f"missing checkpoint file: {p}")
    try:
        state = json.loads(state_json.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt checkpoint file: {state_json} ({e})") from e
    try:
        tensors = torch.load(state_pt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"corrupt checkpoint file: {state_pt} ({e})") from e
    return model, state, tensors
