"""Matrix-vector products over stored 16-bit or fp32 weights, for a few rows (decode): hand-written C++.

Legend: T rows (tokens, or token-expert pairs), O output width, D input width, E experts.

    rows_matvec(x_TD, w_OD)              out_TO = x_TD @ w_OD^T                   every row against one matrix
    experts_matvec(x_RD, w_EOD, idx_R)   out_RO[r] = w_EOD[idx_R[r]] @ x_RD[r]     each row against its expert's

A decode token is a chain of such products, and its time is the bytes of weights read over the memory bandwidth.
TorchInductor's multiply-reduce reads bf16 weights at 13.7 GB/s on a 2-core AVX2 host whose streaming read
(``torch.sum`` over 1 GiB) is 21 GB/s: its reduction is one dependency chain of adds after a separate multiply. The
kernel below keeps four independent FMA accumulators per weight row, converts bf16 to fp32 with a shift in
registers (bf16 is the upper half of an fp32), reads each weight row once for all T rows (the row stays in L1 while
the rows of x go by), and splits the weight rows over the OpenMP threads: 17.3 GB/s there alone, 19-20 GB/s inside
the decode step (benchmarks/RESULTS.md, "Where a decode token's time goes"). Weights bf16 or fp32, x and the result fp32 (the accumulate dtype).

The C++ is built once per process by TorchInductor's C++ toolchain (``CppPythonBindingsCodeCache``: the compiler
flags of the host's vector ISA, OpenMP, a disk cache), so it needs what the inductor kernels need and nothing more.
x86 hosts with AVX2 (every AVX-512 host too) take the vector loop; elsewhere ``available()`` is False and callers
keep their inductor multiply-reduce. Exposed as custom ops (``moekit::rows_matvec``, ``moekit::experts_matvec``) so
that the compiled decode graphs (``InductorFn``) call them as extern kernels between their fused elementwise parts.
"""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Callable

import torch
from torch import Tensor

from moekit.host import probe_host
from moekit.layer.kernels.inductor import kernels_turned_off

log = logging.getLogger("moekit")

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MOEKIT_AVX2 1
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16; float f; std::memcpy(&f, &u, 4); return f;
}

// dot(w_row[0:D], x[0:D]) for a bf16 (WBF16 = 1) or fp32 weight row, fp32 x, fp32 accumulation
template <int WBF16>
static inline float dot_row(const void* w_row, const float* x, int64_t D) {
    int64_t d = 0;
    float tail = 0.f;
#ifdef MOEKIT_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    auto ld = [&](int64_t i) -> __m256 {
        if (WBF16) {
            __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w_row) + i));
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
        return _mm256_loadu_ps(static_cast<const float*>(w_row) + i);
    };
    for (; d + 32 <= D; d += 32) {
        a0 = _mm256_fmadd_ps(ld(d), _mm256_loadu_ps(x + d), a0);
        a1 = _mm256_fmadd_ps(ld(d + 8), _mm256_loadu_ps(x + d + 8), a1);
        a2 = _mm256_fmadd_ps(ld(d + 16), _mm256_loadu_ps(x + d + 16), a2);
        a3 = _mm256_fmadd_ps(ld(d + 24), _mm256_loadu_ps(x + d + 24), a3);
    }
    for (; d + 8 <= D; d += 8) a0 = _mm256_fmadd_ps(ld(d), _mm256_loadu_ps(x + d), a0);
    __m256 s8 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_hadd_ps(s4, s4);
    s4 = _mm_hadd_ps(s4, s4);
    tail = _mm_cvtss_f32(s4);
#endif
    for (; d < D; ++d) {
        float wv = WBF16 ? bf16_to_float(static_cast<const uint16_t*>(w_row)[d]) : static_cast<const float*>(w_row)[d];
        tail += wv * x[d];
    }
    return tail;
}

template <int WBF16>
static void rows(const void* w, const float* x, float* out, int64_t T, int64_t O, int64_t D) {
    const int64_t esz = WBF16 ? 2 : 4;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; ++o) {
        const char* w_row = static_cast<const char*>(w) + o * D * esz;
        for (int64_t t = 0; t < T; ++t) out[t * O + o] = dot_row<WBF16>(w_row, x + t * D, D);
    }
}

template <int WBF16>
static void experts(const void* w, const float* x, const int64_t* idx, float* out, int64_t R, int64_t O, int64_t D,
                    int64_t x_div) {
    const int64_t esz = WBF16 ? 2 : 4;
    // (two loops collapsed, not one over R * O: no division per weight row)
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t r = 0; r < R; ++r) for (int64_t o = 0; o < O; ++o) {
        const char* w_row = static_cast<const char*>(w) + (idx[r] * O + o) * D * esz;
        out[r * O + o] = dot_row<WBF16>(w_row, x + (r / x_div) * D, D);
    }
}

