"""The step of generation that feeds a few new tokens (decode), written for bandwidth, not for arithmetic.

Legend: B batch (sequences), S new tokens per row (1 when decoding), T keys (cached + new), D dim, H query heads,
G kv heads, Dh head dim, O a projection's output width, V vocab.

    x = embed(ids)                                     one lookup, fp32 from here (the accumulate dtype)
    for each layer:  q, k, v = attention_in(x)         norm, q/k/v projections, qk-norm, RoPE   (one kernel)
                     k, v    = cache.update(k, v)      written into the preallocated cache; views of its filled part
                     x, h    = attention_out(x, q, k, v)  attention, output projection, residual, ffn norm (one kernel)
                     x       = x + ffn(h)              the MoE layer's own few-token path (router + experts, one kernel)
    logits = head(x)                                   final norm and the output head (one kernel)

A decode token reads every active weight once and does two flops per weight read, so its time is the bytes of
weights read over the memory bandwidth, plus whatever else runs. The model's ``forward`` (the reference) walks
~25 eager operators per layer, each with a few microseconds of dispatch, and multiplies a single row through
GEMM kernels that read 16-bit weights slowly where the CPU has no bf16 instructions (oneDNN emulates them).
Here each half of a layer is one TorchInductor kernel (``InductorFn``, traced once per signature: no TorchDynamo
per call) whose projections are multiply-reduce loops over the stored weights, converted to fp32 in registers as
they are read (bf16 -> fp32 is a shift), with fp32 accumulation; the activations stay in fp32 between layers.

``decode_step`` returns the same logits as ``Transformer.forward(ids, cache=cache, aux=False)`` (fp32: within
1e-5; tests/model/test_decode.py; it runs without autograd); where it does not apply (``fast_path_applies``: MLA
attention, a CUDA device, more than ``FAST_MAX_ROWS`` new tokens, the compiled kernels turned off or unavailable) it *is* that
call. ``MOEKIT_DECODE=eager`` turns the fast path off (the reference runs).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from moekit.layer.kernels import matvec
from moekit.layer.kernels.decode import DECODE_KERNEL, ROUTED_DECODE
from moekit.layer.kernels.inductor import InductorFn, accumulate_dtype, kernels_turned_off
from moekit.model.precision import activation_dtype
from moekit.layer.experts import MLP, Experts
from moekit.layer.moe import MoE
from moekit.model.transformer import Attention, KVCache, Transformer, apply_rope, attend, rms_norm

# B * S up to which the step runs through the kernels (decode, batched decode of served sequences, short steps):
# their products read each weight row once for all rows, and up to 32 rows they beat MKL's small GEMMs, whose
# per-call overhead dominates at these sizes (preset small, 16 rows: 6.0 against 18.9 ms a step on an AMD EPYC
# AVX2 host; benchmarks/RESULTS.md "Serving")
FAST_MAX_ROWS = 32


def linear_rows(x_TD: Tensor, w_OD: Tensor, b_O: Tensor | None = None) -> Tensor:
    """x W^T (+ b) for a few rows in the accumulate dtype, reading the stored weights once: the C++ product
    (``moekit.layer.kernels.matvec``) where it runs, else a multiply-reduce written [O, T, D] so that inductor's loop
    runs over the weight rows outside and the tokens inside (the [T, O, D] order read the weights T times)."""
    x_TD = x_TD.to(accumulate_dtype(x_TD, w_OD))
    if matvec.applies(x_TD, w_OD):  # the hand-written product where it builds (x86 with AVX2)
        out_TO = torch.ops.moekit.rows_matvec(x_TD, w_OD)
    else:
        out_TO = (w_OD.to(x_TD.dtype)[:, None, :] * x_TD[None, :, :]).sum(-1).t()
    return out_TO if b_O is None else out_TO + b_O.to(x_TD.dtype)


def attention_in(x_BSD: Tensor, norm_w: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Tensor | None,
                 bk: Tensor | None, bv: Tensor | None, qn_w: Tensor | None, kn_w: Tensor | None, cos_B1SDh: Tensor,
                 sin_B1SDh: Tensor, H: int, G: int, Dh: int, eps: float, qk_eps: float, qk_full: bool,
                 clip: float | None, interleaved: bool, cache_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``Attention.forward`` up to the cache write, on the normalised residual: q [B, H, S, Dh] in the accumulate
    dtype, k and v [B, G, S, Dh] in the cache's dtype."""
    B, S, D = x_BSD.shape
    h_TD = rms_norm(x_BSD, norm_w, eps).view(B * S, D)
    q, k, v = linear_rows(h_TD, wq, bq), linear_rows(h_TD, wk, bk), linear_rows(h_TD, wv, bv)
    if qn_w is not None and qk_full:  # OLMoE: over the whole projection, before the head split
        q, k = rms_norm(q, qn_w, qk_eps), rms_norm(k, kn_w, qk_eps)
    q, k, v = q.view(B, S, H, Dh), k.view(B, S, G, Dh), v.view(B, S, G, Dh)
    if qn_w is not None and not qk_full:  # Qwen3: per head, before RoPE
        q, k = rms_norm(q, qn_w, qk_eps), rms_norm(k, kn_w, qk_eps)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rope(q, cos_B1SDh, sin_B1SDh, interleaved), apply_rope(k, cos_B1SDh, sin_B1SDh, interleaved)
    return q, k.to(cache_dtype), v.to(cache_dtype)


