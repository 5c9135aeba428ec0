"""What the CPU is: its model name and instruction-set flags, read from /proc/cpuinfo (Linux)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

ISA_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.machine(), frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
                break
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_isa() -> list[str]:
    """The vector extensions that decide which kernels run (AVX2, AVX-512, bf16, VNNI, AMX), in a fixed order."""
    flags = _cpuinfo()[1]
    return [f for f in ISA_OF_INTEREST if f in flags]
