"""The C++ kernels are built at install time, one module per CPU feature level, and picked at
import by this CPU's flags; nothing compiles at run time, stale builds are refused with a message
that says how to rebuild."""

import json

import pytest

from pagedserve.model import cpu_kernels, kernel_levels


@pytest.fixture
def fresh_loader(monkeypatch):
    """cpu_kernels with nothing loaded yet (load() remembers its first answer)."""
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_error", None)
    monkeypatch.delenv("PAGEDSERVE_KERNELS", raising=False)
    monkeypatch.delenv("PAGEDSERVE_CPU_LEVEL", raising=False)
    return cpu_kernels


def test_the_best_level_this_cpu_runs_is_loaded(fresh_loader):
    best = kernel_levels.supported_levels()[0]
    assert fresh_loader.load() is not None
    assert fresh_loader.describe() == f"{best.name} (installed build)"
    assert fresh_loader._module.__name__ == f"pagedserve.model.{best.module}"


def test_levels_follow_cpu_flags():
    v3 = kernel_levels.X86_LEVELS[1].needs
    v4 = kernel_levels.X86_LEVELS[0].needs
    names = lambda flags: [lv.name for lv in kernel_levels.supported_levels(frozenset(flags))]  # noqa: E731
    if kernel_levels.levels_for_this_platform() != kernel_levels.X86_LEVELS:
        pytest.skip("x86-64 levels only")
    assert names(v4) == ["x86-64-v4", "x86-64-v3"]
    assert names(v3) == ["x86-64-v3"]
    assert names(v3 - {"fma"}) == []  # no FMA: the PyTorch path
    assert names((v3 - {"abm"}) | {"lzcnt"}) == ["x86-64-v3"]  # how Intel CPUs spell ABM


def test_forced_level_and_bad_values_say_what_to_change(fresh_loader, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CPU_LEVEL", "x86-64-v9")
    with pytest.raises(RuntimeError, match="PAGEDSERVE_CPU_LEVEL='x86-64-v9': use one of"):
        fresh_loader.load(required=True)
    monkeypatch.setattr(cpu_kernels, "_error", None)
    monkeypatch.delenv("PAGEDSERVE_CPU_LEVEL")
    monkeypatch.setenv("PAGEDSERVE_KERNELS", "fast")
    with pytest.raises(RuntimeError, match="PAGEDSERVE_KERNELS='fast': use one of installed, jit, off"):
        fresh_loader.load(required=True)
    monkeypatch.setattr(cpu_kernels, "_error", None)
    monkeypatch.setenv("PAGEDSERVE_KERNELS", "off")
    assert fresh_loader.load() is None and "PAGEDSERVE_KERNELS=off" in fresh_loader.describe()


def test_a_level_can_be_forced(fresh_loader, monkeypatch):
    lowest = kernel_levels.supported_levels()[-1]
    monkeypatch.setenv("PAGEDSERVE_CPU_LEVEL", lowest.name)
    assert fresh_loader.load() is not None and fresh_loader.describe() == f"{lowest.name} (installed build)"


def test_stale_builds_are_refused_with_how_to_rebuild(fresh_loader, monkeypatch, caplog):
    """Sources edited since the build (a git pull): the old module may not match them, so it is
    not loaded; the warning names the command that rebuilds."""
    monkeypatch.setattr(kernel_levels, "sources_digest", lambda: "0" * 16)
    with caplog.at_level("WARNING", logger="pagedserve.kernels"):
        assert fresh_loader.load() is None
    assert "built from other sources" in caplog.text and "scripts/setup.sh" in caplog.text
    assert "PyTorch path" in fresh_loader.describe()


def test_build_info_matches_the_sources_and_torch():
    import torch

    info = json.loads((kernel_levels.CSRC.parent / kernel_levels.BUILD_INFO).read_text())
    assert info["sources"] == kernel_levels.sources_digest() and info["torch"] == torch.__version__
    assert info["levels"] == [lv.name for lv in kernel_levels.levels_for_this_platform()]
