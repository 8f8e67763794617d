"""Wall time of a no-op rerun of the LLM flow (target <= 10 s), against a bare `dvc repro` no-op.

Runs in a throw-away copy of the repo: one real run of the flow on the shipped sample (short
pretraining), then timed reruns with nothing changed.

    .venv/bin/python -m bench.bench_flow
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import make_workspace, run_in

FAST = ["pretrain.max_steps=12", "pretrain.eval_interval=6", "pretrain.ckpt_interval=6",
        "evaluate.max_eval_tokens=20000", "evaluate.n_samples=1", "--no-push"]


def timed(ws: Path, *args: str) -> float:
    t0 = time.perf_counter()
    run_in(ws, *args)
    return time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp))
        first = timed(ws, "-m", "flows.llm", *FAST)
        flow = [timed(ws, "-m", "flows.llm", "--no-push") for _ in range(3)]
        dvc = [timed(ws, sys.executable, "-m", "dvc", "repro") for _ in range(3)]
    result = {"first_run_s": round(first, 1), "noop_flow_s": round(statistics.median(flow), 2),
              "noop_dvc_repro_s": round(statistics.median(dvc), 2), "target_noop_flow_s": 10}
    print("| first run (s) | no-op flow rerun (s, median of 3) | no-op `dvc repro` (s) |")
    print("|---|---|---|")
    print(f"| {result['first_run_s']} | {result['noop_flow_s']} | {result['noop_dvc_repro_s']} |")
    out = Path(__file__).parent / "results" / "flow.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
