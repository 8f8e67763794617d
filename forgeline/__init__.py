"""Forgeline: workflow-orchestrated GenAI pipelines (Prefect + DVC + MLflow + Accelerate)."""
