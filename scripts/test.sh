#!/usr/bin/env bash
# Install what the tests need into .venv and run them: ./scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/scripts/env.sh" test
cd "$root"
export MOEKIT_CACHE="${MOEKIT_CACHE:-$root/.cache}"
python -m pytest -q "$@"
