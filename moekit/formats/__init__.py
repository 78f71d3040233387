"""Model files: the only place that reads or writes them.

    checkpoint.py  safetensors directories: memory-mapped reading, atomic (sharded) writing, moekit's format,
                   whole output directories written atomically
    paths.py       the one resolver of checkpoint paths (run, step, moekit and Hugging Face directories)
    load.py        from_pretrained / config_of: any checkpoint path -> Transformer / ModelConfig
    conversion.py  convert: Hugging Face <-> moekit
    tokenizer.py   byte-level and BPE tokenizers and their files
    hf/            Hugging Face interop: config mapping, tensor names and layouts, load_hf, export_hf

Imports: ``moekit.config``, ``moekit.host``, ``moekit.layer`` and ``moekit.model``; never training, parallelism,
compare or the CLI.
"""

from moekit.formats.checkpoint import CheckpointError, save_pretrained
from moekit.formats.conversion import convert
from moekit.formats.hf import UnsupportedCheckpointError, export_hf
from moekit.formats.load import config_of, from_pretrained
from moekit.formats.paths import resolve_checkpoint

__all__ = ["CheckpointError", "UnsupportedCheckpointError", "config_of", "convert", "export_hf", "from_pretrained",
           "resolve_checkpoint", "save_pretrained"]
