"""Host kinds for tests that replace the host probe (``moekit.host``)."""

from moekit.host import HostInfo


def fake_host(kind: str):
    """A ``moekit.host.HostInfo`` of one host kind, as the probe would read it there."""
    hosts = {
        "AVX2": ("x86_64", "AVX2", ("avx2",)),
        "AVX-512": ("x86_64", "AVX512", ("avx2", "avx512f")),
        "AVX-512-BF16": ("x86_64", "AVX512", ("avx2", "avx512f", "avx512_bf16")),
        "AMX": ("x86_64", "AVX512", ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")),
        "ARM": ("aarch64", "DEFAULT", ()),
        "ARM-BF16": ("aarch64", "DEFAULT", ("bf16",)),
    }
    machine, capability, flags = hosts[kind]
    return HostInfo(cpu_model=f"test CPU ({kind})", machine=machine, cpu_capability=capability, flags=flags,
                    cpu_count=2)
