"""Group-wise weight-only quantization: the stored form (``QuantizedTensor``), exact bit packing, round-to-nearest.

Legend: O output rows, I input columns (the dim a row is grouped along), G groups per row, g group size, E experts
(any leading dims), N codes per packed row, B bytes per packed row.

A weight ``w [..., O, I]`` (a Linear ``[O, I]`` or stacked experts ``[E, O, I]``) is cut along I into G = ceil(I / g)
groups of g columns (the last one zero-padded); each group has an fp16 scale s and, asymmetric, an fp16 zero z, and
each weight a b-bit code q in [0, 2^b - 1]: w ~ s (q - z). Symmetric groups have the implicit zero z = 2^(b-1) and
store no zero (GPTQ's convention, Frantar et al. 2022, ``quant.py``: s = 2 max|w| / (2^b - 1)).

Packing (``pack_codes``/``unpack_codes``) is exact for every width: the codes of a row are cut into units of
lcm(8, b) bits (8-bit: 1 code in 1 byte; 4-bit: 2 in 1; 2-bit: 4 in 1; 3-bit: 8 codes in 3 bytes), code j of a unit
at bits [j b, (j + 1) b), little-endian. A row is padded with zero codes to whole groups and whole units. 8-bit
symmetric codes are stored as two's-complement bytes (q - 128, i.e. q xor 0x80), so ``packed.view(torch.int8)`` is
the signed weight ``torch.ops.aten._weight_int8pack_mm`` reads.

Round-to-nearest (``quantize_rtn``) rounds the scale *up* to fp16 and computes the codes with the stored (rounded)
scale and zero, so every element is within half a step of its group's stored scale (tested): the grid covers the
group's range [min(w, 0), max(w, 0)] with an integer zero. ``effective_bits`` counts every stored byte (codes,
padding, scales, zeros) over the real weights; a tensor's width, group size and shape (a few bytes in config.json)
are not counted.

Imports: torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

WIDTHS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, None)  # None: the whole row is one group
SCALE_DTYPE = torch.float16
_SCALE_MIN = 2.0**-24  # fp16's smallest subnormal: an all-zero group still gets a positive step


def check_width(bits: int, where: str = "bits") -> None:
    if bits not in WIDTHS or isinstance(bits, bool):
        raise ValueError(f"{where}: unsupported width {bits!r}; supported widths are {', '.join(map(str, WIDTHS))}")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: ``bits`` per code, ``group_size`` columns per scale (None: the whole row), symmetric or not."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_width(self.bits)
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size: unsupported value {self.group_size!r}; expected one of 32, 64, 128 or "
                             "None (the whole row)")

    def group_for(self, in_features: int) -> int:
        """The group length on a row of ``in_features`` columns (a group never exceeds the row)."""
        return in_features if self.group_size is None else min(self.group_size, in_features)

    def with_bits(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.group_size, self.symmetric)


def unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing unit: lcm(8, bits) bits."""
    bits_per_unit = math.lcm(8, bits)
    return bits_per_unit // bits, bits_per_unit // 8


def padded_codes(in_features: int, group: int, bits: int) -> int:
    """Codes stored per row: whole groups, rounded up to whole packing units."""
    n = math.ceil(in_features / group) * group
    vals, _ = unit(bits)
    return math.ceil(n / vals) * vals


