#!/usr/bin/env bash
# Set up everything, then serve the default model (SmolLM2-135M-Instruct) on http://127.0.0.1:8000.
# Extra arguments go to `pagedserve serve` (e.g. --port 9000, a model path, --api-key ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pagedserve serve "$@"