def attention_out(x_BSD: Tensor, q_BHSd: Tensor, k_BGTd: Tensor, v_BGTd: Tensor, start_B: Tensor, wo: Tensor,
                  bo: Tensor | None, sinks_H: Tensor | None, ffn_norm_w: Tensor, window: int | None,
                  eps: float) -> tuple[Tensor, Tensor]:
    """Attention of the new queries over the cache's filled part (each row masked at its own length), the output
    projection and the residual; returns the new residual and its normalised form for the FFN."""
    B, S, D = x_BSD.shape
    o_BHSd = attend(q_BHSd, k_BGTd, v_BGTd, start_B, window, sinks_H)
    o_TD = o_BHSd.transpose(1, 2).reshape(B * S, -1)
    x_BSD = x_BSD.to(q_BHSd.dtype) + linear_rows(o_TD, wo, bo).view(B, S, D)
    return x_BSD, rms_norm(x_BSD, ffn_norm_w, eps)


def head(x_BSD: Tensor, norm_w: Tensor, w_VD: Tensor, eps: float) -> Tensor:
    """The final norm and the output head: logits [B, S, V] in the accumulate dtype."""
    B, S, D = x_BSD.shape
    return linear_rows(rms_norm(x_BSD, norm_w, eps).view(B * S, D), w_VD).view(B, S, -1)


ATTENTION_IN = InductorFn(attention_in, "decode attention (in)")
ATTENTION_OUT = InductorFn(attention_out, "decode attention (out)")
HEAD = InductorFn(head, "decode head")


def fast_path_applies(model: Transformer, ids_BS: Tensor, cache: KVCache | None) -> bool:
    """Does ``decode_step`` run its kernels for this call (else it runs ``model.forward``)?"""
    if cache is None or os.environ.get("MOEKIT_DECODE") == "eager" or kernels_turned_off(decode_alias=True):
        return False
    if ids_BS.device.type != "cpu" or ids_BS.numel() > FAST_MAX_ROWS:
        return False
    # (the FFN kernels too: their eager fallbacks expect activations in the weights' dtype)
    if not all(f.enabled for f in (ATTENTION_IN, ATTENTION_OUT, HEAD, DECODE_KERNEL, ROUTED_DECODE)):
        return False
    return _plan(model) is not None


class _Layer:
    """One layer's arguments for the kernels, gathered once per model (``_plan``)."""

    def __init__(self, block, cfg):
        a = block.attn
        w = [t.detach() for t in (block.attn_norm.weight, a.wq.weight, a.wk.weight, a.wv.weight)]
        biases = [None if m.bias is None else m.bias.detach() for m in (a.wq, a.wk, a.wv)]
        norms = [None if n is None else n.weight.detach() for n in (a.q_norm, a.k_norm)]
        self.layer = a.layer
        self.attn_in = (*w, *biases, *norms)
        self.attn_in_consts = (a.n_heads, a.n_kv_heads, a.head_dim, float(block.attn_norm.eps), float(cfg.norm_eps),
                               a.qk_norm_full, None if cfg.clip_qkv is None else float(cfg.clip_qkv),
                               a.rope_interleaved)
        self.attn_out = (a.wo.weight.detach(), None if a.wo.bias is None else a.wo.bias.detach(),
                         None if a.sinks is None else a.sinks.detach(), block.ffn_norm.weight.detach())
        self.attn_out_consts = (a.window, float(block.ffn_norm.eps))
        self.ffn = block.ffn
        self.moe = isinstance(block.ffn, MoE)


