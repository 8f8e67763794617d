"""The RAG pipeline (ChatPDF, book chapter 6): rag_ingest → rag_validate → rag_chunk → rag_embed →
rag_index → rag_eval. The first three are the generic ingest (sandboxed PDF parsing, OCR of scans),
validate and chunk modules with the RAG pipeline's own configs; the query path is serve/rag.py.

    python -m flows.rag                                # = forgeline run rag
    python -m flows.rag rag_index.serve=ivf            # override a stage setting for this run only
    python -m flows.rag --plan
"""
from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from forgeline.config import pipeline_params
from forgeline.pipelines import flow_main
from forgeline.workspace import pipeline_run, push
from tasks.chunk import ChunkConfig, chunk_task
from tasks.ingest import IngestConfig, ingest_task
from tasks.rag_embed import RagEmbedConfig, rag_embed_task
from tasks.rag_eval import RagEvalConfig, rag_eval_task
from tasks.rag_index import RagIndexConfig, rag_index_task
from tasks.validate import ValidateConfig, ValidationFailed, validate_task

STAGES = {"rag_ingest": IngestConfig, "rag_validate": ValidateConfig, "rag_chunk": ChunkConfig,
          "rag_embed": RagEmbedConfig, "rag_index": RagIndexConfig, "rag_eval": RagEvalConfig}
RagParams = pipeline_params("RagParams", STAGES)


@flow(name="rag", log_prints=True)
def rag(params: RagParams = RagParams()) -> list[dict]:
    with pipeline_run("rag", STAGES, params.overrides(), params.wait_s, str(flow_run.id or "")) as run:
        results = [
            ingest_task(run, "rag_ingest"),
            validate_task(run, "rag_validate"),
            chunk_task(run, "rag_chunk"),
            rag_embed_task(run),
            rag_index_task(run),
            rag_eval_task(run),
        ]
        if params.push:
            push()
    return results


def main(argv: list[str] | None = None) -> None:
    flow_main("rag", rag, RagParams, argv, failures=(ValidationFailed,))


if __name__ == "__main__":
    main()
