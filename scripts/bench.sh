#!/usr/bin/env bash
# Run the main job (benchmarks): scripts/bench.sh [attnlab bench args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/attnlab bench "$@"
