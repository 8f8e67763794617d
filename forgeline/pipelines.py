"""The pipelines of this workspace, found from flows/ without importing a flow.

One pipeline = `flows/<pipeline>.py` (its `STAGES = {"stage": ConfigClass, ...}` lists its DVC
stages in run order) + those stages in dvc.yaml + a deployment in prefect.yaml + the MLflow
experiment `forgeline-<pipeline>`. Flows are read as source (ast): importing one imports Prefect
and every stage module, seconds, and the library must not import flows/ anyway.

    forgeline run --list          # every pipeline and its stages
    forgeline run <pipeline> [stage.key=value ...]   # python -m flows.<pipeline>: flow_main below
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable

from forgeline.config import ConfigError
from forgeline.paths import ROOT

FLOWS = ROOT / "flows"


def experiment_name(pipeline: str) -> str:
    """The MLflow experiment of a pipeline: its parent runs and every stage run they hold."""
    return f"forgeline-{pipeline}"


def module_path(module: str) -> Path:
    """The file of an in-repo module: `tasks.sft` -> tasks/sft.py, a package -> its __init__.py."""
    base = ROOT / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def flow_stages(flow_file: Path) -> dict[str, tuple[Path, str]]:
    """{stage: (module file, config class name)} from a flow module's `STAGES = {"stage": Class, ...}`
    and its `from tasks.x import Class` lines, read without importing the flow (which imports every stage)."""
    tree = ast.parse(flow_file.read_text())
    where = {alias.asname or alias.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "STAGES" for t in node.targets):
            return {ast.literal_eval(k): (module_path(where[v.id]), v.id)
                    for k, v in zip(node.value.keys, node.value.values)}
    raise ConfigError(f"{flow_file}: no STAGES dict")


def pipelines(flows: Path = FLOWS) -> dict[str, list[str]]:
    """{pipeline: [its stages, in run order]} for every flows/<pipeline>.py with a STAGES dict."""
    found = {}
    for path in sorted(flows.glob("*.py")):
        try:
            found[path.stem] = list(flow_stages(path))
        except ConfigError:
            continue  # __init__.py, or a helper module that is no pipeline
    return found


def pipeline_of(stage: str, flows: Path = FLOWS) -> str | None:
    """The pipeline whose flow lists `stage` (stage names are unique across dvc.yaml, so at most one)."""
    return next((p for p, stages in pipelines(flows).items() if stage in stages), None)


def flow_main(pipeline: str, flow: Callable, params_cls: type, argv: list[str] | None = None,
              failures: tuple[type[BaseException], ...] = ()) -> None:
    """The command line every flow shares (what `forgeline run <pipeline>` starts):

        python -m flows.<pipeline> [stage.key=value ...] [--wait-s S] [--no-push] [--plan]

    `params_cls` is the flow's pydantic parameters ({stage: {key: value}}, wait_s, push); `failures`
    are the flow's own expected errors (e.g. ValidationFailed), printed as one line, exit 1.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=f"python -m flows.{pipeline}", description=f"Run the {pipeline} pipeline.")
    parser.add_argument("overrides", nargs="*", help="stage.key=value")
    parser.add_argument("--wait-s", type=float, default=0.0)
    parser.add_argument("--no-push", action="store_true")
    parser.add_argument("--plan", action="store_true", help="say what would run and why; run nothing")
    args = parser.parse_args(argv)
    if args.plan:  # `forgeline plan <pipeline>` is the fast way: it does not import the flow's stages
        from forgeline.plan import format_plan, plan_pipeline

        try:
            print(format_plan(plan_pipeline(pipeline, args.overrides)))
        except ConfigError as e:
            sys.exit(f"{pipeline} --plan: {e}")
        return
    from pydantic import ValidationError

    from forgeline.config import parse_overrides
    from forgeline.prefect_api import TemporaryAPI
    from forgeline.tracking import init_tracking
    from forgeline.workspace import WorkspaceBusy

    nested: dict[str, dict] = {}
    for key, value in parse_overrides(args.overrides).items():
        stage, _, field = key.partition(".")
        nested.setdefault(stage, {})[field] = value
    try:
        params = params_cls.model_validate({**nested, "wait_s": args.wait_s, "push": not args.no_push})
        api = TemporaryAPI.start_unless_configured()
        init_tracking(pipeline)  # MLflow's import and its store's schema check, while the Prefect server starts
        with api.ready():
            results = flow(params)
    except (ConfigError, ValidationError, WorkspaceBusy, *failures) as e:
        sys.exit(f"{pipeline}: {type(e).__name__}: {e}")
    for r in results:
        print(f"{r['stage']:>10}: {'skipped (up to date)' if r['skipped'] else 'ran'} in {r['seconds']:.1f}s")
