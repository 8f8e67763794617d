#!/usr/bin/env bash
# Set up, then run the LLM pipeline on the embedded default sample (data/raw):
# Prefect without a server, MLflow in ./mlflow.db, DVC remote in ./.dvcstore.
#   bash scripts/demo.sh [stage.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m flows.llm "$@"
