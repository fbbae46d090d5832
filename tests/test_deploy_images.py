"""The container images' Dockerfiles, parsed with Docker's own parser (the `dockerfile` package):
pinned bases, multi-stage, non-root, a health check on the server's /health, and an entrypoint
and command the real CLI accepts. (No container runtime runs here: the images are not built in CI.)"""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile
import pytest

from pagedserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "deploy/docker").glob("Dockerfile.*"))


def stages(path: Path) -> tuple[dict, list[list]]:
    """(ARG defaults, the instructions of each stage)."""
    args, out = {}, []
    for c in dockerfile.parse_file(str(path)):
        if c.cmd == "ARG" and not out:
            k, _, v = c.value[0].partition("=")
            args[k] = v
        elif c.cmd == "FROM":
            out.append([c])
        elif out:
            out[-1].append(c)
    return args, out


def test_both_images_exist():
    assert [p.name for p in FILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dockerfile(path):
    args, st = stages(path)
    assert len(st) >= 2, "multi-stage: the compiler stays in the build stage"
    for s in st:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s[0].value[0])
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"base image not pinned: {image}"
    final = st[-1]
    cmds = {c.cmd: c for c in final}
    assert cmds["USER"].value[0] not in ("root", "0")
    assert not any(c.cmd == "RUN" and re.search(r"\b(g\+\+|gcc|build-essential)\b", c.value[0]) for c in final), \
        "no compiler in the runtime image"
    build_runs = " ".join(c.value[0] for c in st[0] if c.cmd == "RUN")
    assert "--no-build-isolation" in build_runs  # the kernels compile at image build (setup.py)
    # The same torch as the README's setup.
    pin = re.search(r"torch==[\d.]+", (ROOT / "scripts/setup.sh").read_text()).group(0)
    assert pin in build_runs
    # ... and the same xgrammar pins, installed without its GPU dependencies.
    grammar = re.search(r"XGRAMMAR=\(([^)]*)\)", (ROOT / "scripts/setup.sh").read_text()).group(1)
    assert f"pip install --no-deps {grammar}" in build_runs
    # Entrypoint and command: a real CLI invocation; the health check probes its port's /health.
    assert list(cmds["ENTRYPOINT"].value) == ["pagedserve"] and cmds["ENTRYPOINT"].json
    argv = list(cmds["CMD"].value)
    parsed = build_parser().parse_args(argv)
    assert parsed.command == "serve" and parsed.host == "0.0.0.0"
    assert cmds["EXPOSE"].value[0] == str(parsed.port)
    probe = " ".join(cmds["HEALTHCHECK"].value)
    assert f"127.0.0.1:{parsed.port}/health" in probe
    copied = [c.value for c in final if c.cmd == "COPY"]
    assert any(v[-1] == parsed.model_tag.rsplit("/", 1)[0] for v in copied), "the default model is in the image"


def test_dockerignore_keeps_local_builds_out():
    """The image compiles its own kernels; a checkout's modules (built for this CPU) and venv stay out."""
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "pagedserve/model/_kernels_*.so" in ignore and ".venv" in ignore and ".git" in ignore
