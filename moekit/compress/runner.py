"""``compress``: a checkpoint in, a compressed checkpoint out, and what each bit saved and cost (the function the
``moekit compress`` verb maps to).

Legend: E experts, b a width, L MoE layers.

    load SRC (moekit run/checkpoint or Hugging Face MoE directory) in fp32
    [calib]  validation loss before; calibration pass (calibrate.py): every MoE layer's rows and routing
    for every candidate width b (mixed) or the one uniform width: quantize every expert stack at b
             (layer_quant.py: rtn | hqq | gptq) and measure each expert's error (layer output on the calibration
             rows, or weight space without them)
    allocate one width per expert and shared expert under the budget (allocate.py: exact DP, per layer or global)
    put the quantized modules in place (modules.py); [calib] validation loss after
    write DST atomically (checkpoint.py)

``bits`` is an average over every quantized weight in *effective* bits (scales and zeros included). Attention
projections and dense FFNs are quantized only with ``quantize_dense`` (at ``dense_bits``, by default the widest
width that fits ``bits`` on its own) and their bits then count in the average. Router, norms, embeddings and the
output head stay in high precision (their stored dtype). Nothing is written unless every step succeeded.

Imports: ``moekit.compress``, ``moekit.formats``, ``moekit.layer``, ``moekit.model``, ``moekit.shift``, ``moekit.train``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from moekit.compress.allocate import Item, allocate, budget_bits, smallest_error, uniform_width
from moekit.compress.calibrate import Calibration, calibrate, corpus_batches
from moekit.compress.checkpoint import quantization_section, save_compressed
from moekit.compress.hqq import HQQConfig
from moekit.compress.layer_quant import (METHODS, MethodConfig, expert_output_errors, mlp_output_error,
                                         quantize_experts, quantize_linear, quantize_mlp, weight_errors)
from moekit.compress.modules import QuantizedExperts, QuantizedLinear, QuantizedMLP, quantize_model_
from moekit.compress.quantize import WIDTHS, QuantizedTensor, QuantSpec, bits_of, check_width
from moekit.layer.experts import MLP
from moekit.layer.moe import MoE
from moekit.shift.measure import validation_batches

SCOPES = ("layer", "global")


@dataclass
class CompressResult:
    """What ``compress`` did and measured."""

    dst: str
    method: str
    bits_requested: float
    effective_bits: float  # stored bits per quantized weight, scales and zeros included
    quantized_weights: int  # weights that were quantized
    weight_bytes_before: int  # those weights in the source's stored dtype
    weight_bytes_after: int  # their packed codes + scales + zeros
    widths: dict[str, list[int] | int]  # module path -> per-expert widths (experts) or one width
    allocation_exact: bool  # the DP's optimality proof holds (False only after coarsening)
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    seconds: float = 0.0
    routing: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # per MoE layer: frequency, weight

    @property
    def compression(self) -> float:
        return self.weight_bytes_before / max(1, self.weight_bytes_after)

    @property
    def perplexity_before(self) -> float | None:
        return None if self.val_loss_before is None else math.exp(self.val_loss_before)

    @property
    def perplexity_after(self) -> float | None:
        return None if self.val_loss_after is None else math.exp(self.val_loss_after)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compression": self.compression, "perplexity_before": self.perplexity_before,
                "perplexity_after": self.perplexity_after}


@torch.no_grad()
def val_loss(model: nn.Module, corpus: str | os.PathLike[str], batches: int = 8, batch_size: int = 4,
             seq_len: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
             progress: bool = False) -> float:
    """Mean next-token loss (nats) over the first ``batches`` windows of the corpus's validation split."""
    data = validation_batches(model, corpus, batches, batch_size, seq_len, cache_dir, progress)
    was = model.training
    model.eval()
    total = count = 0.0
    for x, y in data:
        n = y.numel()
        total += float(model(x, y, aux=False).lm_loss) * n
        count += n
    model.train(was)
    return total / count


