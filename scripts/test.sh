#!/usr/bin/env bash
# Set up everything (scripts/setup.sh plus the Debian packages the tests use), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
