"""Build and load the C++ CPU kernels (paged decode attention, small-batch linear layers, fused
RMSNorm / rotary / SiLU*up) once; torch caches the build under ~/.cache/torch_extensions.

`load()` returns the module, or None when it cannot be built here (no compiler, no ninja): callers
then use the pure-PyTorch path. scripts/setup.sh builds it at install time, so serving never waits.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("pagedserve.kernels")
_lock = threading.Lock()
_module = None
_error: str | None = None


def load(required: bool = False):
    global _module, _error
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import load as build

                csrc = Path(__file__).parent / "csrc"
                sources = [str(csrc / f) for f in ("paged_attention_cpu.cpp", "linear_cpu.cpp", "fused_cpu.cpp")]
                flags = ["-O3", "-ffast-math", "-fopenmp"]
                if os.environ.get("PAGEDSERVE_NATIVE", "1") == "1":
                    flags.append("-march=native")
                _module = build(name="pagedserve_cpu_kernels", sources=sources, extra_cflags=flags,
                                extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler / ninja / headers: fall back, and say why
                _error = f"{type(e).__name__}: {e}"
                log.warning("C++ CPU attention kernel unavailable, using the PyTorch path: %s", _error[:300])
    if _module is None and required:
        raise RuntimeError(f"the C++ CPU attention kernel could not be built: {_error}")
    return _module


def small_m_linear():
    """The small-batch linear kernel (x @ W.T for 1..8 rows), or None when the kernels are not built
    here, lack AVX2/FMA, or PAGEDSERVE_SMALL_M_LINEAR=0 (BLAS only, for A/B runs)."""
    if os.environ.get("PAGEDSERVE_SMALL_M_LINEAR", "1") == "0":
        return None
    m = load()
    return m.linear_small_m if m is not None and m.linear_small_m_supported() else None
