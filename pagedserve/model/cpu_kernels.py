"""Build and load the C++ CPU kernels (paged decode and prefill attention, linear layers on
pre-packed weights, fused RMSNorm / rotary / SiLU*up) once; torch caches the build under
~/.cache/torch_extensions.

`load()` returns the module, or None when it cannot be built here (no compiler, no ninja): callers
then use the pure-PyTorch path. scripts/setup.sh builds it at install time, so serving never waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("pagedserve.kernels")
_lock = threading.Lock()
_module = None
_error: str | None = None
NAME = "pagedserve_cpu_kernels"


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """torch guards a build with a lock *file* and waits forever while it exists, so a build that
    was killed (Ctrl-C, OOM kill, pod eviction) made every later start hang with no message. An
    flock is released by the kernel when its holder dies: whoever holds it is the only live
    builder, and a torch lock file found then is stale."""
    import fcntl

    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{build_dir.name}.flock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the C++ kernels; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a C++ kernel build that was killed", stale)
            stale.unlink()
        log.info("loading the C++ CPU kernels (built on first use: about a minute)")
        yield


def load(required: bool = False):
    global _module, _error
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import get_default_build_root
                from torch.utils.cpp_extension import load as build

                csrc = Path(__file__).parent / "csrc"
                files = ("paged_attention_cpu.cpp", "prefill_attention_cpu.cpp", "gemm_cpu.cpp", "fused_cpu.cpp",
                         "llama_layers_cpu.cpp")
                sources = [str(csrc / f) for f in files]
                flags = ["-O3", "-ffast-math", "-fopenmp"]
                if os.environ.get("PAGEDSERVE_NATIVE", "1") == "1":
                    flags.append("-march=native")
                # Extra compiler flags, e.g. -mno-avx512f to build and test the AVX2 tiles on an
                # AVX-512 machine; each set of flags gets its own build folder.
                flags += os.environ.get("PAGEDSERVE_KERNEL_CFLAGS", "").split()
                import torch

                # Our own folder per Python and torch version (a build is tied to both's ABI), per
                # checkout (ninja rebuilds when the sources' path changes, so two checkouts sharing
                # one folder rebuilt each other's kernels at every start, a minute each time) and
                # per CPU: a -march=native build for an AVX-512 CPU dies of SIGILL on one without
                # (a cache volume shared by nodes of two CPU kinds).
                where = hashlib.sha1((str(csrc.resolve()) + " ".join(flags) + _cpu_identity(flags)).encode()).hexdigest()[:8]
                build_dir = Path(get_default_build_root()) / (
                    f"{NAME}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{where}")
                with _build_lock(build_dir):
                    _module = build(name=NAME, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                    build_directory=str(build_dir), verbose=False)
            except Exception as e:  # no compiler / ninja / headers: fall back, and say why
                _error = f"{type(e).__name__}: {e}"
                log.warning("C++ CPU attention kernel unavailable, using the PyTorch path: %s", _error[:300])
    if _module is None and required:
        raise RuntimeError(f"the C++ CPU attention kernel could not be built: {_error}")
    return _module


def _cpu_identity(flags: list[str]) -> str:
    """What a -march=native build depends on: the CPU's model name and instruction-set flags."""
    if "-march=native" not in flags:
        return ""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:  # not Linux: the platform string is the best we have
        import platform

        return platform.processor() or platform.machine()
    keep = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(keep)


def packed_linear():
    """The C++ module when its packed-weight linear kernel can run here (built, AVX2+FMA), else
    None: also None with PAGEDSERVE_PACKED_LINEAR=0 (BLAS only, for A/B runs)."""
    if os.environ.get("PAGEDSERVE_PACKED_LINEAR", "1") == "0":
        return None
    m = load()
    return m if m is not None and m.packed_linear_supported() else None
