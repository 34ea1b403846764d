#!/usr/bin/env bash
# Run the test suite: scripts/test.sh [pytest args...]
#   e.g. scripts/test.sh -k sliding -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
