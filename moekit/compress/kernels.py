"""Matrix-vector products straight from packed 2-, 4- and 8-bit weights, for a few rows (decode): hand-written C++.

Legend: T rows (tokens, or token-expert pairs), O output width, I input width, E experts, G groups per weight row,
g group size, B packed bytes per weight row, c codes per byte (8 / bits).

    q_rows_matvec(x_TI, qt [O, I])              out_TO = x_TI @ W^T                 every row against one matrix
    q_experts_matvec(x_NI, qt [E, O, I], idx_R) out_RO[r] = W[idx_R[r]] @ x[r // k]  each row against its expert's
                                                (idx -1: the row is skipped, its output is 0)

A decode token's time is the bytes of weights it reads, so a 4-bit weight is read 4x faster than a bf16 one only if
nothing dequantizes it to memory first (``QuantizedTensor.dequantize`` writes a full fp32 copy of the matrix). The
kernel reads each packed row once for all T rows and computes, per group (w = s (q - z), quantize.py):

    sum_j w_j x_j = s * (sum_j q_j x_j  -  z * sum_j x_j)

with x rounded once per call to int8 in blocks of ``x_block`` (128, 64 or 32) columns, each with the scale
absmax / 127 (llama.cpp rounds activations to its Q8 blocks the same way, and for the same reason): the inner product
is then integer codes times int8 x, 32 at a time (``maddubs`` then ``madd`` into int32 lanes), and one fp32 FMA per
block applies the block's scale times the group's. ``rounded_x`` is that rounded x, what the tests compare against
in float64 (and the exact x within the rounding bound). 32 codes come from 16 packed bytes (4-bit: the low nibbles
then the high ones) or half of 16 bytes (2-bit) or 32 bytes (8-bit, as signed q - 128 against the zero z - 128,
their sign moved onto x since ``maddubs`` takes an unsigned operand); the x codes are permuted to that lane order
when they are rounded. The scales stay fp16 as stored, converted per group. Weight rows are split over the OpenMP
threads. Measured: benchmarks/RESULTS.md, "Compressed models: decode from packed weights".

It applies to 2-, 4- and 8-bit codes in groups of whole 32-code vectors (2-bit: 64), every 32/64/128 group and a
whole-row group when the row is; 3-bit codes (8 in 3 bytes) and other layouts keep the dequantize path. Built by
TorchInductor's C++ toolchain like ``moekit.layer.kernels.matvec`` (the same host requirements: x86 with AVX2 and
FMA; elsewhere ``applies`` is False and the dequantize path runs).

Imports: ``moekit.compress.quantize``, ``moekit.layer.kernels``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from moekit.compress.quantize import QuantizedTensor
from moekit.layer.kernels import matvec

log = logging.getLogger("moekit")

MAX_ROWS = 8  # a few rows (decode); past that, dequantizing one expert and a GEMM wins

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <immintrin.h>

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp != 0) u = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) u = sign;
    else { float f = man * (1.0f / 16777216.0f); std::memcpy(&u, &f, 4); u |= sign; }
    float f; std::memcpy(&f, &u, 4); return f;
#endif
}

static inline float hsum(__m256 v) {
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s4 = _mm_hadd_ps(s4, s4);
    s4 = _mm_hadd_ps(s4, s4);
    return _mm_cvtss_f32(s4);
}

// The next 32 codes of a packed row as 32 bytes, in the lane order of the permuted x (see prepare), and how many
// packed bytes they took. 4-bit: 16 bytes, low nibbles then high nibbles; 2-bit: half of 16 bytes' four 2-bit
// fields (the caller takes both halves); 8-bit: 32 bytes as signed q - 128.
template <int BITS, int SIGNED8>
static inline __m256i codes32(const uint8_t* p, int half) {
    if (BITS == 8) {  // symmetric codes are stored signed already; asymmetric ones are q: flip the top bit
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return SIGNED8 ? v : _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
    }
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (BITS == 4) {
        const __m128i m = _mm_set1_epi8(0x0f);
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
    }
    const __m128i m = _mm_set1_epi8(0x03);
    const int sh = 4 * half;
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, sh + 2), m), _mm_and_si128(_mm_srli_epi16(v, sh), m));
}

// sum of 32 code x int8-x products, as 8 int32 lanes. Codes are unsigned (2/4-bit) or signed (8-bit: q - 128);
// maddubs takes an unsigned first operand, so signed codes go in as |q| with their sign moved onto x (the
// products stay within int16: 128 * 127 * 2)
template <int BITS>
static inline __m256i dot32(__m256i q, const int8_t* xq) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
    const __m256i p = BITS == 8 ? _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q))
                                : _mm256_maddubs_epi16(q, x);
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// one packed row (G groups of g codes) against one prepared x row: sum_g s_g (sum_j q_j xh_j - z_g Xh_g), xh the
// int8 x times its block scale, Xh_g its group sums; 8-bit codes are q - 128 against the zero z - 128
template <int BITS, int SIGNED8>
static inline float qdot(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, float zconst, const int8_t* xq,
                         const float* dx, const float* xs, int64_t G, int64_t g, int64_t XB) {
    constexpr int BYTES32 = BITS * 4;  // packed bytes per 32 codes
    __m256 total = _mm256_setzero_ps();
    float corr = 0.f;
    const int64_t nxb = g / XB;
    for (int64_t gi = 0; gi < G; ++gi) {
        const float scale = half_to_float(sc[gi]);
        for (int64_t xb = 0; xb < nxb; ++xb) {
            const int64_t c0 = gi * g + xb * XB;  // first code of this x block
            const uint8_t* wp = w + c0 * BITS / 8;
            const int8_t* xp = xq + c0;
            __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
            if (BITS == 2) {
                for (int64_t c = 0; c < XB; c += 64, wp += 16, xp += 64) {
                    acc0 = _mm256_add_epi32(acc0, dot32<2>(codes32<2, 0>(wp, 0), xp));
                    acc1 = _mm256_add_epi32(acc1, dot32<2>(codes32<2, 0>(wp, 1), xp + 32));
                }
            } else {
                int64_t c = 0;
                for (; c + 64 <= XB; c += 64, wp += 2 * BYTES32, xp += 64) {
                    acc0 = _mm256_add_epi32(acc0, dot32<BITS>(codes32<BITS, SIGNED8>(wp, 0), xp));
                    acc1 = _mm256_add_epi32(acc1, dot32<BITS>(codes32<BITS, SIGNED8>(wp + BYTES32, 0), xp + 32));
                }
                for (; c < XB; c += 32, wp += BYTES32, xp += 32)
                    acc0 = _mm256_add_epi32(acc0, dot32<BITS>(codes32<BITS, SIGNED8>(wp, 0), xp));
            }
            const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(acc0, acc1));
            total = _mm256_fmadd_ps(_mm256_set1_ps(scale * dx[gi * nxb + xb]), f, total);
        }
        const float z = (zr ? half_to_float(zr[gi]) : zconst) - (BITS == 8 ? 128.f : 0.f);
        corr += scale * z * xs[gi];
    }
    return hsum(total) - corr;
}

// x rows -> int8 codes in the packed lane order, one scale per block of XB codes (absmax / 127), and the group
// sums of the int8 x times its scale: x is rounded once per call, as llama.cpp rounds activations to Q8 blocks
static void prepare(const float* x, int64_t N, int64_t I, int64_t G, int64_t g, int64_t XB, int bits, int8_t* xq,
                    float* dx, float* xs) {
    const int64_t Ip = G * g, C = 8 / bits, SPAN = 16 * C;  // codes per 16 packed bytes (2/4-bit permutation)
    std::vector<float> row(Ip);
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t j = 0; j < Ip; ++j) row[j] = j < I ? x[n * I + j] : 0.f;
        for (int64_t b = 0; b < Ip / XB; ++b) {
            float amax = 0.f;
            for (int64_t j = b * XB; j < (b + 1) * XB; ++j) amax = std::fmax(amax, std::fabs(row[j]));
            const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            dx[n * (Ip / XB) + b] = d;
            for (int64_t j = b * XB; j < (b + 1) * XB; ++j) row[j] = std::nearbyint(row[j] * id);
        }
        for (int64_t gi = 0; gi < G; ++gi) {
            float s = 0.f;
            for (int64_t j = gi * g; j < (gi + 1) * g; ++j) s += row[j] * dx[n * (Ip / XB) + j / XB];
            xs[n * G + gi] = s;
        }
        int8_t* q = xq + n * Ip;
        for (int64_t p = 0; p < Ip; ++p) {
            int64_t j = p;
            if (bits < 8) {  // lane k of field s of a 16-byte span holds code k C + s
                const int64_t blk = p / SPAN, r = p % SPAN;
                j = blk * SPAN + (r % 16) * C + r / 16;
            }
            q[p] = static_cast<int8_t>(row[j]);
        }
    }
}

template <int BITS, int SIGNED8>
static void run(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, float zconst, const int8_t* xq,
                const float* dx, const float* xs, const int64_t* idx, float* out, int64_t R, int64_t O, int64_t Bw,
                int64_t G, int64_t g, int64_t XB, int64_t x_div, int64_t use_idx) {
    const int64_t Ip = G * g, nb = Ip / XB;
    if (!use_idx) {
        #pragma omp parallel for schedule(static)
        for (int64_t o = 0; o < O; ++o)
            for (int64_t t = 0; t < R; ++t)
                out[t * O + o] = qdot<BITS, SIGNED8>(w + o * Bw, sc + o * G, zr ? zr + o * G : nullptr, zconst, xq + t * Ip,
                                            dx + t * nb, xs + t * G, G, g, XB);
        return;
    }
    // (two loops collapsed, not one over R * O: a division per weight row costs as much as a tenth of its dot)
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t r = 0; r < R; ++r) for (int64_t o = 0; o < O; ++o) {
        const int64_t ro = r * O + o, e = idx[r];
        if (e < 0) { out[ro] = 0.f; continue; }
        const int64_t row = e * O + o, xr = r / x_div;
        out[ro] = qdot<BITS, SIGNED8>(w + row * Bw, sc + row * G, zr ? zr + row * G : nullptr, zconst, xq + xr * Ip,
                             dx + xr * nb, xs + xr * G, G, g, XB);
    }
}

extern "C" void kernel(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const float* x, const int64_t* idx,
                       float* out, const int64_t N, const int64_t I, const int64_t R, const int64_t O,
                       const int64_t Bw, const int64_t G, const int64_t g, const int64_t XB, const int64_t x_div,
                       const int64_t bits, const int64_t has_zeros, const int64_t signed8, const int64_t use_idx) {
    const int64_t Ip = G * g;
    std::vector<int8_t> xq(N * Ip);
    std::vector<float> dx(N * (Ip / XB)), xs(N * G);
    prepare(x, N, I, G, g, XB, static_cast<int>(bits), xq.data(), dx.data(), xs.data());
    const uint16_t* z = has_zeros ? zr : nullptr;
    const float zc = static_cast<float>(1 << (bits - 1));  // the symmetric zero
    const int8_t* q = xq.data();
    if (bits == 2) run<2, 0>(w, sc, z, zc, q, dx.data(), xs.data(), idx, out, R, O, Bw, G, g, XB, x_div, use_idx);
    else if (bits == 4) run<4, 0>(w, sc, z, zc, q, dx.data(), xs.data(), idx, out, R, O, Bw, G, g, XB, x_div, use_idx);
    else if (signed8) run<8, 1>(w, sc, z, zc, q, dx.data(), xs.data(), idx, out, R, O, Bw, G, g, XB, x_div, use_idx);
    else run<8, 0>(w, sc, z, zc, q, dx.data(), xs.data(), idx, out, R, O, Bw, G, g, XB, x_div, use_idx);
}
"""

