"""The LLM pipeline, one Prefect task per DVC stage: ingest → validate → chunk → tokenizer → pretrain → evaluate,
then alignment: chat_data → sft → reward → rlhf (PPO or DPO, configs/rlhf.yaml), and the service's safety
guard (safety). The aligned model is registered in MLflow (forgeline-llm@candidate), the deploy gate weighs it
against @champion (configs/deploy.yaml) and the run's report card is written.

DVC decides what is stale; each stage is an MLflow child run under one parent run per pipeline run.

    python -m flows.llm                          # run on the embedded defaults
    python -m flows.llm chunk.chunk_size=800     # override a stage setting for this run only
    python -m flows.llm --wait-s 600 --no-push
    python -m flows.llm --plan [stage.key=value ...]   # which stages would rerun and why, time and memory; runs nothing
"""
from __future__ import annotations

import sys

from forgeline.prefect_api import TemporaryAPI

if __name__ == "__main__" and not {"--plan", "-h", "--help"} & set(sys.argv[1:]):
    # the temporary Prefect server (~4 s of CPU to start) starts before the stage modules below
    # import (torch, pandas: ~2.5 s), not after them: flow_main gets this one back
    TemporaryAPI.start_unless_configured()

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from forgeline.config import pipeline_params
from forgeline.pipelines import flow_main
from forgeline.registry import register
from forgeline.workspace import pipeline_run, push
from tasks.chat_data import ChatDataConfig, chat_data_task
from tasks.chunk import ChunkConfig, chunk_task
from tasks.deploy import DeployConfig, deploy_task
from tasks.evaluate import EvaluateConfig, evaluate_task
from tasks.ingest import IngestConfig, ingest_task
from tasks.pretrain import PretrainConfig, pretrain_task
from tasks.report import report_task
from tasks.reward import RewardConfig, reward_task
from tasks.rlhf import RLHFConfig, rlhf_task
from tasks.safety import SafetyConfig, safety_task
from tasks.sft import SFTConfig, sft_task
from tasks.tokenizer import TokenizerConfig, tokenizer_task
from tasks.validate import ValidateConfig, ValidationFailed, validate_task

STAGES = {"ingest": IngestConfig, "validate": ValidateConfig, "chunk": ChunkConfig,
          "tokenizer": TokenizerConfig, "pretrain": PretrainConfig, "evaluate": EvaluateConfig,
          "chat_data": ChatDataConfig, "sft": SFTConfig, "reward": RewardConfig, "rlhf": RLHFConfig,
          "safety": SafetyConfig, "deploy": DeployConfig}
# the flow's parameters: per stage its optional overrides (a form in the Prefect UI), wait_s, push
LLMParams = pipeline_params("LLMParams", STAGES)


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
            safety_task(run),
        ]
        model = register_task(run)
        print(f"model: {model['uri']} ({'new version' if model['created'] else 'unchanged'}) from run {model['run_id']}")
        results.append(deploy_task(run))  # after registering: the gate moves @champion or @challenger
        report_task(run)
        if params.push:
            push_task()
    create_table_artifact(key="llm-stages", description="stages of this pipeline run", table=[
        {"stage": r["stage"], "skipped": r["skipped"], "seconds": r["seconds"], "mlflow_run": r["run_id"]}
        for r in results])
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("llm", llm, LLMParams, argv, failures=(ValidationFailed,))


if __name__ == "__main__":
    main()
