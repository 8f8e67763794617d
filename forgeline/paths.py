"""Where things live. Everything runs from the repo root; these are the fixed places."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DATA = ROOT / "data"
# Project-local runtime state (locks, server pids, GE context): never versioned.
STATE = ROOT / ".forgeline"


def config_path(stage: str) -> Path:
    return CONFIGS / f"{stage}.yaml"


def stage_dir(stage: str) -> Path:
    """data/<stage>/: the one output folder of a stage (a DVC out)."""
    return DATA / stage
