"""Execution of quantized weights: ``QuantizedExperts``, ``QuantizedMLP`` and ``QuantizedLinear`` keep the packed
codes and compute from them, never holding all experts in high precision; and the swap of a model's modules.

Legend: A rows sorted by expert, T tokens, K top-k, D dim, E experts, I input-projection width, F ffn width,
O output rows.

``QuantizedExperts`` stands in for ``moekit.layer.experts.Experts`` where ``MoE`` uses it (``cast_input``,
``forward(x_AD, plan)``, ``decode``, ``decode_eligible``). Each expert has its own width; the experts of one width
are stacked ([E_b, I, D] codes) under ``w_in["b<bits>"]`` / ``w_out["b<bits>"]``. A call with rows dequantizes one
active expert at a time into the compute dtype and runs it on its rows (``ffn``), so the high-precision copy alive
at once is one expert's; an expert without rows is never read. ``decode`` (few tokens, no plan) does the same for
the chosen experts only, where the packed-weight kernel does not apply. Where it does (a few fp32 rows, 2/4/8-bit
stacks: ``moekit.compress.kernels``), ``decode_eligible`` is True and ``decode`` reads the chosen experts' packed rows
directly, one kernel call per width and projection, with no host read of the routing; ``routed_decode`` is False
(``MoE``'s one-kernel router and experts, ``ROUTED_DECODE``, takes dense stacks), so the router runs first. 8-bit symmetric weights with one group per row multiply through
``torch.ops.aten._weight_int8pack_mm`` (int8 [O, I] weight, one scale per row; torch 2.13 CPU takes fp32, fp16 and
bf16 activations), which reads the int8 codes directly.

``quantize_model_`` puts quantized modules in place of the float ones, ``dequantize_model_`` puts float modules
(holding the dequantized weights) back.

Imports: ``moekit.compress.quantize``, ``moekit.layer``, ``moekit.model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.compress import kernels
from moekit.compress.quantize import QuantizedTensor, padded_codes
from moekit.layer.experts import MLP, Experts
from moekit.layer.ffn import activate, compute_dtype, ffn_in_width


class PackedWeight(nn.Module):
    """A ``QuantizedTensor`` as buffers (``packed``, ``scales``, ``zeros``) so that ``.to()`` and ``state_dict``
    carry it; ``qt`` is the tensor view (validated)."""

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        self.bits, self.group_size, self.symmetric, self.shape = qt.bits, qt.group_size, qt.symmetric, qt.shape
        self.register_buffer("packed", qt.packed)
        self.register_buffer("scales", qt.scales)
        self.register_buffer("zeros", qt.zeros)

    @classmethod
    def empty(cls, shape: tuple[int, ...], bits: int, group_size: int, symmetric: bool,
              device: str | torch.device = "meta") -> PackedWeight:
        """Buffers of the right shapes, unfilled (a skeleton to load a checkpoint into)."""
        *lead, I = shape
        G = -(-I // group_size)
        packed = torch.empty(*lead, padded_codes(I, group_size, bits) * bits // 8, dtype=torch.uint8, device=device)
        scales = torch.empty(*lead, G, dtype=torch.float16, device=device)
        zeros = None if symmetric else torch.empty_like(scales)
        return cls(QuantizedTensor(packed, scales, zeros, bits, group_size, symmetric, tuple(shape)))

    def _apply(self, fn, recurse=True):
        """Device moves apply, dtype casts do not (``model.float()`` / ``.bfloat16()`` must leave the uint8 codes
        and fp16 scales as they are: they are the format, and a cast through bf16 would round the scales)."""
        for name in ("packed", "scales", "zeros"):
            t = self._buffers.get(name)
            if t is not None:
                new = fn(t)
                self._buffers[name] = new if new.dtype == t.dtype else t.to(new.device)
        return self

    @property
    def qt(self) -> QuantizedTensor:
        return QuantizedTensor(self.packed, self.scales, self.zeros, self.bits, self.group_size, self.symmetric,
                               self.shape)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"


def qlinear(x: Tensor, qt: QuantizedTensor, bias: Tensor | None = None) -> Tensor:
    """x [..., I] @ W^T (+ b) for a quantized [O, I] weight: a few fp32 rows through the packed-weight kernel
    (``moekit.compress.kernels``), the int8 kernel where its layout applies, else the weight dequantized to x's
    dtype (float64 in float64)."""
    if kernels.applies(x, qt):  # a few fp32 rows (decode): read packed, never dequantized to memory
        y = kernels.q_rows_matvec(x.reshape(-1, x.shape[-1]), qt).view(*x.shape[:-1], qt.shape[0])
        return y if bias is None else y + bias.to(y.dtype)
    w8 = qt.int8_weight()
    if w8 is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, w8, qt.scales[..., 0].to(x.dtype).contiguous())
        y = y.view(*x.shape[:-1], qt.shape[0])
        return y if bias is None else y + bias.to(y.dtype)
    return F.linear(x, qt.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a quantized weight (``weight.packed`` ...) and a float bias."""

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None):
        super().__init__()
        if len(qt.shape) != 2:
            raise ValueError(f"QuantizedLinear: the weight must be 2-D [out, in], got {list(qt.shape)}")
        self.out_features, self.in_features = qt.shape
        self.weight = PackedWeight(qt)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return qlinear(x.to(compute_dtype(x)), self.weight.qt, self.bias)

    def to_float(self, dtype: torch.dtype) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                        device=self.weight.packed.device)
        with torch.no_grad():
            lin.weight.copy_(self.weight.qt.dequantize(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def _float_param(t: Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=False)


class QuantizedMLP(nn.Module):
    """The dense FFN / shared expert (``moekit.layer.experts.MLP``) with quantized w_in [I, D] and w_out [D, F]."""

    def __init__(self, like: MLP, q_in: QuantizedTensor, q_out: QuantizedTensor):
        super().__init__()
        self.activation, self.limit, self.alpha = like.activation, like.limit, like.alpha
        self.w_in, self.w_out = PackedWeight(q_in), PackedWeight(q_out)
        self.b_in, self.b_out = _float_param(like.b_in), _float_param(like.b_out)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(compute_dtype(x))
        h = activate(qlinear(x, self.w_in.qt, self.b_in), self.activation, self.limit, self.alpha)
        return qlinear(h, self.w_out.qt, self.b_out)

    def to_float(self, dtype: torch.dtype) -> MLP:
        I, D = self.w_in.shape
        F_ = self.w_out.shape[1]
        with torch.device(self.w_in.packed.device):
            mlp = MLP(D, F_, self.activation, self.b_in is not None, self.limit, self.alpha).to(dtype)
        with torch.no_grad():
            mlp.w_in.copy_(self.w_in.qt.dequantize(dtype))
            mlp.w_out.copy_(self.w_out.qt.dequantize(dtype))
            for name in ("b_in", "b_out"):
                if getattr(self, name) is not None:
                    getattr(mlp, name).copy_(getattr(self, name))
        return mlp


class QuantizedExperts(nn.Module):
    """E experts, expert e at width ``widths[e]`` (see the module docstring)."""

    backend = "quantized"  # not "auto": MoE then never routes training calls through the compiled layer
    decode_step_ready = True  # moekit.model.decode's fast step may call the MoE layer holding these (decode below)
    routed_decode = False  # MoE's one-kernel router + experts (ROUTED_DECODE) reads dense stacks: route, then decode

    def __init__(self, like: Experts, widths: list[int], stacks: dict[int, tuple[QuantizedTensor, QuantizedTensor]]):
        super().__init__()
        E = like.n_experts
        if len(widths) != E:
            raise ValueError(f"widths: {len(widths)} widths for {E} experts")
        self.n_experts, self.dim, self.ffn_dim = E, like.dim, like.ffn_dim
        self.activation, self.limit, self.alpha = like.activation, like.limit, like.alpha
        self.expert_offset = like.expert_offset
        self.float_backend = like.backend  # what ``to_float`` restores
        self.widths = [int(b) for b in widths]
        self.slot = []  # expert e -> (width, index in that width's stack)
        counts: dict[int, int] = {}
        for b in self.widths:
            self.slot.append((b, counts.get(b, 0)))
            counts[b] = counts.get(b, 0) + 1
        I = ffn_in_width(like.ffn_dim, like.activation)
        self.w_in, self.w_out = nn.ModuleDict(), nn.ModuleDict()
        for b, n in sorted(counts.items()):
            if b not in stacks:
                raise ValueError(f"stacks: no {b}-bit weights for the {n} experts at that width")
            q_in, q_out = stacks[b]
            if q_in.shape != (n, I, like.dim) or q_out.shape != (n, like.dim, like.ffn_dim) or q_in.bits != b:
                raise ValueError(f"stacks[{b}]: expected {b}-bit [{n}, {I}, {like.dim}] and [{n}, {like.dim}, "
                                 f"{like.ffn_dim}], got {q_in.bits}-bit {list(q_in.shape)} and {list(q_out.shape)}")
            self.w_in[f"b{b}"], self.w_out[f"b{b}"] = PackedWeight(q_in), PackedWeight(q_out)
        self.b_in, self.b_out = _float_param(like.b_in), _float_param(like.b_out)

    def expert(self, e: int) -> tuple[QuantizedTensor, QuantizedTensor]:
        """Expert e's quantized (w_in [I, D], w_out [D, F])."""
        b, j = self.slot[e]
        return self.w_in[f"b{b}"].qt.select(j), self.w_out[f"b{b}"].qt.select(j)

    def _run(self, e: int, x_ND: Tensor) -> Tensor:
        q_in, q_out = self.expert(e)
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        h = activate(qlinear(x_ND, q_in, b_in), self.activation, self.limit, self.alpha)
        return qlinear(h, q_out, b_out)

    def cast_input(self, x: Tensor) -> Tensor:
        return x.to(compute_dtype(x))

    def forward(self, x_AD: Tensor, plan) -> Tensor:
        """Each expert with rows on its contiguous slice of the sorted rows, dequantized one at a time."""
        x_AD = x_AD.to(compute_dtype(x_AD))
        out_AD = x_AD.new_empty(x_AD.shape[0], self.dim)
        start = 0
        for e, n in enumerate(plan.rows_per_expert_E.tolist()):  # the one host read
            if n:
                out_AD[start:start + n] = self._run(e, x_AD[start:start + n])
            start += n
        return out_AD

    def decode_eligible(self, x_TD: Tensor, top_k: int) -> bool:
        """A few fp32 tokens without autograd, every stack in a layout the packed-weight kernel reads."""
        stacks = self._packed_stacks()
        return (x_TD.shape[0] * top_k <= kernels.MAX_ROWS and not torch.is_grad_enabled()
                and compute_dtype(x_TD) == torch.float32 and x_TD.device.type == "cpu" and stacks is not None
                and kernels.applies(x_TD, stacks[0][1]))

    def _packed_stacks(self) -> list[tuple[int, QuantizedTensor, QuantizedTensor]] | None:
        """(width, w_in, w_out) of every stack, or None where one is not a kernel layout; built once per set of
        buffers (a ``QuantizedTensor`` validates its parts when made: not per decode token)."""
        key = tuple(id(m.packed) for m in (*self.w_in.values(), *self.w_out.values()))
        cached = self.__dict__.get("_stacks")
        if cached is None or cached[0] != key:
            stacks = [(int(k[1:]), self.w_in[k].qt, self.w_out[k].qt) for k in self.w_in]
            ok = all(kernels.layout_applies(q) for _, a, b in stacks for q in (a, b))
            cached = (key, stacks if ok else None)
            self.__dict__["_stacks"] = cached
        return cached[1]

    def decode(self, x_TD: Tensor, topk_idx_TK: Tensor, topk_weight_TK: Tensor) -> Tensor:
        """out_t = sum_k w_tk expert_{e_tk}(x_t), reading only the chosen experts' packed rows: each width's stack
        takes the rows routed to it (the others get index -1 and are skipped), no host read of the routing."""
        if self.decode_eligible(x_TD, topk_idx_TK.shape[-1]):
            return self._decode_packed(x_TD.detach().float(), topk_idx_TK, topk_weight_TK)
        return self._decode_dequantized(x_TD, topk_idx_TK, topk_weight_TK)

    def _slots(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(width, index in that width's stack) of every expert, as tensors (built once)."""
        cached = self.__dict__.get("_slot_tensors")
        if cached is None or cached[0].device != device:
            cached = (torch.tensor([b for b, _ in self.slot], device=device),
                      torch.tensor([j for _, j in self.slot], device=device))
            self.__dict__["_slot_tensors"] = cached
        return cached

    def _decode_packed(self, x_TD: Tensor, topk_idx_TK: Tensor, topk_weight_TK: Tensor) -> Tensor:
        T, K = topk_idx_TK.shape
        width_E, slot_E = self._slots(x_TD.device)
        e_R = topk_idx_TK.reshape(-1) - (self.expert_offset or 0)  # (a shard's ids start at its offset)
        width_R, slot_R = width_E[e_R], slot_E[e_R]
        stacks = self._packed_stacks()
        h_RI = None
        idx_of = {}
        for b, q_in, _ in stacks:  # one call per width (one in a uniform model): rows of other widths skipped
            idx_of[b] = idx = slot_R if len(stacks) == 1 else torch.where(width_R == b, slot_R, -1)
            part = kernels.q_experts_matvec(x_TD, q_in, idx)
            h_RI = part if h_RI is None else h_RI + part
        if self.b_in is not None:
            h_RI = h_RI + self.b_in[e_R].float()
        a_RF = activate(h_RI, self.activation, self.limit, self.alpha)
        y_RD = None
        for b, _, q_out in stacks:
            part = kernels.q_experts_matvec(a_RF, q_out, idx_of[b])
            y_RD = part if y_RD is None else y_RD + part
        if self.b_out is not None:
            y_RD = y_RD + self.b_out[e_R].float()
        return (y_RD.view(T, K, self.dim) * topk_weight_TK.float()[..., None]).sum(1)

    def _decode_dequantized(self, x_TD: Tensor, topk_idx_TK: Tensor, topk_weight_TK: Tensor) -> Tensor:
        x_TD = x_TD.detach().to(compute_dtype(x_TD))
        out_TD = x_TD.new_zeros(x_TD.shape[0], self.dim)
        for e in torch.unique(topk_idx_TK).tolist():
            hit_TK = topk_idx_TK == e
            rows = hit_TK.any(-1).nonzero().squeeze(-1)
            w_N = (topk_weight_TK[rows] * hit_TK[rows]).sum(-1).to(out_TD.dtype)
            out_TD.index_add_(0, rows, self._run(e, x_TD[rows]) * w_N[:, None])
        return out_TD

    def decode_weights(self):
        raise NotImplementedError("QuantizedExperts keeps packed weights: there are no dense decode weights")

    def to_float(self, dtype: torch.dtype) -> Experts:
        with torch.device(next(iter(self.buffers())).device):
            ex = Experts(self.n_experts, self.dim, self.ffn_dim, self.activation, self.float_backend,
                         bias=self.b_in is not None, swiglu_limit=self.limit, swiglu_alpha=self.alpha).to(dtype)
        with torch.no_grad():
            for e in range(self.n_experts):
                q_in, q_out = self.expert(e)
                ex.w_in[e].copy_(q_in.dequantize(dtype))
                ex.w_out[e].copy_(q_out.dequantize(dtype))
            for name in ("b_in", "b_out"):
                if getattr(self, name) is not None:
                    getattr(ex, name).copy_(getattr(self, name))
        ex.expert_offset = self.expert_offset
        return ex

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, widths={self.widths}"


QUANTIZED = (QuantizedExperts, QuantizedMLP, QuantizedLinear)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def quantize_model_(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """Put the quantized ``modules`` ({dotted path: QuantizedExperts | QuantizedMLP | QuantizedLinear}) in place."""
    for path, m in modules.items():
        if not isinstance(m, QUANTIZED):
            raise ValueError(f"{path}: {type(m).__name__} is not a quantized module")
        model.get_submodule(path)  # a clear error for a path that is not in the model
        set_module(model, path, m)
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED)}


def dequantize_model_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Every quantized module back to its float module, holding the dequantized weights (in ``dtype``, default the
    embedding's dtype)."""
    dtype = dtype or model.tok_emb.weight.dtype
    for path, m in list(quantized_modules(model).items()):
        set_module(model, path, m.to_float(dtype))
    return model