def _check_args(bits: float, method: str, widths: tuple[int, ...], scope: str, calib: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"method: unknown value {method!r}; expected one of {', '.join(METHODS)}")
    if not widths:
        raise ValueError("widths: at least one candidate width is needed")
    for b in widths:
        check_width(b, "widths")
    if scope not in SCOPES:
        raise ValueError(f"scope: unknown value {scope!r}; expected one of {', '.join(SCOPES)}")
    if not (isinstance(bits, (int, float)) and math.isfinite(bits) and bits > 0):
        raise ValueError(f"bits: must be a positive number of bits per weight, got {bits!r}")
    if method == "gptq" and calib is None:
        raise ValueError("method 'gptq' needs calibration text: pass calib (a corpus name or path)")


def _moe_items(path: str, moe: MoE, cfg: MethodConfig, widths: tuple[int, ...], cal: Calibration | None,
               mixed: bool, bar: tqdm) -> tuple[list[Item], dict[int, dict[str, Any]]]:
    """This layer's items (routed experts, shared expert) with their loss at every width, and the quantized
    candidates {width: {"experts": (q_in, q_out), "shared": (q_in, q_out)}}."""
    ex = moe.experts
    lc = None if cal is None else cal.moe.get(path)
    losses: dict[str, dict[int, float]] = {}
    cands: dict[int, dict[str, Any]] = {}
    for b in widths:
        q_in, q_out = quantize_experts(ex, b, cfg, lc)
        cands[b] = {"experts": (q_in, q_out)}
        if mixed:
            err_E = (expert_output_errors(ex, q_in, q_out, lc) if lc is not None
                     else weight_errors(ex.w_in, q_in) + weight_errors(ex.w_out, q_out))
            for e in range(ex.n_experts):
                losses.setdefault(f"{path}.experts.{e}", {})[b] = float(err_E[e])
        if moe.shared is not None:
            x = None if lc is None else lc.x_TD
            s_in, s_out = quantize_mlp(moe.shared, b, cfg, x)
            cands[b]["shared"] = (s_in, s_out)
            if mixed:
                if x is None:
                    err = float(weight_errors(moe.shared.w_in, s_in) + weight_errors(moe.shared.w_out, s_out))
                else:
                    gate = None if moe.shared_gate is None else torch.sigmoid(moe.shared_gate(x))[:, 0]
                    err = mlp_output_error(moe.shared, s_in, s_out, x, gate)
                losses.setdefault(f"{path}.shared", {})[b] = err
        bar.update(1)
    shapes_ex = (tuple(ex.w_in.shape[1:]), tuple(ex.w_out.shape[1:]))
    items = [Item(f"{path}.experts.{e}", shapes_ex, losses.get(f"{path}.experts.{e}", {}))
             for e in range(ex.n_experts)]
    if moe.shared is not None:
        items.append(Item(f"{path}.shared", (tuple(moe.shared.w_in.shape), tuple(moe.shared.w_out.shape)),
                          losses.get(f"{path}.shared", {})))
    return items, cands


def _skeleton_items(moes: dict[str, MoE]) -> list[Item]:
    """Every routed and shared expert as an allocation item, without losses."""
    items = []
    for p, m in moes.items():
        shapes = (tuple(m.experts.w_in.shape[1:]), tuple(m.experts.w_out.shape[1:]))
        items += [Item(f"{p}.experts.{e}", shapes, {}) for e in range(m.experts.n_experts)]
        if m.shared is not None:
            items.append(Item(f"{p}.shared", (tuple(m.shared.w_in.shape), tuple(m.shared.w_out.shape)), {}))
    return items