extern "C" void kernel(const void* w, const float* x, const int64_t* idx, float* out, const int64_t R,
                       const int64_t O, const int64_t D, const int64_t x_div, const int64_t wbf16,
                       const int64_t use_idx) {
    if (use_idx) {
        if (wbf16) experts<1>(w, x, idx, out, R, O, D, x_div); else experts<0>(w, x, idx, out, R, O, D, x_div);
    } else {
        if (wbf16) rows<1>(w, x, out, R, O, D); else rows<0>(w, x, out, R, O, D);
    }
}
"""

_ARGS = ["const void*", "const float*", "const int64_t*", "float*", "const int64_t", "const int64_t", "const int64_t",
         "const int64_t", "const int64_t", "const int64_t"]
WEIGHT_DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def _kernel() -> Callable | None:
    """The built C++ entry point, or None where it cannot be built or has no vector loop (warns once)."""
    if kernels_turned_off(decode_alias=True) or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if "avx2" not in probe_host().flags:  # (every AVX2 CPU has FMA3; without both the loop would be scalar)
        return None
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        return CppPythonBindingsCodeCache.load_pybinding(_ARGS, _SOURCE)
    except Exception as e:  # noqa: BLE001 (no compiler, a toolchain error: the callers' inductor path)
        log.warning("matvec kernel: could not build (%s: %s); using the inductor multiply-reduce",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def available() -> bool:
    """Can the C++ products run here (x86 with AVX2 and FMA, a C++ toolchain, kernels not turned off)?"""
    return _kernel() is not None


def applies(x: Tensor, w: Tensor) -> bool:
    """Do the ops take these operands (CPU, fp32 x, bf16/fp32 weights) and is the kernel built?"""
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and w.dtype in WEIGHT_DTYPES and available())


_ZERO_IDX = torch.zeros(1, dtype=torch.long)

# registered with torch.library.Library, not ``custom_op``: its autograd and Python wrappers cost ~30 us a call
# against ~10 here (a decode token makes ~100 of these calls); the ops have no backward (inference only)
_LIB = torch.library.Library("moekit", "FRAGMENT")
_LIB.define("rows_matvec(Tensor x, Tensor w) -> Tensor")
_LIB.define("experts_matvec(Tensor x, Tensor w, Tensor idx) -> Tensor")


def rows_matvec(x_TD: Tensor, w_OD: Tensor) -> Tensor:
    """out_TO = x_TD @ w_OD^T in fp32, reading the weights once (x fp32; w bf16 or fp32)."""
    T, D = x_TD.shape
    O = w_OD.shape[0]
    out = torch.empty(T, O, dtype=torch.float32)
    x, w = x_TD.contiguous(), w_OD.contiguous()
    _kernel()(w, x, _ZERO_IDX, out, T, O, D, 1, int(w.dtype == torch.bfloat16), 0)
    return out


def experts_matvec(x_ND: Tensor, w_EOD: Tensor, idx_R: Tensor) -> Tensor:
    """out_RO[r] = w_EOD[idx_R[r]] @ x_ND[r * N // R] in fp32: R = N * k rows, row r reads x row r // k (x per token,
    k experts each) or its own row (N = R). Only the chosen experts' weights are read, nothing is copied."""
    N, D = x_ND.shape
    R = idx_R.numel()
    O = w_EOD.shape[1]
    if R % N:
        raise ValueError(f"experts_matvec: {R} expert rows are not a multiple of {N} input rows")
    out = torch.empty(R, O, dtype=torch.float32)
    x, w, idx = x_ND.contiguous(), w_EOD.contiguous(), idx_R.reshape(-1).to(torch.long).contiguous()
    _kernel()(w, x, idx, out, R, O, D, R // N, int(w.dtype == torch.bfloat16), 1)
    return out


_LIB.impl("rows_matvec", rows_matvec, "CPU")
_LIB.impl("experts_matvec", experts_matvec, "CPU")


@torch.library.register_fake("moekit::rows_matvec")
def _(x_TD: Tensor, w_OD: Tensor) -> Tensor:
    return x_TD.new_empty(x_TD.shape[0], w_OD.shape[0], dtype=torch.float32)


@torch.library.register_fake("moekit::experts_matvec")
def _(x_ND: Tensor, w_EOD: Tensor, idx_R: Tensor) -> Tensor:
    return x_ND.new_empty(idx_R.numel(), w_EOD.shape[1], dtype=torch.float32)