def pack_codes(codes_XN: Tensor, bits: int) -> Tensor:
    """Codes (any integer dtype, values in [0, 2^bits)) -> uint8 [..., N * bits / 8]; N a whole number of units."""
    check_width(bits)
    vals, nbytes = unit(bits)
    N = codes_XN.shape[-1]
    if N % vals:
        raise ValueError(f"pack_codes: {N} codes per row is not a whole number of {vals}-code units ({bits}-bit)")
    if bits == 8:
        return codes_XN.to(torch.uint8).contiguous()
    c_XUV = codes_XN.to(torch.int32).reshape(*codes_XN.shape[:-1], N // vals, vals)
    shifts_V = torch.arange(vals, dtype=torch.int32, device=codes_XN.device) * bits
    word_XU = (c_XUV << shifts_V).sum(-1, dtype=torch.int32)  # <= 24 bits: exact in int32
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=codes_XN.device) * 8
    bytes_XUb = (word_XU[..., None] >> byte_shifts) & 0xFF
    return bytes_XUb.to(torch.uint8).reshape(*codes_XN.shape[:-1], N // vals * nbytes)


def unpack_codes(packed_XB: Tensor, bits: int) -> Tensor:
    """The inverse of :func:`pack_codes`: uint8 [..., B] -> uint8 codes [..., B * 8 / bits]."""
    check_width(bits)
    if packed_XB.dtype != torch.uint8:
        raise ValueError(f"unpack_codes: packed codes must be uint8, got {packed_XB.dtype}")
    if bits == 8:
        return packed_XB
    vals, nbytes = unit(bits)
    B = packed_XB.shape[-1]
    if B % nbytes:
        raise ValueError(f"unpack_codes: {B} bytes per row is not a whole number of {nbytes}-byte units ({bits}-bit)")
    b_XUb = packed_XB.to(torch.int32).reshape(*packed_XB.shape[:-1], B // nbytes, nbytes)
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=packed_XB.device) * 8
    word_XU = (b_XUb << byte_shifts).sum(-1, dtype=torch.int32)
    shifts_V = torch.arange(vals, dtype=torch.int32, device=packed_XB.device) * bits
    codes_XUV = (word_XU[..., None] >> shifts_V) & ((1 << bits) - 1)
    return codes_XUV.to(torch.uint8).reshape(*packed_XB.shape[:-1], B // nbytes * vals)


@dataclass
class QuantizedTensor:
    """A quantized weight of logical ``shape`` [..., O, I]: ``packed`` uint8 [..., O, B], ``scales`` fp16
    [..., O, G], ``zeros`` fp16 [..., O, G] (None when symmetric). ``group_size`` is the group length used (the
    row length for whole-row groups). Shapes and dtypes are validated on construction (errors say which part)."""

    packed: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        check_width(self.bits)
        if len(self.shape) < 2 or min(self.shape) < 1:
            raise ValueError(f"shape: a quantized weight is [..., out, in] with positive sizes, got {list(self.shape)}")
        if not 1 <= self.group_size <= self.shape[-1]:
            raise ValueError(f"group_size: {self.group_size} is not in [1, {self.shape[-1]}] (the row length)")
        lead, I = self.shape[:-1], self.shape[-1]
        want_packed = (*lead, padded_codes(I, self.group_size, self.bits) * self.bits // 8)
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != want_packed:
            raise ValueError(f"packed: expected uint8 {list(want_packed)} for a {self.bits}-bit {list(self.shape)} "
                             f"weight in groups of {self.group_size}, got {self.packed.dtype} "
                             f"{list(self.packed.shape)}")
        want_scales = (*lead, math.ceil(I / self.group_size))
        for part, t in (("scales", self.scales), ("zeros", self.zeros)):
            if part == "zeros" and self.symmetric:
                if t is not None:
                    raise ValueError("zeros: a symmetric weight stores no zeros (the zero is 2^(bits-1))")
                continue
            if t is None:
                raise ValueError(f"{part}: missing (an asymmetric weight needs scales and zeros)")
            if t.dtype != SCALE_DTYPE or tuple(t.shape) != want_scales:
                raise ValueError(f"{part}: expected {SCALE_DTYPE} {list(want_scales)}, got {t.dtype} {list(t.shape)}")

    # -------------------------------------------------------------------- accounting
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Every stored byte: packed codes (with their padding), scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros) if t is not None)

    @property
    def effective_bits(self) -> float:
        """Stored bits per real weight (metadata included)."""
        return 8 * self.nbytes / self.numel

    @property
    def groups(self) -> int:
        return self.scales.shape[-1]

    # -------------------------------------------------------------------- reading
    def zero_point(self) -> Tensor:
        """The zero of every group, [..., O, G] (the implicit 2^(bits-1) when symmetric)."""
        if self.zeros is not None:
            return self.zeros
        return torch.full_like(self.scales, float(1 << (self.bits - 1)))

    def codes(self) -> Tensor:
        """The b-bit codes, uint8 [..., O, G * g] (padding past I included)."""
        codes = unpack_codes(self.packed, self.bits)
        if self.bits == 8 and self.symmetric:
            codes = codes ^ 0x80  # stored as two's complement q - 128
        return codes[..., : self.groups * self.group_size]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """w [..., O, I] = s (q - z), computed in fp32 (exact: an fp16 scale times a small integer) or float64."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        G, g = self.groups, self.group_size
        q_XOGg = self.codes().view(*self.shape[:-1], G, g).to(acc)
        w = (q_XOGg - self.zero_point().to(acc)[..., None]) * self.scales.to(acc)[..., None]
        return w.reshape(*self.shape[:-1], G * g)[..., : self.shape[-1]].to(dtype)

    def select(self, index: int | Tensor) -> QuantizedTensor:
        """Rows of the first (leading) dim: ``qt.select(e)`` is expert e's [O, I] weight, ``qt.select(idx)`` a stack."""
        if len(self.shape) < 3:
            raise ValueError(f"select: a {len(self.shape)}-D weight has no leading (expert) dim")
        pick = (lambda t: None if t is None else t[index])
        packed = self.packed[index]
        n = () if packed.dim() == len(self.shape) - 1 else (packed.shape[0],)
        return QuantizedTensor(packed, pick(self.scales), pick(self.zeros), self.bits, self.group_size,
                               self.symmetric, (*n, *self.shape[1:]))

    def int8_weight(self) -> Tensor | None:
        """The signed int8 view [..., O, I] that ``_weight_int8pack_mm`` reads, where this layout applies (8-bit,
        symmetric, one group per row, no padding), else None."""
        if self.bits == 8 and self.symmetric and self.groups == 1 and self.packed.shape[-1] == self.shape[-1]:
            return self.packed.view(torch.int8)
        return None


# ------------------------------------------------------------------------ round to nearest
def group_view(w: Tensor, group: int) -> Tensor:
    """w [..., O, I] -> [..., O, G, g] in fp32 (float64 stays float64), the last group zero-padded."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    I = w.shape[-1]
    G = math.ceil(I / group)
    w = w.detach().to(acc)
    if G * group != I:
        w = torch.nn.functional.pad(w, (0, G * group - I))
    return w.reshape(*w.shape[:-1], G, group)


def fp16_round_up(x: Tensor) -> Tensor:
    """The smallest fp16 value >= x (a scale rounded up keeps the group's range on the grid)."""
    h = x.clamp_min(_SCALE_MIN).to(SCALE_DTYPE)
    h = torch.where(h.to(x.dtype) < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    if not torch.isfinite(h).all():
        raise ValueError(f"scales: a group's step exceeds fp16's range (max {x.max().item():.4g})")
    return h


def rtn_params(w_XOGg: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Min/max scale (rounded up to fp16) and integer zero of every group (GPTQ ``quant.py``'s ranges: the range
    includes 0, so the zero lies in [0, 2^b - 1])."""
    maxq = (1 << bits) - 1
    if symmetric:
        absmax = w_XOGg.abs().amax(-1)
        return fp16_round_up(2 * absmax / maxq), None
    lo, hi = w_XOGg.amin(-1).clamp(max=0), w_XOGg.amax(-1).clamp(min=0)
    scale = fp16_round_up((hi - lo) / maxq)
    zero = torch.round(-lo / scale.to(lo.dtype)).clamp(0, maxq)
    return scale, zero.to(SCALE_DTYPE)


def encode(w_XOGg: Tensor, scale_XOG: Tensor, zero_XOG: Tensor | None, bits: int) -> Tensor:
    """Codes q = clamp(round(w / s + z), 0, 2^b - 1) with the stored scale and zero, uint8 [..., O, G, g]."""
    acc = w_XOGg.dtype
    z = float(1 << (bits - 1)) if zero_XOG is None else zero_XOG.to(acc)[..., None]
    q = torch.round(w_XOGg / scale_XOG.to(acc)[..., None] + z)
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8)


def from_codes(codes_XOGg: Tensor, scale_XOG: Tensor, zero_XOG: Tensor | None, spec: QuantSpec,
               shape: tuple[int, ...]) -> QuantizedTensor:
    """Pack codes [..., O, G, g] (with their fp16 scales and zeros) into a :class:`QuantizedTensor` of ``shape``."""
    G, g = codes_XOGg.shape[-2:]
    I = shape[-1]
    codes = codes_XOGg.reshape(*codes_XOGg.shape[:-2], G * g)[..., :I]
    N = padded_codes(I, g, spec.bits)
    if N > I:  # padding codes are 0, whatever the method: equal weights give equal bytes
        codes = torch.nn.functional.pad(codes, (0, N - I))
    if spec.bits == 8 and spec.symmetric:
        codes = codes ^ 0x80  # two's complement q - 128: the int8 layout of _weight_int8pack_mm
    return QuantizedTensor(pack_codes(codes, spec.bits), scale_XOG.to(SCALE_DTYPE).contiguous(),
                           None if zero_XOG is None else zero_XOG.to(SCALE_DTYPE).contiguous(),
                           spec.bits, int(g), spec.symmetric, tuple(shape))


def quantize_rtn(w: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest group-wise quantization of w [..., O, I], vectorised over every leading dim and group."""
    if w.dim() < 2:
        raise ValueError(f"quantize: a weight is [..., out, in], got shape {list(w.shape)}")
    g = spec.group_for(w.shape[-1])
    w_XOGg = group_view(w, g)
    scale, zero = rtn_params(w_XOGg, spec.bits, spec.symmetric)
    return from_codes(encode(w_XOGg, scale, zero, spec.bits), scale, zero, spec, tuple(w.shape))


def effective_bits_of(shape: tuple[int, ...], spec: QuantSpec) -> float:
    """Effective bits per weight of a ``shape`` weight under ``spec`` without quantizing it (see :func:`bits_of`)."""
    return bits_of(shape, spec) / math.prod(shape)


def bits_of(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Stored bits (an integer) of a ``shape`` weight under ``spec``: exactly ``8 * QuantizedTensor.nbytes``."""
    *lead, I = shape
    rows = math.prod(lead)
    g = spec.group_for(I)
    meta = math.ceil(I / g) * (16 if spec.symmetric else 32)  # fp16 scale (+ fp16 zero) per group
    return rows * (padded_codes(I, g, spec.bits) * spec.bits + meta)