def _dense_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention projections (nn.Linear under ``.attn``) and dense-layer FFNs."""
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".attn." in f".{name}":
            out[name] = m
        elif isinstance(m, MLP) and name.endswith(".ffn") and not name.endswith("shared"):
            out[name] = m
    return out


def _shapes(m: nn.Module) -> tuple[tuple[int, ...], ...]:
    return (tuple(m.weight.shape),) if isinstance(m, nn.Linear) else (tuple(m.w_in.shape), tuple(m.w_out.shape))


def compress(src: str | os.PathLike[str], dst: str | os.PathLike[str], bits: float, method: str = "rtn",
             group_size: int | None = 128, calib: str | os.PathLike[str] | None = None, mixed: bool = True, *,
             symmetric: bool = False, scope: str = "layer", widths: tuple[int, ...] = WIDTHS,
             quantize_dense: bool = False, dense_bits: int | None = None, calibrate_all_experts: bool = False,
             act_order: bool = False, percdamp: float = 0.01, hqq: HQQConfig | None = None,
             calib_sequences: int = 32, calib_seq_len: int | None = None, max_calib_tokens: int = 8192,
             eval_batches: int = 8, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None,
             progress: bool = True) -> CompressResult:
    """Compress checkpoint ``src`` into directory ``dst`` at an average of ``bits`` effective bits per quantized
    weight (see the module docstring); returns what was chosen and measured. ``calib``: a corpus name or path
    (``moekit.train.corpora``) for calibration and the before/after validation loss; ``mixed``: per-expert widths
    by exact allocation (else one uniform width); ``scope``: allocate per MoE layer or globally."""
    from moekit.formats.load import from_pretrained

    t0 = time.perf_counter()
    widths = tuple(sorted(set(widths)))
    _check_args(bits, method, widths, scope, calib)
    spec = QuantSpec(max(widths), group_size, symmetric)
    cfg = MethodConfig(method, spec, hqq or HQQConfig(), percdamp, act_order, calibrate_all_experts)
    if dense_bits is not None:
        check_width(dense_bits, "dense_bits")
    model = from_pretrained(src, dtype="stored")
    stored = model.tok_emb.weight.dtype
    model.float().eval()
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    dense = _dense_modules(model) if quantize_dense else {}
    if not moes and not quantize_dense:
        raise ValueError(f"{src}: the model has no MoE layers, so there are no experts to quantize; pass "
                         "quantize_dense=True to quantize its attention projections and dense FFNs instead")
    # the dense modules' fixed width and cost (checked before any work)
    dense_numel = sum(math.prod(s) for m in dense.values() for s in _shapes(m))
    if dense:
        if dense_bits is None:
            items_d = [Item(p, _shapes(m), {}) for p, m in dense.items()]
            dense_bits = uniform_width(items_d, spec, bits, widths)
    dense_cost = sum(bits_of(s, spec.with_bits(dense_bits)) for m in dense.values() for s in _shapes(m)) if dense else 0
    progress = progress and sys.stderr.isatty()
    before = after = None
    cal = None
    if calib is not None:
        before = val_loss(model, calib, eval_batches, cache_dir=cache_dir, progress=progress)
        batches = corpus_batches(model, calib, calib_sequences, calib_seq_len, seed=seed, cache_dir=cache_dir,
                                 progress=progress)
        cal = calibrate(model, batches, max_calib_tokens, dense=bool(dense) and cfg.needs_inputs, progress=progress,
                        total=math.ceil(calib_sequences / 8))
    # every expert stack at every candidate width (mixed) or only the uniform width
    items_by_layer: dict[str, list[Item]] = {}
    expert_numel = sum(it.numel for it in _skeleton_items(moes))
    fixed_excess = dense_cost - bits * dense_numel  # bits the dense modules take beyond their share
    expert_bits = bits - fixed_excess / expert_numel if expert_numel else bits
    if moes and budget_bits(expert_bits, expert_numel) < 0:
        raise ValueError(f"dense_bits: {dense_bits}-bit attention/dense FFNs alone exceed a budget of {bits:g} bits "
                         "per weight")
    uniform = None
    if moes:  # an impossible budget fails here, before the quantization passes
        items0 = _skeleton_items(moes)
        if sum(it.cost(spec, widths[0]) for it in items0) > budget_bits(expert_bits, expert_numel):
            raise ValueError(smallest_error(items0, spec, widths, bits, dense_cost, dense_numel))
        if not mixed:
            uniform = uniform_width(items0, spec, expert_bits, widths)
    run_widths = widths if mixed else (uniform,)
    bar = tqdm(total=len(moes) * len(run_widths), desc=f"quantizing ({method})", unit="layer-width",
               disable=not progress)
    chosen: dict[str, int] = {}
    cands_by_layer: dict[str, dict[int, dict[str, Any]]] = {}
    exact = True
    try:
        for path, moe in moes.items():
            items, cands = _moe_items(path, moe, cfg, run_widths, cal, mixed, bar)
            items_by_layer[path], cands_by_layer[path] = items, cands
            if mixed and scope == "layer":
                pick, sol = allocate(items, spec, expert_bits, widths)
                chosen.update(pick)
                exact &= sol.exact
    finally:
        bar.close()
    if mixed and scope == "global" and moes:
        pick, sol = allocate([it for its in items_by_layer.values() for it in its], spec, expert_bits, widths)
        chosen.update(pick)
        exact = sol.exact
    if not mixed:
        chosen = {it.name: uniform for its in items_by_layer.values() for it in its}
    # the quantized modules
    new: dict[str, nn.Module] = {}
    qts: list[QuantizedTensor] = []
    for path, moe in moes.items():
        ex = moe.experts
        w_E = [chosen[f"{path}.experts.{e}"] for e in range(ex.n_experts)]
        stacks = {}
        for b in sorted(set(w_E)):
            idx = torch.tensor([e for e in range(ex.n_experts) if w_E[e] == b])
            q_in, q_out = cands_by_layer[path][b]["experts"]
            stacks[b] = (q_in.select(idx), q_out.select(idx))
            qts += list(stacks[b])
        new[f"{path}.experts"] = QuantizedExperts(ex, w_E, stacks)
        if moe.shared is not None:
            s_in, s_out = cands_by_layer[path][chosen[f"{path}.shared"]]["shared"]
            new[f"{path}.shared"] = QuantizedMLP(moe.shared, s_in, s_out)
            qts += [s_in, s_out]
    for path, m in dense.items():
        if isinstance(m, nn.Linear):
            qt = quantize_linear(m.weight, dense_bits, cfg, None if cal is None else cal.inputs.get(path))
            new[path] = QuantizedLinear(qt, m.bias)
            qts.append(qt)
        else:
            x = None if cal is None else cal.inputs.get(path)
            q_in, q_out = quantize_mlp(m, dense_bits, cfg, x)
            new[path] = QuantizedMLP(m, q_in, q_out)
            qts += [q_in, q_out]
    quantize_model_(model, new)
    if calib is not None:
        after = val_loss(model, calib, eval_batches, cache_dir=cache_dir)
    numel = sum(q.numel for q in qts)
    nbytes = sum(q.nbytes for q in qts)
    result = CompressResult(
        dst=str(dst), method=method, bits_requested=float(bits), effective_bits=8 * nbytes / numel,
        quantized_weights=numel, weight_bytes_before=numel * torch.empty((), dtype=stored).element_size(),
        weight_bytes_after=nbytes,
        widths={p: (m.widths if isinstance(m, QuantizedExperts) else
                    (m.w_in.bits if isinstance(m, QuantizedMLP) else m.weight.bits)) for p, m in new.items()},
        allocation_exact=exact, val_loss_before=before, val_loss_after=after,
        routing={p: {"frequency": lc.frequency_E.tolist(), "weight": lc.weight_E.tolist()}
                 for p, lc in (cal.moe.items() if cal is not None else ())})
    # the float tensors go back to the stored dtype (the packed ones are unaffected: integer and fp16 buffers)
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(stored)
    report = {k: v for k, v in result.to_dict().items() if k not in ("dst", "widths", "routing")}
    save_compressed(model, dst, quantization_section(model, method, spec, report))
    result.seconds = time.perf_counter() - t0
    return result
