"""CPU feature levels the C++ kernels are compiled for, and which one this CPU runs.

The kernels are compiled once per level when pagedserve is installed (setup.py), never at run
time: a build for one CPU's `-march=native` dies of SIGILL on another (an image built on an
AVX-512 node, run on an AVX2 one), and compiling at start-up made the first `serve` wait minutes
on whichever `ninja` was on PATH. At import the best level this CPU's flags allow is picked.

Standard-library only: setup.py loads this file by path before anything else is installed.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
UNITY_SOURCE = "kernels.cpp"  # includes every kernel file: one translation unit per level
BUILD_INFO = "_kernels_build.json"  # written beside the modules: which sources they were built from
COMMON_CFLAGS = ("-O3", "-ffast-math", "-fopenmp")


@dataclass(frozen=True)
class KernelLevel:
    name: str                 # the psABI level name, as GCC's -march spells it
    cflags: tuple[str, ...]   # what selects the level's instructions
    needs: frozenset[str]     # /proc/cpuinfo flags the CPU must have to run the build

    @property
    def module(self) -> str:  # importable name, under pagedserve.model
        return "_kernels_" + self.name.replace("-", "_")


_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"})
# Best first. x86-64-v4 adds AVX-512 F/BW/CD/DQ/VL: the 12x32 GEMM tile and 16-lane exp.
X86_LEVELS = (
    KernelLevel("x86-64-v4", ("-march=x86-64-v4", "-mtune=generic"),
                _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    KernelLevel("x86-64-v3", ("-march=x86-64-v3", "-mtune=generic"), _V3),
)
# Other architectures get one portable build (the kernels' scalar paths; PyTorch does the GEMMs).
GENERIC = KernelLevel("generic", (), frozenset())


def levels_for_this_platform() -> tuple[KernelLevel, ...]:
    return X86_LEVELS if platform.machine().lower() in ("x86_64", "amd64") else (GENERIC,)


def level_named(name: str) -> KernelLevel:
    for lv in (*X86_LEVELS, GENERIC):
        if lv.name == name:
            return lv
    raise ValueError(f"PAGEDSERVE_CPU_LEVEL={name!r}: use one of "
                     + ", ".join(lv.name for lv in levels_for_this_platform()))


def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_levels(flags: frozenset[str] | None = None) -> list[KernelLevel]:
    """The levels this CPU can run, best first. `lzcnt` is what Linux shows for ABM on Intel."""
    flags = cpu_flags() if flags is None else flags
    if "lzcnt" in flags:
        flags = flags | {"abm"}
    return [lv for lv in levels_for_this_platform() if lv.needs <= flags]


def source_files() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def sources_digest() -> str:
    """What a build is tied to besides torch: the kernel sources' bytes."""
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def requested_level() -> str | None:
    """PAGEDSERVE_CPU_LEVEL forces a level (e.g. x86-64-v3 to run the AVX2 tiles on an AVX-512
    machine in tests and A/B runs)."""
    return os.environ.get("PAGEDSERVE_CPU_LEVEL") or None