def _supported(block) -> bool:
    """Plain modules only (a quantized or sharded layer keeps the reference path: its weights are not tensors)."""
    a = block.attn
    if type(a) is not Attention or any(type(m) is not nn.Linear for m in (a.wq, a.wk, a.wv, a.wo)):
        return False
    ffn = block.ffn
    if isinstance(ffn, MoE):
        # dense experts, or ones that declare their own few-token path (compressed experts read packed weights)
        return (type(ffn.experts) is Experts or getattr(ffn.experts, "decode_step_ready", False)) and ffn.dispatcher is None
    return type(ffn) is MLP


def _plan(model: Transformer) -> list[_Layer] | None:
    """The per-layer arguments, cached on the model and rebuilt when any parameter tensor is replaced (``.to()``,
    a quantized or reloaded module); None where a layer is not supported."""
    key = tuple(id(p) for p in model.parameters())
    cached = model.__dict__.get("_decode_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = [_Layer(b, model.config) for b in model.layers] if all(_supported(b) for b in model.layers) else None
    model.__dict__["_decode_plan"] = (key, layers)
    return layers


@torch.no_grad()
def decode_step(model: Transformer, ids_BS: Tensor, cache: KVCache) -> Tensor:
    """Feed ``ids_BS`` (a few new tokens per row) through the model into ``cache``; returns the logits of every new
    position [B, S, V] in fp32 (float64 for a float64 model). The same as ``model(ids_BS, cache=cache,
    aux=False).logits`` (see the module docstring), which runs where the fast path does not apply."""
    out = _fast_step(model, ids_BS, cache) if fast_path_applies(model, ids_BS, cache) else None
    if out is None:  # (or a kernel could not be built: it warned once, and the reference runs from now on)
        acc = accumulate_dtype(model.tok_emb.weight)
        return model(ids_BS, cache=cache, aux=False, activation_dtype=activation_dtype(model)).logits.to(acc)
    return out


@torch.no_grad()
def _fast_step(model: Transformer, ids_BS: Tensor, cache: KVCache) -> Tensor | None:
    cfg = model.config
    B, S = ids_BS.shape
    pos0 = cache.pos
    cache.reserve(S)  # a clear error past the cache's length
    if pos0 + S > cfg.max_seq_len:
        raise ValueError(f"max_seq_len: sequence of {pos0 + S} tokens exceeds {cfg.max_seq_len}")
    start_B = cache.start if isinstance(cache.start, Tensor) else torch.full((B,), pos0, dtype=torch.long)
    pos_BS = start_B[:, None] + torch.arange(S)
    cos, sin = model.rope_cos[pos_BS].unsqueeze(1), model.rope_sin[pos_BS].unsqueeze(1)  # [B, 1, S, Dh]
    acc = accumulate_dtype(model.tok_emb.weight)
    x = model.tok_emb(ids_BS).to(acc)
    for lp in _plan(model):
        qkv = ATTENTION_IN((x, *lp.attn_in, cos, sin), (*lp.attn_in_consts, cache.k[lp.layer].dtype))
        if qkv is None:
            return None
        k_all, v_all = cache.update(lp.layer, qkv[1], qkv[2])
        xh = ATTENTION_OUT((x, qkv[0], k_all, v_all, start_B, *lp.attn_out), lp.attn_out_consts)
        if xh is None:
            return None
        x, h = xh
        y = lp.ffn(h, False).out if lp.moe else lp.ffn(h)  # the layer's own few-token path (one kernel)
        x = x + y.to(acc)
    cache.advance(S)
    w_head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
    return HEAD((x, model.norm.weight.detach(), w_head.detach()), (float(model.norm.eps),))
