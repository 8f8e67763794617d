"""The translation pipeline (book chapter 3): mt_data → mt_validate → mt_tokenizer → mt_pretrain → mt_train → mt_eval.

Parallel text from the shipped gettext catalogs and Debian books, filtered and split by document;
a Great Expectations gate; one BPE shared by both languages (the generic tokenizer stage with
configs/mt_tokenizer.yaml); an encoder-decoder transformer pretrained by masked language modelling
on monolingual text, fine-tuned on en->fr and en->es pairs, scored by BLEU, chrF, ROUGE-L and METEOR
with greedy and beam search. Served by serve/translate.py (POST /v1/translate).

    python -m flows.translate [stage.key=value ...] [--no-push]     # or: forgeline run translate
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from forgeline.config import pipeline_params
from forgeline.pipelines import flow_main
from forgeline.workspace import pipeline_run, push
from tasks.mt_data import MTDataConfig, mt_data_task
from tasks.mt_eval import MTEvalConfig, mt_eval_task
from tasks.mt_pretrain import MTPretrainConfig, mt_pretrain_task
from tasks.mt_train import MTTrainConfig, mt_train_task
from tasks.mt_validate import MTValidateConfig, ValidationFailed, mt_validate_task
from tasks.tokenizer import TokenizerConfig, tokenizer_task

STAGES = {"mt_data": MTDataConfig, "mt_validate": MTValidateConfig, "mt_tokenizer": TokenizerConfig,
          "mt_pretrain": MTPretrainConfig, "mt_train": MTTrainConfig, "mt_eval": MTEvalConfig}
TranslateParams = pipeline_params("TranslateParams", STAGES)


@flow(name="translate", log_prints=True)
def translate(params: TranslateParams = TranslateParams()) -> list[dict]:
    with pipeline_run("translate", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            mt_data_task(run),
            mt_validate_task(run),
            tokenizer_task(run, "mt_tokenizer"),
            mt_pretrain_task(run),
            mt_train_task(run),
            mt_eval_task(run),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("translate", translate, TranslateParams, argv, failures=(ValidationFailed,))


if __name__ == "__main__":
    main()
