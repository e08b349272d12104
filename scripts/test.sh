#!/usr/bin/env bash
# Set up a virtual environment with purifier and its test dependencies, then run the tests.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# .venv with purifier and the `test` extra installed from this checkout; skipped when it
# already is (REINSTALL=1 forces it; PYTHON picks the interpreter for a new .venv).
source scripts/venv.sh
ensure_venv "$PWD" test
exec .venv/bin/python -m pytest "$@"
