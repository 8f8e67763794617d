"""The `forgeline` command: run the local stack and audit lineage.

    forgeline up [--paused-schedules] [--no-deploy]   # Prefect server + worker + MLflow server, then deploy
    forgeline status [--json]                          # what runs where
    forgeline env                                      # `eval $(forgeline env)`: point a shell at the stack
    forgeline down                                     # stop exactly what `up` started
    forgeline lineage models:/forgeline-llm@candidate [--json] [--strict]   # or an MLflow run id
    forgeline models [--json]                          # registered versions, aliases, the alias history
    forgeline rollback [--reason TEXT]                 # champion back to the previous champion (recorded)
    forgeline plan llm [stage.key=value ...]           # which stages a run would rerun and why, time and memory
    forgeline run llm [stage.key=value ...] [--no-push] [--wait-s S]   # any flows/<pipeline>.py
    forgeline run --list                               # every pipeline and its stages
    forgeline serve [--host 127.0.0.1] [--port 8000]   # the online side: serve/app.py under uvicorn
    forgeline feedback export [--no-dvc]               # chat page ratings -> data/feedback/pairs.jsonl (DVC)

Also `python -m forgeline ...`. Run from anywhere: the workspace is the repo this package lives in.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from forgeline import stack
from forgeline.paths import ROOT


def _use_stack_tracking() -> None:
    """Point MLflow at the running stack's server unless MLFLOW_TRACKING_URI says otherwise."""
    state = stack.load()
    if not os.environ.get("MLFLOW_TRACKING_URI") and stack.alive(state.get("services", {}).get("mlflow-server")):
        os.environ["MLFLOW_TRACKING_URI"] = state["mlflow_url"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forgeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the stack (idempotent) and deploy prefect.yaml")
    p_up.add_argument("--paused-schedules", action="store_true", help="deploy with every cron schedule paused")
    p_up.add_argument("--no-deploy", action="store_true", help="start the services only")
    sub.add_parser("down", help="stop what `up` started")
    p_status = sub.add_parser("status", help="services, pool, deployments, recent runs, models")
    p_status.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print export lines for PREFECT_API_URL and MLFLOW_TRACKING_URI")
    p_lin = sub.add_parser("lineage", help="verified chain from a model version or run back to raw inputs")
    p_lin.add_argument("target", help="models:/<name>@<alias>, models:/<name>/<version> or an MLflow run id")
    p_lin.add_argument("--json", action="store_true")
    p_lin.add_argument("--strict", action="store_true",
                       help="exit non-zero unless every check is OK (UNVERIFIED too, not only BROKEN)")
    p_models = sub.add_parser("models", help="registered versions, their aliases and who moved which alias when")
    p_models.add_argument("--name", default="forgeline-llm", help="registered model")
    p_models.add_argument("--json", action="store_true")
    p_rb = sub.add_parser("rollback", help="move champion back to the previous champion version, recorded")
    p_rb.add_argument("--name", default="forgeline-llm", help="registered model")
    p_rb.add_argument("--alias", default="champion")
    p_rb.add_argument("--reason", default="", help="why, kept in the alias history")
    p_plan = sub.add_parser("plan", help="which stages a pipeline run would rerun and why; nothing runs")
    p_plan.add_argument("pipeline", help="flows/<pipeline>.py, e.g. llm")
    p_plan.add_argument("overrides", nargs="*", help="stage.key=value, as the flow takes them (not written)")
    p_run = sub.add_parser("run", help="run a pipeline (python -m flows.<pipeline>), or list them")
    p_run.add_argument("--list", action="store_true", help="every pipeline and its stages")
    p_run.add_argument("pipeline", nargs="?", help="flows/<pipeline>.py, e.g. llm")
    p_run.add_argument("args", nargs=argparse.REMAINDER, help="stage.key=value ..., --no-push, --wait-s S, --plan")
    p_serve = sub.add_parser("serve", help="the FastAPI app of serve/ (every pipeline's endpoints) under uvicorn")
    p_serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p_serve.add_argument("--port", type=int, default=8000)
    p_fb = sub.add_parser("feedback", help="the chat page's ratings (forgeline/feedback.py)")
    p_fb_export = p_fb.add_subparsers(dest="feedback_command", required=True).add_parser(
        "export", help="ratings -> preference pairs in data/feedback/pairs.jsonl, then `dvc add` it")
    p_fb_export.add_argument("--store", help="the records' folder (default $FORGELINE_FEEDBACK_DIR or .forgeline/feedback)")
    p_fb_export.add_argument("--out", help="the pairs file (default data/feedback/pairs.jsonl)")
    p_fb_export.add_argument("--no-dvc", action="store_true", help="write the file only, no `dvc add`")
    p_fb_export.add_argument("--guard", help="the safety guard's folder that screens the pairs (default data/safety/guard)")
    p_fb_export.add_argument("--no-guard", action="store_true", help="keep every pair unscreened")
    args = parser.parse_args(argv)
    # the stack is on loopback: its clients (Prefect's httpx, MLflow's requests) must not use a proxy
    os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))

    if args.command == "up":
        try:
            state = stack.up(paused_schedules=args.paused_schedules, deploy_flows=not args.no_deploy)
        except stack.StackError as e:
            print(f"forgeline up: {e}\n(what did start is still running: `forgeline down` stops it)", file=sys.stderr)
            return 1
        print(f"Prefect UI  {state['prefect_ui_url']}\nMLflow      {state['mlflow_url']}")
        print(stack.format_status(stack.status()))
        return 0
    if args.command == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    if args.command == "status":
        st = stack.status()
        print(json.dumps(st, indent=2) if args.json else stack.format_status(st))
        return 0
    if args.command == "env":
        state = stack.load()
        if not stack.alive(state.get("services", {}).get("prefect-server")):
            print("forgeline env: the stack is not running (forgeline up)", file=sys.stderr)
            return 1
        for k, v in stack.client_env(state).items():
            print(f"export {k}={v}")
        return 0
    if args.command == "lineage":
        from forgeline.lineage import exit_code, format_trace, trace

        _use_stack_tracking()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        result = trace(args.target)
        print(json.dumps(result, indent=2, default=str) if args.json else format_trace(result))
        return exit_code(result, strict=args.strict)
    if args.command in ("models", "rollback"):
        from forgeline import registry

        _use_stack_tracking()
        if args.command == "models":
            info = registry.models(args.name)
            print(json.dumps(info, indent=2) if args.json else registry.format_models(info))
            return 0
        try:
            event = registry.rollback(args.alias, args.reason, name=args.name)
        except LookupError as e:
            print(f"forgeline rollback: {e}", file=sys.stderr)
            return 1
        print(f"{args.name}@{event['alias']}: v{event['from']} -> v{event['to']} (rollback, recorded in the alias history)")
        return 0
    if args.command == "run":
        from forgeline.pipelines import pipelines

        found = pipelines()
        if args.list or not args.pipeline:
            for name, stages in found.items():
                print(f"{name}: {' -> '.join(stages)}")
            return 0
        if args.pipeline not in found:
            print(f"forgeline run: no pipeline {args.pipeline!r} (flows/<pipeline>.py with STAGES); "
                  f"known: {', '.join(found)}", file=sys.stderr)
            return 1
        # the flow in a process of its own, as `python -m flows.<pipeline>` (the library imports no flow)
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", f"flows.{args.pipeline}", *args.args])
    if args.command == "serve":
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "uvicorn", "--factory", "serve.app:create_app",
                                  "--host", args.host, "--port", str(args.port)])
    if args.command == "feedback":
        from pathlib import Path

        from forgeline.feedback import GUARD, PAIRS, export

        guard_dir = None if args.no_guard else Path(args.guard) if args.guard else GUARD
        if guard_dir is not None and not (guard_dir / "guard.json").exists():
            if args.guard:
                print(f"forgeline feedback export: no guard in {guard_dir} (guard.json)", file=sys.stderr)
                return 1
            print(f"feedback: no safety guard in {guard_dir} yet (the safety stage makes it): pairs not screened")
            guard_dir = None
        guard = None
        if guard_dir is not None:
            from forgeline.safety import Guard

            guard = Guard.load(guard_dir)
        found = export(Path(args.store) if args.store else None, Path(args.out) if args.out else PAIRS,
                       dvc=not args.no_dvc, guard=guard)
        print(f"feedback: {found['records']} records, {found['replies']} replies (rated {found['rated']}) -> "
              f"{sum(found['pairs'].values())} pairs {found['pairs']} in {found['out']}"
              + (f"; dropped by the guard {found['dropped']}" if found["dropped"] else "")
              + ("" if args.no_dvc else f"; dvc add done: commit {found['out']}.dvc"))
        return 0
    if args.command == "plan":
        from forgeline.config import ConfigError
        from forgeline.plan import format_plan, plan_pipeline

        try:
            print(format_plan(plan_pipeline(args.pipeline, args.overrides)))
        except (ConfigError, FileNotFoundError) as e:
            print(f"forgeline plan: {e}", file=sys.stderr)
            return 1
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
