"""The face GAN pipeline (book chapter 7): gan_data → gan_eval_net → gan_train → gan_eval, then on
Fashion-MNIST img_data → img_validate → img_eval_net → gan_fashion_train → gan_fashion_eval.

Procedurally rendered faces with labelled attributes; an attribute classifier (models/eval_net.py)
whose features and probabilities FID, IS and the mode-collapse indicator look through (and its check
on skimage's real LFW faces); DCGAN (models/gan.py) trained with the minimax, the non-saturating and
the WGAN-GP loss on the same budget; FID beside the real-vs-real floor, IS, class coverage, FID and
diversity against the truncation threshold, sample grids. Then the same two modules on a real data
set, Fashion-MNIST: the captioning pipeline's image stages (DVC-cached: skipped when their inputs did
not change) give the images and the evaluation network, gan_fashion_train and gan_fashion_eval run
tasks/gan_train.py and tasks/gan_eval.py with `domain: fashion` (configs/gan_fashion_*.yaml).

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
from tasks.img_data import ImgDataConfig, img_data_task
from tasks.img_eval_net import ImgEvalNetConfig, img_eval_net_task
from tasks.img_validate import ImgValidateConfig, ValidationFailed, img_validate_task

STAGES = {"gan_data": GanDataConfig, "gan_eval_net": GanEvalNetConfig, "gan_train": GanTrainConfig,
          "gan_eval": GanEvalConfig, "img_data": ImgDataConfig, "img_validate": ImgValidateConfig,
          "img_eval_net": ImgEvalNetConfig, "gan_fashion_train": GanTrainConfig, "gan_fashion_eval": GanEvalConfig}
GanParams = pipeline_params("GanParams", STAGES)


@flow(name="gan", log_prints=True)
def gan(params: GanParams = GanParams()) -> list[dict]:
    with pipeline_run("gan", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            gan_data_task(run),
            gan_eval_net_task(run),
            gan_train_task(run),
            gan_eval_task(run),
            img_data_task(run),
            img_validate_task(run),
            img_eval_net_task(run),
            gan_train_task(run, "gan_fashion_train"),
            gan_eval_task(run, "gan_fashion_eval"),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("gan", gan, GanParams, argv, failures=(ValidationFailed,))


if __name__ == "__main__":
    main()