_ARGS = ["const uint8_t*", "const uint16_t*", "const uint16_t*", "const float*", "const int64_t*", "float*"] + [
    "const int64_t"] * 13
BITS = (2, 4, 8)


@functools.cache
def _kernel() -> Callable | None:
    """The built C++ entry point, or None where the host or toolchain cannot build it (warns once)."""
    if not matvec.available():  # x86 with AVX2 and FMA, a toolchain, kernels not turned off
        return None
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        return CppPythonBindingsCodeCache.load_pybinding(_ARGS, _SOURCE)
    except Exception as e:  # noqa: BLE001 (a toolchain error: the dequantize path)
        log.warning("quantized matvec kernel: could not build (%s: %s); dequantizing instead",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def layout_applies(qt: QuantizedTensor) -> bool:
    """Is ``qt``'s layout one the kernel reads (2/4/8 bits, groups of whole 32-code vectors, CPU, contiguous)?"""
    return (qt.bits in BITS and qt.group_size % (64 if qt.bits == 2 else 32) == 0 and qt.packed.device.type == "cpu"
            and qt.packed.is_contiguous() and qt.scales.is_contiguous()
            and (qt.zeros is None or qt.zeros.is_contiguous()))


def applies(x: Tensor, qt: QuantizedTensor) -> bool:
    """Does the kernel take this call: a few fp32 CPU rows, a layout it reads, and a built kernel?"""
    rows = x.numel() // max(1, x.shape[-1])
    return (x.device.type == "cpu" and x.dtype == torch.float32 and rows <= MAX_ROWS and layout_applies(qt)
            and _kernel() is not None)


def x_block(group_size: int) -> int:
    """Codes per int8 scale of x: the largest of 128, 64, 32 that divides the group (a 2-bit group is >= 64)."""
    return next(b for b in (128, 64, 32) if group_size % b == 0)


def rounded_x(x_NI: Tensor, qt: QuantizedTensor) -> Tensor:
    """x as the kernel sees it (fp32 [N, I]): each block of ``x_block`` columns rounded to int8 steps of absmax / 127
    (the reference the products are tested against, and what their rounding error is measured from)."""
    N, I = x_NI.shape
    Ip, XB = qt.groups * qt.group_size, x_block(qt.group_size)
    x = torch.nn.functional.pad(x_NI.float(), (0, Ip - I)).view(N, Ip // XB, XB)
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(x * inv) * (amax / 127.0)).view(N, Ip)[:, :I]


def _call(x_NI: Tensor, qt: QuantizedTensor, idx_R: Tensor | None) -> Tensor:
    N, I = x_NI.shape
    if I != qt.shape[-1]:
        raise ValueError(f"quantized matvec: x has {I} columns, the weight {qt.shape[-1]}")
    if not layout_applies(qt):
        raise ValueError(f"quantized matvec: a {qt.bits}-bit weight in groups of {qt.group_size} is not a layout the "
                         "kernel reads (layout_applies)")
    O = qt.shape[-2]
    x = x_NI.float().contiguous()
    zeros = qt.zeros if qt.zeros is not None else qt.scales  # (not read: has_zeros = 0)
    if idx_R is None:
        R, x_div, idx, use_idx = N, 1, _NO_IDX, 0
    else:
        idx = idx_R.reshape(-1).to(torch.long).contiguous()
        R = idx.numel()
        if R % N:
            raise ValueError(f"q_experts_matvec: {R} expert rows are not a multiple of {N} input rows")
        x_div, use_idx = R // N, 1
    out = torch.empty(R, O, dtype=torch.float32)
    _kernel()(qt.packed, qt.scales.view(torch.int16), zeros.view(torch.int16), x, idx, out, N, I, R, O,
              qt.packed.shape[-1], qt.groups, qt.group_size, x_block(qt.group_size), x_div, qt.bits,
              int(qt.zeros is not None), int(qt.bits == 8 and qt.symmetric), use_idx)
    return out


_NO_IDX = torch.zeros(1, dtype=torch.long)


def q_rows_matvec(x_TI: Tensor, qt: QuantizedTensor) -> Tensor:
    """out_TO = x_TI @ W^T in fp32 for a quantized [O, I] weight, read packed (``applies`` must hold)."""
    if len(qt.shape) != 2:
        raise ValueError(f"q_rows_matvec: a 2-D [out, in] weight, got {list(qt.shape)}")
    return _call(x_TI, qt, None)


def q_experts_matvec(x_NI: Tensor, qt: QuantizedTensor, idx_R: Tensor) -> Tensor:
    """out_RO[r] = W[idx_R[r]] @ x_NI[r * N // R] in fp32 for stacked quantized [E, O, I] weights; rows with
    idx -1 are 0. Only the chosen experts' packed rows are read."""
    if len(qt.shape) != 3:
        raise ValueError(f"q_experts_matvec: a 3-D [experts, out, in] weight, got {list(qt.shape)}")
    return _call(x_NI, qt, idx_R)
