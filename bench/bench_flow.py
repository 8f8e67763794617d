"""Wall time of a no-op rerun of the LLM flow (target <= 10 s), against a bare `dvc repro` no-op, and of
the plan command (target <= 3 s).

Runs in a throw-away copy of the repo: one real run of the flow on the shipped sample (short
pretraining and alignment stages), then timed reruns with nothing changed, then `forgeline plan llm`
with nothing changed and with an override (which it plans, not writes).

    .venv/bin/python -m bench.bench_flow
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import machine, write_result
from tests.conftest import ALIGNMENT_FAST, cli_overrides, commit_settings, make_workspace, run_in

FAST = ["pretrain.max_steps=12", "pretrain.eval_interval=6", "pretrain.ckpt_interval=6",
        "evaluate.max_eval_tokens=20000", "evaluate.n_samples=1", *cli_overrides(ALIGNMENT_FAST)]
ROUNDS = 3


def timed(ws: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = run_in(ws, *args)
    return time.perf_counter() - t0, proc.stdout


def median_of(ws: Path, *args: str) -> tuple[float, list[float], str]:
    runs = [timed(ws, *args) for _ in range(ROUNDS)]
    seconds = [round(s, 2) for s, _ in runs]
    return statistics.median(seconds), seconds, runs[-1][1]


def main() -> None:
    started = machine()
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp))
        # the short settings are the workspace's committed configs: a run's overrides apply to that
        # run only, so the timed plain reruns below must find them in the files
        commit_settings(ws, FAST)
        first, _ = timed(ws, "-m", "flows.llm", "--no-push")
        flow, flow_all, out = median_of(ws, "-m", "flows.llm", "--no-push")
        assert "ran in" not in out, f"the rerun was not a no-op:\n{out[-2000:]}"
        dvc, dvc_all, _ = median_of(ws, sys.executable, "-m", "dvc", "repro")
        plan, plan_all, plan_out = median_of(ws, "-m", "forgeline", "plan", "llm")
        assert "nothing would run" in plan_out, plan_out
        change, change_all, change_out = median_of(ws, "-m", "forgeline", "plan", "llm", "sft.max_steps=500")
        flow_plan, flow_plan_all, _ = median_of(ws, "-m", "flows.llm", "--plan", "sft.max_steps=500")
    result = {"first_run_s": round(first, 1), "noop_flow_s": flow, "noop_flow_rounds_s": flow_all,
              "noop_dvc_repro_s": dvc, "noop_dvc_repro_rounds_s": dvc_all,
              "plan_noop_s": plan, "plan_noop_rounds_s": plan_all,
              "plan_override_s": change, "plan_override_rounds_s": change_all,
              "flow_plan_override_s": flow_plan, "flow_plan_override_rounds_s": flow_plan_all,
              "plan_override_output": change_out, "target_noop_flow_s": 10, "target_plan_s": 3}
    print(f"| first run (s) | no-op flow rerun (s, median of {ROUNDS}) | no-op `dvc repro` (s) "
          "| `forgeline plan llm`, no-op (s) | ... with `sft.max_steps=500` (s) | `python -m flows.llm --plan ...` (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['first_run_s']} | {flow} | {dvc} | {plan} | {change} | {flow_plan} |")
    print(change_out)
    write_result("flow", result, started)


if __name__ == "__main__":
    main()
