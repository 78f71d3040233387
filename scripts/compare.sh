#!/usr/bin/env bash
# Install moekit into .venv and run `moekit compare` (arguments are passed on): ./scripts/compare.sh [args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/scripts/env.sh" compare
cd "$root"
moekit compare "$@"
