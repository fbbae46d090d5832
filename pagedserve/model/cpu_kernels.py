"""Load the C++ CPU kernels (paged decode and prefill attention, linear layers on pre-packed
weights, fused RMSNorm / rotary / SiLU*up) built when pagedserve was installed (setup.py), for the
best CPU feature level this CPU runs (kernel_levels.py). Nothing here compiles unless asked to.

PAGEDSERVE_KERNELS picks the source:
  installed (default)  the modules setup.py built; missing or stale -> the PyTorch path, with a
                       warning that says how to build them
  jit                  developers: compile csrc/ now with -march=native (+ PAGEDSERVE_KERNEL_CFLAGS)
                       into the torch extensions folder, under a lock, logged
  off                  the PyTorch path
PAGEDSERVE_CPU_LEVEL=x86-64-v3 forces a level (the AVX2 tiles on an AVX-512 machine).

`load()` returns the module, or None when the kernels cannot run here: callers then use the
pure-PyTorch path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

from pagedserve.model import kernel_levels as kl

log = logging.getLogger("pagedserve.kernels")
_lock = threading.Lock()
_module = None
_error: str | None = None
_source = ""  # what was loaded, for logs: "x86-64-v4 (installed)", "jit -march=native"
MODES = ("installed", "jit", "off")
REBUILD_HINT = "build them with `bash scripts/setup.sh` (or `python setup.py build_ext --inplace` in the checkout)"


def load(required: bool = False):
    global _module, _error, _source
    with _lock:
        if _module is None and _error is None:
            mode = os.environ.get("PAGEDSERVE_KERNELS", "installed")
            try:
                if mode not in MODES:
                    raise ValueError(f"PAGEDSERVE_KERNELS={mode!r}: use one of {', '.join(MODES)}")
                if mode == "off":
                    raise RuntimeError("PAGEDSERVE_KERNELS=off")
                _module, _source = _load_jit() if mode == "jit" else _load_installed(kl.requested_level())
                log.info("C++ CPU kernels: %s", _source)
            except Exception as e:  # missing, stale, or a CPU they cannot run on: say why, fall back
                _error = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
                log.warning("C++ CPU kernels unavailable, using the PyTorch path (several times slower): %s",
                            _error[:500])
    if _module is None and required:
        raise RuntimeError(f"the C++ CPU kernels are unavailable: {_error}")
    return _module


def describe() -> str:
    """One line for the start-up log: which kernels run, or why none do."""
    load()
    return _source if _module is not None else f"PyTorch path ({_error})"


def load_level(name: str):
    """The installed build of one level, whatever this process runs (tests compare levels)."""
    return _load_installed(name)[0]


def _load_installed(level: str | None):
    import torch  # the modules link libtorch: it must be loaded first

    here = Path(__file__).parent
    supported = kl.supported_levels()
    if level is not None:
        lv = kl.level_named(level)
        if lv not in supported:
            raise RuntimeError(f"PAGEDSERVE_CPU_LEVEL={level}: this CPU lacks "
                               f"{' '.join(sorted(lv.needs - kl.cpu_flags()))}")
    elif not supported:
        raise RuntimeError("this CPU has no AVX2/FMA (x86-64-v3), the least the kernels are built for")
    else:
        lv = supported[0]
    info_path = here / kl.BUILD_INFO
    if not info_path.exists():
        raise RuntimeError(f"the C++ CPU kernels are not built: {REBUILD_HINT}")
    info = json.loads(info_path.read_text())
    if kl.CSRC.is_dir() and info.get("sources") != kl.sources_digest():
        raise RuntimeError(f"the installed C++ kernels were built from other sources than {kl.CSRC}: {REBUILD_HINT}, "
                           "or set PAGEDSERVE_KERNELS=jit while editing them")
    if info.get("torch") != torch.__version__:
        raise RuntimeError(f"the C++ kernels were built for torch {info.get('torch')}, this is {torch.__version__}: "
                           f"{REBUILD_HINT}")
    try:
        mod = importlib.import_module(f"pagedserve.model.{lv.module}")
    except ImportError as e:
        raise RuntimeError(f"the {lv.name} build of the C++ kernels does not load ({e}): {REBUILD_HINT}") from None
    return mod, f"{lv.name} (installed build)"


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
        yield


def _load_jit():
    """Developers editing csrc/: compile for this very CPU now (about a minute, cached)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    from torch.utils.cpp_extension import load as build

    flags = [*kl.COMMON_CFLAGS, "-march=native", *os.environ.get("PAGEDSERVE_KERNEL_CFLAGS", "").split()]
    # A folder per Python and torch version (a build is tied to both's ABI), per checkout and per
    # CPU: a -march=native build for an AVX-512 CPU dies of SIGILL on one without.
    where = hashlib.sha1((str(kl.CSRC.resolve()) + " ".join(flags) + _cpu_identity()).encode()).hexdigest()[:8]
    name = "pagedserve_cpu_kernels_jit"
    build_dir = Path(get_default_build_root()) / (
        f"{name}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{where}")
    with _build_lock(build_dir):
        log.warning("PAGEDSERVE_KERNELS=jit: compiling the C++ kernels for this CPU in %s (about a minute "
                    "unless cached)", build_dir)
        mod = build(name=name, sources=[str(kl.CSRC / kl.UNITY_SOURCE)], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    return mod, f"jit {' '.join(flags[3:])} ({build_dir})"


def _cpu_identity() -> str:
    """What a -march=native build depends on: the CPU's model name and instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:  # not Linux: the platform string is the best we have
        import platform

        return platform.processor() or platform.machine()
    keep = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(keep)


def bf16_gemm():
    """The C++ module when its bf16 packed GEMM can run here (the x86-64-v4 build on a CPU with
    AVX512_BF16), else None. What `--dtype auto` and `bfloat16` check on CPU."""
    if os.environ.get("PAGEDSERVE_PACKED_LINEAR", "1") == "0":
        return None
    m = load()
    ok = m is not None and hasattr(m, "packed_linear_bf16_supported") and m.packed_linear_bf16_supported()
    return m if ok else None


def packed_linear():
    """The C++ module when its packed-weight linear kernel can run here (built, AVX2+FMA), else
    None: also None with PAGEDSERVE_PACKED_LINEAR=0 (BLAS only, for A/B runs)."""
    if os.environ.get("PAGEDSERVE_PACKED_LINEAR", "1") == "0":
        return None
    m = load()
    return m if m is not None and m.packed_linear_supported() else None
