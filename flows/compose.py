"""The Smart Compose pipeline (book chapter 2): compose_data → compose_tokenizer → compose_pretrain →
compose_finetune → compose_eval. The served model folder with its tuned threshold is
data/compose_eval/model (serve/compose.py: POST /v1/compose).

    python -m flows.compose [stage.key=value ...] [--no-push]      # or: forgeline run compose
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from forgeline.config import pipeline_params
from forgeline.pipelines import flow_main
from forgeline.workspace import pipeline_run, push
from tasks.compose_data import ComposeDataConfig, compose_data_task
from tasks.compose_eval import ComposeEvalConfig, compose_eval_task
from tasks.compose_finetune import ComposeFinetuneConfig, compose_finetune_task
from tasks.pretrain import PretrainConfig, pretrain_task
from tasks.tokenizer import TokenizerConfig, tokenizer_task

STAGES = {"compose_data": ComposeDataConfig, "compose_tokenizer": TokenizerConfig, "compose_pretrain": PretrainConfig,
          "compose_finetune": ComposeFinetuneConfig, "compose_eval": ComposeEvalConfig}
ComposeParams = pipeline_params("ComposeParams", STAGES)


@flow(name="compose", log_prints=True)
def compose(params: ComposeParams = ComposeParams()) -> list[dict]:
    with pipeline_run("compose", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            compose_data_task(run),
            tokenizer_task(run, "compose_tokenizer"),
            pretrain_task(run, "compose_pretrain"),
            compose_finetune_task(run),
            compose_eval_task(run),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("compose", compose, ComposeParams, argv)


if __name__ == "__main__":
    main()
