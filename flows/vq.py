"""The VQ-VAE image generation pipeline (book chapter 8): img_data → img_validate → img_eval_net →
vq_train → vq_upsample → vq_prior → vq_eval.

The captioning pipeline's image stages (DVC-cached: a stage whose inputs did not change is skipped)
give the images, the gate and the evaluation network; vq_train learns the tokenizer (VQ-VAE with
codebook, commitment, perceptual and patch-adversarial losses, dead-code restarts), vq_prior the
project's GPT over its tokens in raster order, vq_upsample a 2x super-resolution network, vq_eval samples with temperature and top-p, decodes
them and scores FID and IS beside the real-vs-real floor.

    python -m flows.vq [stage.key=value ...] [--no-push]     # or: forgeline run vq
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from forgeline.config import pipeline_params
from forgeline.pipelines import flow_main
from forgeline.workspace import pipeline_run, push
from tasks.img_data import ImgDataConfig, img_data_task
from tasks.img_eval_net import ImgEvalNetConfig, img_eval_net_task
from tasks.img_validate import ImgValidateConfig, ValidationFailed, img_validate_task
from tasks.vq_eval import VqEvalConfig, vq_eval_task
from tasks.vq_prior import VqPriorConfig, vq_prior_task
from tasks.vq_train import VqTrainConfig, vq_train_task
from tasks.vq_upsample import VqUpsampleConfig, vq_upsample_task

STAGES = {"img_data": ImgDataConfig, "img_validate": ImgValidateConfig, "img_eval_net": ImgEvalNetConfig,
          "vq_train": VqTrainConfig, "vq_upsample": VqUpsampleConfig,
          "vq_prior": VqPriorConfig, "vq_eval": VqEvalConfig}
VqParams = pipeline_params("VqParams", STAGES)


@flow(name="vq", log_prints=True)
def vq(params: VqParams = VqParams()) -> list[dict]:
    with pipeline_run("vq", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            img_data_task(run),
            img_validate_task(run),
            img_eval_net_task(run),
            vq_train_task(run),
            vq_upsample_task(run),
            vq_prior_task(run),
            vq_eval_task(run),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("vq", vq, VqParams, argv, failures=(ValidationFailed,))


if __name__ == "__main__":
    main()
