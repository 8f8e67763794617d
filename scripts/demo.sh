#!/usr/bin/env bash
# Set up, then run the LLM pipeline on the embedded default sample (data/raw): the stages of the
# nightly deployment (prefect.yaml), with Prefect without a server, MLflow in ./mlflow.db and the
# DVC remote in ./.dvcstore. The alignment comparison (PPO without ptx, DPO, the control runs) is a
# benchmark, run on demand: python -m bench.bench_alignment
#   bash scripts/demo.sh [stage.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m flows.llm "$@"
