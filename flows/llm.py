"""The LLM pipeline, one Prefect task per DVC stage: ingest → validate → chunk → tokenizer → pretrain → evaluate,
then alignment: chat_data → sft → reward → rlhf (PPO or DPO, configs/rlhf.yaml). The aligned model is
registered in MLflow (forgeline-llm@candidate) and the run's report card written.

DVC decides what is stale; each stage is an MLflow child run under one parent run per pipeline run.

    python -m flows.llm                          # run on the embedded defaults
    python -m flows.llm chunk.chunk_size=800     # override a stage setting for this run only
    python -m flows.llm --wait-s 600 --no-push
    python -m flows.llm --plan [stage.key=value ...]   # which stages would rerun and why, time and memory; runs nothing
"""
from __future__ import annotations

import argparse
import sys

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, ValidationError

from forgeline.config import ConfigError, params_model, parse_overrides
from forgeline.prefect_api import TemporaryAPI
from forgeline.registry import register
from forgeline.tracking import init_tracking
from forgeline.workspace import WorkspaceBusy, pipeline_run, push
from tasks.chat_data import ChatDataConfig, chat_data_task
from tasks.chunk import ChunkConfig, chunk_task
from tasks.evaluate import EvaluateConfig, evaluate_task
from tasks.ingest import IngestConfig, ingest_task
from tasks.pretrain import PretrainConfig, pretrain_task
from tasks.report import report_task
from tasks.reward import RewardConfig, reward_task
from tasks.rlhf import RLHFConfig, rlhf_task
from tasks.sft import SFTConfig, sft_task
from tasks.tokenizer import TokenizerConfig, tokenizer_task
from tasks.validate import ValidateConfig, ValidationFailed, validate_task

STAGES = {"ingest": IngestConfig, "validate": ValidateConfig, "chunk": ChunkConfig,
          "tokenizer": TokenizerConfig, "pretrain": PretrainConfig, "evaluate": EvaluateConfig,
          "chat_data": ChatDataConfig, "sft": SFTConfig, "reward": RewardConfig, "rlhf": RLHFConfig}
(IngestOverrides, ValidateOverrides, ChunkOverrides, TokenizerOverrides, PretrainOverrides,
 EvaluateOverrides, ChatDataOverrides, SFTOverrides, RewardOverrides, RLHFOverrides) = map(params_model, STAGES.values())


class LLMParams(BaseModel):
    """Overrides per stage (empty = keep configs/<stage>.yaml), and how to run."""

    ingest: IngestOverrides = Field(default_factory=IngestOverrides)
    validate_: ValidateOverrides = Field(default_factory=ValidateOverrides, alias="validate")
    chunk: ChunkOverrides = Field(default_factory=ChunkOverrides)
    tokenizer: TokenizerOverrides = Field(default_factory=TokenizerOverrides)
    pretrain: PretrainOverrides = Field(default_factory=PretrainOverrides)
    evaluate: EvaluateOverrides = Field(default_factory=EvaluateOverrides)
    chat_data: ChatDataOverrides = Field(default_factory=ChatDataOverrides)
    sft: SFTOverrides = Field(default_factory=SFTOverrides)
    reward: RewardOverrides = Field(default_factory=RewardOverrides)
    rlhf: RLHFOverrides = Field(default_factory=RLHFOverrides)
    wait_s: float = Field(0.0, description="seconds to wait for another run to free the workspace")
    push: bool = Field(True, description="dvc push the outputs to the default remote at the end")

    model_config = {"populate_by_name": True, "extra": "forbid"}

    def overrides(self) -> dict[str, dict]:
        return {stage: getattr(self, "validate_" if stage == "validate" else stage).model_dump(exclude_none=True)
                for stage in STAGES}


@task(name="register", retries=2, retry_delay_seconds=5)
def register_task(run: dict[str, str]) -> dict:
    """The aligned model (the rlhf run's model/ artifacts) as a version of forgeline-llm, alias candidate."""
    return register("rlhf", run["parent_run_id"], run["flow_run_id"])


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push_task() -> int:
    return push()


@flow(name="llm", log_prints=True)
def llm(params: LLMParams = LLMParams()) -> list[dict]:
    with pipeline_run("llm", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            ingest_task(run),
            validate_task(run),
            chunk_task(run),
            tokenizer_task(run),
            pretrain_task(run),
            evaluate_task(run),
            chat_data_task(run),
            sft_task(run),
            reward_task(run),
            rlhf_task(run),
        ]
        model = register_task(run)
        print(f"model: {model['uri']} ({'new version' if model['created'] else 'unchanged'}) from run {model['run_id']}")
        report_task(run)
        if params.push:
            push_task()
    create_table_artifact(key="llm-stages", description="stages of this pipeline run", table=[
        {"stage": r["stage"], "skipped": r["skipped"], "seconds": r["seconds"], "mlflow_run": r["run_id"]}
        for r in results])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the LLM pipeline.")
    parser.add_argument("overrides", nargs="*", help="stage.key=value")
    parser.add_argument("--wait-s", type=float, default=0.0)
    parser.add_argument("--no-push", action="store_true")
    parser.add_argument("--plan", action="store_true", help="say what would run and why; run nothing")
    args = parser.parse_args(argv)
    if args.plan:  # `forgeline plan llm` without this module's imports is the fast way (forgeline/plan.py)
        from forgeline.plan import format_plan, plan_pipeline

        try:
            print(format_plan(plan_pipeline("llm", args.overrides)))
        except ConfigError as e:
            sys.exit(f"llm --plan: {e}")
        return
    nested: dict[str, dict] = {}
    for key, value in parse_overrides(args.overrides).items():
        stage, _, field = key.partition(".")
        nested.setdefault(stage, {})[field] = value
    try:
        params = LLMParams.model_validate({**nested, "wait_s": args.wait_s, "push": not args.no_push})
        api = TemporaryAPI.start_unless_configured()
        init_tracking()  # MLflow's import and its store's schema check, while the Prefect server starts
        with api.ready():
            results = llm(params)
    except (ConfigError, ValidationError, ValidationFailed, WorkspaceBusy) as e:
        sys.exit(f"llm: {type(e).__name__}: {e}")
    for r in results:
        print(f"{r['stage']:>10}: {'skipped (up to date)' if r['skipped'] else 'ran'} in {r['seconds']:.1f}s")


if __name__ == "__main__":
    main()
