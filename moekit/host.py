"""The host: what this machine computes fast, probed once, and the compute dtype ``auto`` resolves to.

Every verb and Python entry point that computes (train, compare, generate, eval, upcycle's training, and the
verbs to come) takes ``dtype="auto"`` by default and resolves it here, so a run on any CPU starts with the
dtype that is fast *there*:

- CUDA: bf16 where the device computes it natively (``torch.cuda.is_bf16_supported(including_emulation=False)``:
  Ampere and later), else fp32.
- x86 CPUs: bf16 where the CPU has AVX512-BF16 or AMX-BF16 **and** ATen runs its AVX-512 kernels; fp32
  elsewhere. Without those instructions PyTorch's CPU bf16 GEMMs are emulated: on a 2-core AVX2-only AMD EPYC,
  preset ``small`` trained at 393 tokens/s under bf16 autocast against 7,542 at fp32 (19x; issue 24).
- ARM CPUs: bf16 where the CPU reports the ``bf16`` feature (Armv8.6 BF16: Graviton 3 and later, Apple M2 and
  later), else fp32.

What is read, once per process (``probe_host``): ``torch.backends.cpu.get_cpu_capability()`` (the kernels ATen
dispatches to: DEFAULT, AVX2, AVX512, ...; it honours ``ATEN_CPU_CAPABILITY``, which also caps inductor's
kernels), the CPU flags (``/proc/cpuinfo``'s ``flags`` on x86 Linux, ``Features`` on ARM Linux; on macOS
``sysctl hw.optional.arm.FEAT_BF16``), and the CPU model name. ``MOEKIT_HOST_FLAGS`` (comma-separated) replaces
the flags read, for checking the rule as another host would apply it.

An explicit ``bf16`` on a host without native bf16 runs as asked, with one warning line that says so.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("moekit")

DTYPE_CHOICES = ("auto", "bf16", "fp32")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# the CPU flags that decide anything here (the rest of /proc/cpuinfo's list is not kept)
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")

# how much slower emulated bf16 trains than fp32 (issue 24, measured on a 2-core AVX2-only AMD EPYC)
_EMULATED_SLOWDOWN = "~19x slower than fp32 in training, ~5x in a prompt pass"


@dataclass(frozen=True)
class HostInfo:
    """What the probe read. ``flags`` holds only the flags the dtype rule and the kernels look at."""

    cpu_model: str
    machine: str  # platform.machine(): x86_64, aarch64, arm64, ...
    cpu_capability: str  # ATen's: DEFAULT, AVX2, AVX512, ... (ZVECTOR, SVE256 elsewhere)
    flags: tuple[str, ...]
    cpu_count: int

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags and "amx_tile" in self.flags

    @property
    def native_bf16(self) -> bool:
        """Does this CPU compute bf16 GEMMs natively (rather than emulating them in fp32)?"""
        if self.machine.lower() in ("aarch64", "arm64"):
            return "bf16" in self.flags
        # ATen's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 on such a CPU) convert every bf16 element in software
        return ("avx512_bf16" in self.flags or self.amx) and self.cpu_capability.upper().startswith("AVX512")

    @property
    def kind(self) -> str:
        """The host kind the results tables are grouped by: AMX, AVX-512-BF16, AVX-512, AVX2, ARM-BF16, ARM, other."""
        if self.machine.lower() in ("aarch64", "arm64"):
            return "ARM-BF16" if "bf16" in self.flags else "ARM"
        cap = self.cpu_capability.upper()
        if cap.startswith("AVX512"):
            if self.amx:
                return "AMX"
            return "AVX-512-BF16" if "avx512_bf16" in self.flags else "AVX-512"
        if cap.startswith("AVX2"):
            return "AVX2"
        return "other"

    def describe(self) -> str:
        """One line: the CPU model, ATen's kernels and the bf16 verdict."""
        extra = [f for f in ("avx512_bf16", "amx_bf16", "bf16") if f in self.flags]
        native = "native bf16" if self.native_bf16 else "bf16 emulated"
        return (f"{self.cpu_model} ({self.cpu_count} threads), {self.kind} (ATen {self.cpu_capability}"
                + (", " + ", ".join(extra) if extra else "") + f"): {native}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags), "kind": self.kind, "native_bf16": self.native_bf16}


def _read_cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _macos_arm_bf16() -> bool:
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return out.strip() == "1"


@functools.cache
def probe_host() -> HostInfo:
    """The host as described in the module docstring (probed once per process)."""
    model, flags = _read_cpuinfo()
    machine = platform.machine() or "unknown"
    if platform.system() == "Darwin" and machine.lower() == "arm64" and _macos_arm_bf16():
        flags.add("bf16")
    override = os.environ.get("MOEKIT_HOST_FLAGS")
    if override is not None:
        flags = {f.strip() for f in override.split(",") if f.strip()}
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return HostInfo(cpu_model=model or platform.processor() or machine, machine=machine,
                    cpu_capability=capability, flags=tuple(f for f in _FLAGS if f in flags),
                    cpu_count=os.cpu_count() or 1)


def cuda_native_bf16(device: torch.device) -> bool:
    """Does this CUDA device compute bf16 natively (compute capability 8.0 and later)?"""
    try:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no including_emulation
        return torch.cuda.get_device_capability(device) >= (8, 0)


def check_dtype(value: str, field: str = "dtype") -> str:
    """``value`` if it is one of ``DTYPE_CHOICES``, else a ValueError naming ``field`` and the choices."""
    if value not in DTYPE_CHOICES:
        raise ValueError(f"{field}: expected one of {', '.join(DTYPE_CHOICES)}, got {value!r}")
    return value


def native_bf16(device: torch.device | str, host: HostInfo | None = None) -> bool:
    """Does ``device`` compute bf16 natively (see the module docstring)?"""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_native_bf16(device)
    if device.type == "cpu":
        return (host or probe_host()).native_bf16
    return True  # other accelerators (mps, xpu) take what they are asked for


def resolve_dtype(requested: str, device: torch.device | str = "cpu", host: HostInfo | None = None) -> str:
    """The compute dtype (``"bf16"`` or ``"fp32"``) that ``requested`` means on ``device``.

    ``auto`` is bf16 where ``device`` computes it natively, else fp32; ``bf16`` and ``fp32`` are kept (an
    emulated bf16 logs one warning, :func:`warn_if_emulated`). ``host`` replaces the probe (tests).
    """
    check_dtype(requested)
    if requested == "auto":
        return "bf16" if native_bf16(device, host) else "fp32"
    if requested == "bf16":
        warn_if_emulated(device, host)
    return requested


_WARNED: set[str] = set()


def warn_if_emulated(device: torch.device | str, host: HostInfo | None = None) -> str | None:
    """Log (once per process and device type) that bf16 is emulated on ``device``; returns the message or None."""
    device = torch.device(device)
    if native_bf16(device, host):
        return None
    where = (f"this CPU ({(host or probe_host()).describe()})" if device.type == "cpu" else f"{device}")
    msg = (f"dtype bf16: {where} has no native bf16 instructions, so PyTorch emulates them: expect "
           f"{_EMULATED_SLOWDOWN} (dtype auto picks fp32 here)")
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        log.warning("%s", msg)
    return msg


def header(requested: str, resolved: str, device: torch.device | str, host: HostInfo | None = None) -> str:
    """The run header's dtype line, e.g. ``dtype bf16 (auto) on cpu: AMD EPYC (2 threads), AVX-512-BF16 ...``."""
    device = torch.device(device)
    where = (host or probe_host()).describe() if device.type == "cpu" else str(device)
    how = "auto" if requested == "auto" else "as requested"
    return f"dtype {resolved} ({how}) on {device.type}: {where}"


def record(requested: str, resolved: str, device: torch.device | str) -> dict[str, Any]:
    """What a results file records of the dtype choice and the host (``train_config.json``, ``results.json``)."""
    device = torch.device(device)
    rec: dict[str, Any] = {"dtype": resolved, "dtype_requested": requested, "device": str(device),
                           "host": probe_host().to_dict(), "torch": torch.__version__}
    if device.type == "cuda":
        rec["cuda_device"] = torch.cuda.get_device_name(device)
    return rec


def weights_dtype(requested: str | torch.dtype | None, stored: torch.dtype, device: torch.device | str = "cpu",
                  host: HostInfo | None = None) -> torch.dtype:
    """The dtype a model loaded for inference computes in (``from_pretrained``, ``generate``, ``eval``).

    ``None`` or ``"auto"``: the stored dtype, except a 16-bit checkpoint on a device without native bf16
    (an AVX2 CPU) computes in fp32, and an fp16 one on a CPU too (PyTorch's CPU fp16 GEMMs are emulated on all but a
    few server CPUs); weights are never cast down unasked. ``"bf16"``/``"fp32"`` or a ``torch.dtype``: that dtype
    (an emulated bf16 logs one warning).
    """
    if isinstance(requested, torch.dtype):
        if requested == torch.bfloat16:
            warn_if_emulated(device, host)
        return requested
    if requested is not None and check_dtype(requested) != "auto":
        if requested == "bf16":
            warn_if_emulated(device, host)
        return TORCH_DTYPES[requested]
    device = torch.device(device)
    if stored == torch.float16 and device.type == "cpu":
        return torch.float32
    if stored == torch.bfloat16 and not native_bf16(device, host):
        return torch.float32
    return stored


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """The host's streaming read bandwidth in bytes/s: the best of ``repeats`` sums over an fp32 buffer of ``nbytes``
    (512 MiB: far past the caches) on all intra-op threads, as decode reads its weights."""
    import time

    x_N = torch.ones(nbytes // 4)
    float(x_N.sum())  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x_N.sum())
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
