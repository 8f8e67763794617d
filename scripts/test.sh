#!/usr/bin/env bash
# Set up, then run the whole test suite (slow end-to-end tests included).
#   bash scripts/test.sh [pytest args ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
