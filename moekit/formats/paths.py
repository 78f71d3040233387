"""One resolver for checkpoint paths, used by ``moekit.from_pretrained`` and every verb alike.

What a user may point at, and what it resolves to:

    run directory          runs/x/                      its newest complete checkpoint (checkpoints/latest)
    checkpoints directory  runs/x/checkpoints/          the same
    the pointer file       runs/x/checkpoints/latest    the step directory it names
    step directory         runs/x/checkpoints/step-N/   itself (it holds config.json)
    model directory        a moekit or Hugging Face checkpoint directory: itself

A path that is none of these raises ``CheckpointError`` naming what was looked for. Imports: ``moekit.formats``'s
own ``checkpoint`` module only.
"""

from __future__ import annotations

import os
from pathlib import Path

from moekit.formats.checkpoint import CONFIG_FILE, CheckpointError

CHECKPOINTS_DIR = "checkpoints"  # a run directory's checkpoints (moekit.train.state writes them)
LATEST = "latest"  # the text file in CHECKPOINTS_DIR naming the newest complete step directory


def _follow(pointer: Path) -> Path:
    name = pointer.read_text().strip()
    ckpt = pointer.parent / name
    if not name or not ckpt.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory there")
    return ckpt


def latest_in_run(run_dir: str | os.PathLike[str]) -> Path:
    """The newest complete checkpoint of a run directory (``run_dir/checkpoints/latest``)."""
    path = Path(run_dir)
    pointer = path / CHECKPOINTS_DIR / LATEST
    if not pointer.is_file():
        if not path.exists():
            raise CheckpointError(f"no such run or checkpoint directory: {path}")
        raise CheckpointError(f"no checkpoint found in {path} (missing {pointer})")
    return _follow(pointer)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``path`` stands for (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint directory not found: {p} (no such run or checkpoint directory)")
    if p.is_file():
        if p.name == LATEST:
            return _follow(p)
        raise CheckpointError(f"{p}: a file, not a checkpoint: expected a run directory, a step directory or a "
                              "moekit / Hugging Face checkpoint directory")
    # a run directory holds a config.json of its own too: its checkpoints come first
    for pointer in (p / CHECKPOINTS_DIR / LATEST, p / LATEST):
        if pointer.is_file():
            return _follow(pointer)
    if (p / CONFIG_FILE).is_file():
        return p
    raise CheckpointError(f"{p}: not a checkpoint directory (no {CONFIG_FILE}) and not a run directory (no "
                          f"{CHECKPOINTS_DIR}/{LATEST})")
