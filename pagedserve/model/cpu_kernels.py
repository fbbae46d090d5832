"""Build and load the C++ CPU kernels (paged decode attention, linear layers on pre-packed weights,
fused RMSNorm / rotary / SiLU*up) once; torch caches the build under ~/.cache/torch_extensions.

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
                sources = [str(csrc / f) for f in ("paged_attention_cpu.cpp", "gemm_cpu.cpp", "fused_cpu.cpp")]
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


def packed_linear():
    """The C++ module when its packed-weight linear kernel can run here (built, AVX2+FMA), else
    None: also None with PAGEDSERVE_PACKED_LINEAR=0 (BLAS only, for A/B runs)."""
    if os.environ.get("PAGEDSERVE_PACKED_LINEAR", "1") == "0":
        return None
    m = load()
    return m if m is not None and m.packed_linear_supported() else None
