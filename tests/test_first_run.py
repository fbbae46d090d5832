"""A new user's first commands: each answers quickly (nothing heavy imported to say --help or
report a mistake), the help is complete, the example gateway is healthy before its semantic
router's model has loaded, and nothing compiles after setup."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_utils import ServerProcess, free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "sentence_transformers", "fastapi", "uvicorn")

# Run in a fresh interpreter: which heavy modules did the command import, and how it ended.
PROBE = """
import io, json, sys, time, contextlib
t0 = time.monotonic()
from pagedserve.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        rc = main(sys.argv[1:])
    except SystemExit as e:
        rc = e.code
print(json.dumps({"rc": rc, "s": time.monotonic() - t0, "out": out.getvalue(), "err": err.getvalue(),
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def probe(*argv: str, env: dict | None = None, cwd: Path | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})}, cwd=cwd)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["log"] = res["err"] + r.stderr  # logging set up inside main() writes to the redirected stderr
    return res


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["bench", "--help"], ["plan", "--help"],
                                  ["gateway", "--help"], ["plan", "llama-3-8b", "--gpu", "L4"]])
def test_help_and_plan_import_nothing_heavy(argv):
    res = probe(*argv)
    assert res["rc"] in (0, None) and res["heavy"] == [], res
    assert res["s"] < 20  # ~0.3 s idle; the structural check above is what matters


def test_mistakes_are_reported_before_anything_loads(tmp_path):
    res = probe("serve", str(tmp_path / "no-such-model"))
    assert res["rc"] == 2 and res["heavy"] == []
    assert re.search(r"model path '.*no-such-model' does not exist: pass a Hugging Face model folder, a \.gguf file, "
                     r"or a hub id", res["log"]), res["log"]
    res = probe("serve", "--dtype", "float64")
    assert res["rc"] == 2 and res["heavy"] == [] and "dtype must be one of" in res["log"]
    res = probe("serve", "--kv-cache-dtype", "int4")
    assert res["rc"] == 2 and res["heavy"] == [] and "kv_cache_dtype must be one of" in res["log"]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    r = subprocess.run([sys.executable, "-c", PROBE, "gateway", "--config", str(ROOT / "examples/gateway.yaml")],
                       capture_output=True, text=True, timeout=120, env=env)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 2 and res["heavy"] == [], res
    assert "environment variable OPENAI_API_KEY is not set" in res["err"] and "gateway.yaml:" in res["err"], res


def _options(help_text: str) -> list[tuple[str, str]]:
    """(flag, its help) for every option line of an argparse help."""
    opts, cur = [], None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):  # "  --flag METAVAR, --other  help" (help may start on the next line)
            flags, _, help_ = line.strip().partition("  ")
            cur = [flags.split()[0].rstrip(","), help_]
            opts.append(cur)
        elif cur is not None and line.startswith(" " * 10):
            cur[1] += " " + line.strip()
        elif not line.strip():
            cur = None
    return [(f, h.strip()) for f, h in opts]


@pytest.mark.parametrize("cmd", ["serve", "bench", "plan", "gateway"])
def test_every_flag_says_what_it_does_and_defaults_once(cmd):
    text = probe(cmd, "--help")["out"]
    opts = _options(text)
    assert len(opts) >= 4, text
    for flag, help_ in opts:
        assert help_, f"{cmd} {flag} has no help text"
        assert help_.lower().count("default") <= 1, f"{cmd} {flag}: {help_}"


def test_example_gateway_is_healthy_before_its_semantic_model_loads(tmp_path):
    """examples/gateway.yaml as shipped (its replicas are loopback ports with nothing on them, so
    no request is sent): /health answers while the embedding model loads in the background."""
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "pagedserve.cli", "gateway", "--config",
                                 str(ROOT / "examples/gateway.yaml"), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, "OPENAI_API_KEY": "sk-not-used-here"}, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            healthy_in = wait_ready(proc, url, log_path, timeout=120, poll=0.05)
            first = httpx.get(f"{url}/health").json()
            assert first["semantic_routes"]["auto"] in ("loading", "ready")
            deadline = time.monotonic() + 180
            while httpx.get(f"{url}/health").json()["semantic_routes"]["auto"] == "loading":
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.2)
            assert httpx.get(f"{url}/health").json()["semantic_routes"]["auto"] == "ready"
            semantic_in = time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(30)
    text = log_path.read_text()
    # The gateway said it was ready before the router's model finished loading.
    assert text.index("gateway ready") < text.index("semantic routing for 'auto' ready"), text
    print(f"healthy in {healthy_in:.1f}s, semantic router ready at {semantic_in:.1f}s")


def test_no_readme_command_compiles_anything(tmp_path):
    """After setup, the README's commands run with compilers that only leave a mark: nothing may
    call them, nothing may appear in the torch extensions folder, the installed kernels stay as
    they were, and the server runs the installed build."""
    from pagedserve.model import kernel_levels

    fake = tmp_path / "bin"
    fake.mkdir()
    mark = tmp_path / "compiled"
    for tool in ("ninja", "c++", "g++", "gcc", "cc", "clang", "clang++"):
        (fake / tool).write_text(f"#!/bin/sh\necho \"$0 $*\" >> {mark}\nexit 1\n")
        (fake / tool).chmod(0o755)
    ext_dir = tmp_path / "torch_extensions"
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "TORCH_EXTENSIONS_DIR": str(ext_dir), "CC": str(fake / "cc"),
           "CXX": str(fake / "c++")}
    model_dir = kernel_levels.CSRC.parent
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.glob("_kernels_*")}
    assert before, "setup built no kernels"

    # The offline LLM starts beside the server (two processes loading at once: half the wait).
    llm = subprocess.Popen([sys.executable, "-c", "from pagedserve import LLM, SamplingParams; "
                            "print(LLM().generate(['Hi'], SamplingParams(max_tokens=2))[0].outputs[0].text)"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        server = ServerProcess([], tmp_path / "serve.log", env=env)  # the default model, as scripts/serve.sh
        try:
            r = httpx.post(f"{server.base}/chat/completions", timeout=60, json={
                "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            for argv in (["plan", "llama-3-8b", "--gpu", "L4"], ["bench", "--help"]):
                assert probe(*argv, env=env)["rc"] in (0, None)
        finally:
            assert server.stop() == 0
        _, err = llm.communicate(timeout=300)
        assert llm.returncode == 0, err[-2000:]
    finally:
        if llm.poll() is None:
            llm.kill()
    log = (tmp_path / "serve.log").read_text()
    assert f"C++ CPU kernels: {kernel_levels.supported_levels()[0].name} (installed build)" in log, log[-2000:]
    assert not mark.exists(), mark.read_text()
    assert not ext_dir.exists() or not any(ext_dir.iterdir())
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.glob("_kernels_*")} == before
