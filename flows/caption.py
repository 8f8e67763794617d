"""The image captioning pipeline (book chapter 5): img_data → img_validate → img_eval_net → cap_train → cap_eval.

Scenes whose captions are true by construction (held-out (shape, colour) pairs never seen in
training) and Fashion-MNIST read from its Debian package; a Great Expectations gate on the
manifest and its pixels; the evaluation network whose features and probabilities the image
metrics (FID, IS) look through; caption models with a CNN or a ViT encoder (1D/2D, learned or
sine-cosine positions) and a transformer decoder, scored by CIDEr-D, BLEU-4, METEOR and attribute
accuracy with greedy and beam search. Served by serve/caption.py (POST /v1/caption).

    python -m flows.caption [stage.key=value ...] [--no-push]     # or: forgeline run caption
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from forgeline.config import pipeline_params
from forgeline.pipelines import flow_main
from forgeline.workspace import pipeline_run, push
from tasks.cap_eval import CapEvalConfig, cap_eval_task
from tasks.cap_train import CapTrainConfig, cap_train_task
from tasks.img_data import ImgDataConfig, img_data_task
from tasks.img_eval_net import ImgEvalNetConfig, img_eval_net_task
from tasks.img_validate import ImgValidateConfig, ValidationFailed, img_validate_task

STAGES = {"img_data": ImgDataConfig, "img_validate": ImgValidateConfig, "img_eval_net": ImgEvalNetConfig,
          "cap_train": CapTrainConfig, "cap_eval": CapEvalConfig}
CaptionParams = pipeline_params("CaptionParams", STAGES)


@flow(name="caption", log_prints=True)
def caption(params: CaptionParams = CaptionParams()) -> list[dict]:
    with pipeline_run("caption", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            img_data_task(run),
            img_validate_task(run),
            img_eval_net_task(run),
            cap_train_task(run),
            cap_eval_task(run),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("caption", caption, CaptionParams, argv, failures=(ValidationFailed,))


if __name__ == "__main__":
    main()
