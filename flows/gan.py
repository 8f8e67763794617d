"""The face GAN pipeline (book chapter 7): gan_data → gan_eval_net → gan_train → gan_eval.

Procedurally rendered faces with labelled attributes; an attribute classifier (models/eval_net.py)
whose features and probabilities FID, IS and the mode-collapse indicator look through; DCGAN
(models/gan.py) trained with the minimax, the non-saturating and the WGAN-GP loss on the same
budget; FID beside the real-vs-real floor, IS, class coverage, FID and diversity against the
truncation threshold, sample grids.

    python -m flows.gan [stage.key=value ...] [--no-push]     # or: forgeline run gan
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from forgeline.config import pipeline_params
from forgeline.pipelines import flow_main
from forgeline.workspace import pipeline_run, push
from tasks.gan_data import GanDataConfig, gan_data_task
from tasks.gan_eval import GanEvalConfig, gan_eval_task
from tasks.gan_eval_net import GanEvalNetConfig, gan_eval_net_task
from tasks.gan_train import GanTrainConfig, gan_train_task

STAGES = {"gan_data": GanDataConfig, "gan_eval_net": GanEvalNetConfig, "gan_train": GanTrainConfig,
          "gan_eval": GanEvalConfig}
GanParams = pipeline_params("GanParams", STAGES)


@flow(name="gan", log_prints=True)
def gan(params: GanParams = GanParams()) -> list[dict]:
    with pipeline_run("gan", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            gan_data_task(run),
            gan_eval_net_task(run),
            gan_train_task(run),
            gan_eval_task(run),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("gan", gan, GanParams, argv)


if __name__ == "__main__":
    main()
