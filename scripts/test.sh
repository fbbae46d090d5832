#!/usr/bin/env bash
# Set up everything (scripts/setup.sh plus the Debian packages the tests use), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: a real Prometheus scrapes the server in the metrics tests; a real PostgreSQL
# holds the gateway's audit log in its tests (they start their own server in a temp dir).
need=()
command -v prometheus >/dev/null || need+=(prometheus)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
