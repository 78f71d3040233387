"""Compression: quantized experts with per-expert bit widths (``moekit compress``).

    quantize.py     the stored form (QuantizedTensor), exact bit packing for 2/3/4/8 bits, round-to-nearest
    hqq.py          HQQ: zero/scale per group fitted by the half-quadratic solver (no calibration data)
    gptq.py         GPTQ: Hessian-based column-by-column error compensation, batched over experts
    calibrate.py    the calibration pass: each MoE layer's input rows and real routing
    layer_quant.py  one layer's weights through a method, and the layer-output error each width costs
    allocate.py     per-expert widths under an effective-bits budget: an exact dynamic program
    modules.py      execution from packed weights (QuantizedExperts / QuantizedMLP / QuantizedLinear), model swap
    kernels.py      the few-row products straight from packed 2/4/8-bit codes (hand-written AVX2 C++, decode)
    checkpoint.py   the compressed checkpoint directory: save (atomic), load (memory-mapped, validated)
    runner.py       compress(src, dst, bits, ...) -> CompressResult, the function behind the CLI verb
    sweep.py        sweep(src, out, budgets, ...): uniform against mixed at several budgets, report and plots

Imports: ``moekit.config``, ``moekit.host``, ``moekit.layer``, ``moekit.model``, ``moekit.formats``,
``moekit.upcycling``, ``moekit.parallel``, ``moekit.train`` (the stages below it) and ``moekit.plotting``;
nothing below imports this.
"""

from moekit.compress.checkpoint import (CompressedCheckpointError, is_compressed_checkpoint, load_compressed,
                                       save_compressed)
from moekit.compress.quantize import QuantizedTensor, QuantSpec, quantize_rtn
from moekit.compress.runner import CompressResult, compress
from moekit.formats.load import register_loader

# moekit.from_pretrained (and so generate, eval, costs --checkpoint) reads compressed checkpoints too
register_loader(is_compressed_checkpoint, load_compressed)

__all__ = ["CompressResult", "CompressedCheckpointError", "QuantSpec", "QuantizedTensor", "compress",
           "load_compressed", "quantize_rtn", "save_compressed"]
