"""``convert``: a checkpoint from one format to another (Hugging Face <-> moekit), written atomically.

Imports: ``moekit.formats``' own modules.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from moekit.formats.checkpoint import output_directory, save_pretrained
from moekit.formats.hf.export import export_hf
from moekit.formats.load import from_pretrained
from moekit.formats.paths import resolve_checkpoint

# small files of a Hugging Face checkpoint that convert() carries over unchanged
_SIDE_FILES = ("generation_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str = "hf", arch: str | None = None,
            expert_layout: str = "per_expert", max_shard_bytes: int | None = None) -> Path:
    """Convert checkpoint ``src`` (moekit or Hugging Face; any path ``resolve_checkpoint`` takes) to ``dst`` in
    format ``to``
    ("hf": Hugging Face ``arch``, see :func:`export_hf`; "moekit": moekit's format). The tokenizer
    travels along; Hugging Face side files (generation_config.json, ...) are copied for ``to="hf"``."""
    if to not in ("hf", "moekit"):
        raise ValueError(f"to: expected 'hf' or 'moekit', got {to!r}")
    src, dst = resolve_checkpoint(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"dst: must differ from src ({src})")
    model = from_pretrained(src, dtype="stored")
    if to == "moekit":
        return save_pretrained(model, dst, max_shard_bytes=max_shard_bytes)
    with output_directory(dst) as out:  # the export and the side files together, or nothing
        export_hf(model, out, arch, expert_layout, max_shard_bytes)
        for name in _SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    return dst
