"""Builds the C++ CPU kernels at install time, once per CPU feature level (kernel_levels.py).

    pip install --no-build-isolation -e .        # torch must be installed first (scripts/setup.sh)
    python setup.py build_ext --inplace          # just the kernels, with progress (setup.sh does this)

PAGEDSERVE_BUILD_KERNELS=0 installs without them (the PyTorch path then runs, and says so).
"""

import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("kernel_levels", ROOT / "pagedserve/model/kernel_levels.py")
kl = importlib.util.module_from_spec(_spec)
sys.modules["kernel_levels"] = kl  # dataclasses look their module up there
_spec.loader.exec_module(kl)


def say(msg: str) -> None:
    print(f"[kernels] {msg}", file=sys.stderr, flush=True)


def kernel_extensions():
    if os.environ.get("PAGEDSERVE_BUILD_KERNELS", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        raise SystemExit(
            "pagedserve compiles its C++ CPU kernels against the installed torch: install torch first "
            "(pip install torch==2.13.0) and then pagedserve with --no-build-isolation, or set "
            "PAGEDSERVE_BUILD_KERNELS=0 to install without the kernels") from None

    class BuildKernels(BuildExtension.with_options(use_ninja=False)):
        """Levels compile in parallel (one unit each), with a line every 15 s so a slow machine is
        seen working; a build-info file records the sources' digest for the staleness check."""

        def finalize_options(self):
            super().finalize_options()
            self.parallel = max(1, min(len(self.extensions), os.cpu_count() or 1))

        def _info(self) -> str:
            return json.dumps({"sources": kl.sources_digest(), "torch": __import__("torch").__version__,
                               "levels": [lv.name for lv in kl.levels_for_this_platform()]}, indent=1) + "\n"

        def _built(self, ext) -> Path:
            """Where a finished build of `ext` lives: editable installs and --inplace build in
            build_lib, then copy into the source tree, which is what a later run finds."""
            return ROOT / self.get_ext_filename(ext.name) if self._in_place else Path(self.get_ext_fullpath(ext.name))

        def _stale(self, ext) -> bool:
            from setuptools._distutils.dep_util import newer_group

            built = self._built(ext)
            info = built.parent / kl.BUILD_INFO
            return (self.force or newer_group(ext.sources + ext.depends, str(built), "newer")
                    or not info.exists() or info.read_text() != self._info())

        def build_extensions(self):
            todo = [e.name.rsplit(".", 1)[-1] for e in self.extensions if self._stale(e)]
            if not todo:
                say("up to date")
                return super().build_extensions()  # copies the built modules where setuptools wants them
            say(f"compiling {', '.join(todo)} ({self.parallel} at a time; ~40 s each on one idle core)")
            t0, done = time.monotonic(), threading.Event()

            def heartbeat():
                while not done.wait(15):
                    say(f"still compiling ... {time.monotonic() - t0:.0f} s")

            threading.Thread(target=heartbeat, daemon=True).start()
            try:
                super().build_extensions()
            finally:
                done.set()
            say(f"built in {time.monotonic() - t0:.0f} s")

        def build_extension(self, ext):
            if not self._stale(ext):
                dst = Path(self.get_ext_fullpath(ext.name))
                if dst != self._built(ext):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(self._built(ext), dst)
                return
            t = time.monotonic()
            super().build_extension(ext)
            say(f"{ext.name.rsplit('.', 1)[-1]} done in {time.monotonic() - t:.0f} s")

        def run(self):
            self._in_place = self.inplace
            super().run()  # builds, and copies the modules into the source tree when in place
            info = self._info()
            dirs = {Path(self.build_lib) / "pagedserve/model"}
            if self.inplace or getattr(self, "editable_mode", False):
                dirs.add(ROOT / "pagedserve/model")
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
                if not (d / kl.BUILD_INFO).exists() or (d / kl.BUILD_INFO).read_text() != info:
                    (d / kl.BUILD_INFO).write_text(info)

    # One small wrapper source per level, so each level's object file has its own path.
    gen = ROOT / "build" / "kernel_src"
    gen.mkdir(parents=True, exist_ok=True)
    exts = []
    for lv in kl.levels_for_this_platform():
        src = gen / f"{lv.module}.cpp"
        text = f'// {lv.name} build of every kernel (setup.py)\n#include "{kl.CSRC / kl.UNITY_SOURCE}"\n'
        if not src.exists() or src.read_text() != text:
            src.write_text(text)
        exts.append(CppExtension(
            f"pagedserve.model.{lv.module}", [str(src.relative_to(ROOT))],
            extra_compile_args=[*kl.COMMON_CFLAGS, *lv.cflags, "-g0"], extra_link_args=["-fopenmp"],
            depends=[str(p.relative_to(ROOT)) for p in kl.source_files()]))
    return exts, {"build_ext": BuildKernels}


ext_modules, cmdclass = kernel_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
