#!/usr/bin/env bash
# Set up, then run the LLM pipeline on the embedded default sample (data/raw):
# Prefect without a server, MLflow in ./mlflow.db, DVC remote in ./.dvcstore. Then the alignment
# comparison (scripts/alignment_demo.sh: plain PPO, DPO and the two control runs from the same
# SFT and reward models, and the README's table).
#   bash scripts/demo.sh [stage.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m flows.llm "$@"
bash scripts/alignment_demo.sh
