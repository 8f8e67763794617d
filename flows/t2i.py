"""The text-to-image pipeline (book chapter 9): img_data → img_validate → img_eval_net → t2i_train → t2i_eval.

The captioning pipeline's image stages (DVC-cached: a stage whose inputs did not change is skipped)
give the captioned scenes, the gate and the evaluation network; t2i_train learns a text-conditioned
diffusion model (a transformer text encoder, a U-Net with cross-attention, DDPM loss, captions
dropped for classifier-free guidance), t2i_eval generates from held-out prompts (unseen (shape,
colour) pairs) with DDIM and DDPM at several guidance scales and step counts and scores attribute
accuracy, FID and IS through the evaluation network, with time per image. Served by
serve/images.py (POST /v1/images/generations, model t2i).

    python -m flows.t2i [stage.key=value ...] [--no-push]     # or: forgeline run t2i
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
from tasks.t2i_dalle import T2iDalleConfig, t2i_dalle_task
from tasks.t2i_eval import T2iEvalConfig, t2i_eval_task
from tasks.t2i_train import T2iTrainConfig, t2i_train_task
from tasks.vq_train import VqTrainConfig, vq_train_task

STAGES = {"img_data": ImgDataConfig, "img_validate": ImgValidateConfig, "img_eval_net": ImgEvalNetConfig,
          "t2i_vq": VqTrainConfig, "t2i_dalle": T2iDalleConfig,   # the DALL-E form: scene tokenizer, caption-prefix GPT
          "t2i_train": T2iTrainConfig, "t2i_eval": T2iEvalConfig}
T2iParams = pipeline_params("T2iParams", STAGES)


@flow(name="t2i", log_prints=True)
def t2i(params: T2iParams = T2iParams()) -> list[dict]:
    with pipeline_run("t2i", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            img_data_task(run),
            img_validate_task(run),
            img_eval_net_task(run),
            vq_train_task(run, "t2i_vq"),       # the DALL-E form: the scene tokenizer (tasks/vq_train.py)
            t2i_dalle_task(run),                # caption tokens + image tokens in one GPT -> samples.npz
            t2i_train_task(run),
            t2i_eval_task(run),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("t2i", t2i, T2iParams, argv, failures=(ValidationFailed,))


if __name__ == "__main__":
    main()
