"""Validate: the Great Expectations gate on the documents table, before anything trains on it.

Runs a GX 1.x suite (non-null text, length bounds, unique sha256, OCR confidence above a
threshold, share of printable characters) on data/ingest/documents.parquet. Writes the result
and the Data Docs HTML to data/validate/; on failure exits non-zero with a message naming each
failed expectation and its unexpected count, so no later stage runs.

    python -m tasks.validate [key=value ...]
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from prefect import task

from forgeline.config import ConfigError, config_dict, load_config, stage_config
from forgeline.tracking import stage_run
from forgeline.workspace import run_stage


@dataclass
class ValidateConfig:
    documents: str = "data/ingest/documents.parquet"
    out_dir: str = "data/validate"
    min_chars: int = 50                   # shortest acceptable document text
    max_chars: int = 20_000_000           # longest acceptable document text
    min_ocr_confidence: float = 60.0      # mean tesseract word confidence, 0-100, OCR'd docs only
    min_printable_ratio: float = 0.98     # share of printable or whitespace characters
    min_documents: int = 1                # an empty table is a failure, not a pass

    def check(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ConfigError(f"validate: need 0 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        if not 0 <= self.min_ocr_confidence <= 100:
            raise ConfigError("validate: min_ocr_confidence is a percentage (0-100)")
        if not 0 <= self.min_printable_ratio <= 1:
            raise ConfigError("validate: min_printable_ratio is a share (0-1)")


class ValidationFailed(RuntimeError):
    """The data did not meet the suite. Not transient: never retried."""


def build_suite(cfg: ValidateConfig):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    return gx.ExpectationSuite(name="documents", expectations=[
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_documents),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_chars,
                                                max_value=cfg.max_chars),
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        # null (no OCR'd page) rows are not evaluated by column-map expectations
        gxe.ExpectColumnValuesToBeBetween(column="ocr_confidence", min_value=cfg.min_ocr_confidence,
                                          max_value=100.0),
        gxe.ExpectColumnValuesToBeBetween(column="printable_ratio",
                                          min_value=cfg.min_printable_ratio, max_value=1.0),
    ])


def describe_failures(result) -> list[dict]:
    """One entry per failed expectation: its type, column, and unexpected count."""
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        res = r.result or {}
        failures.append({
            "expectation": cfg.type,
            "column": cfg.kwargs.get("column"),
            "unexpected_count": res.get("unexpected_count", res.get("observed_value")),
            "partial_unexpected_list": [str(v)[:80] for v in res.get("partial_unexpected_list", [])[:5]],
        })
    return failures


def validate(cfg: ValidateConfig) -> dict:
    """Run the suite; write result.json and Data Docs; raise ValidationFailed when it fails."""
    import great_expectations as gx

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.read_parquet(cfg.documents)

    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site("forgeline", {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str((out / "data_docs").resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    batch = (context.data_sources.add_pandas("ingest")
             .add_dataframe_asset("documents")
             .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(build_suite(cfg))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="documents", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="documents", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["forgeline"])]))
    run = checkpoint.run(batch_parameters={"dataframe": df})
    (result,) = run.run_results.values()

    failures = describe_failures(result)
    summary = {
        "success": bool(run.success),
        "documents": int(len(df)),
        # which table this verdict is about: chunk refuses a report made on other documents
        "documents_sha256": file_sha256(cfg.documents),
        "evaluated_expectations": len(result.results),
        "failed_expectations": len(failures),
        "failures": failures,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    if failures:
        raise ValidationFailed(failure_message(summary, cfg.documents))
    return summary


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def failure_message(summary: dict, documents: str) -> str:
    lines = [f"  - {f['expectation']}({f['column'] or 'table'}): {f['unexpected_count']} unexpected"
             for f in summary["failures"]]
    return (f"{summary['failed_expectations']} of {summary['evaluated_expectations']} expectations "
            f"failed on {documents}:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    import mlflow

    stage, cfg = stage_config(ValidateConfig, "validate", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            summary = validate(cfg)
        except ValidationFailed as e:
            mlflow.set_tag("validate.failed", "true")
            _log_outputs(cfg, mlflow)
            print(f"validate: FAILED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({k: summary[k] for k in ("documents", "evaluated_expectations",
                                                    "failed_expectations")})
        _log_outputs(cfg, mlflow)
        print(f"validate: {summary['evaluated_expectations']} expectations passed on "
              f"{summary['documents']} documents")


def _log_outputs(cfg: ValidateConfig, mlflow) -> None:
    out = Path(cfg.out_dir)
    mlflow.log_artifact(str(out / "result.json"))
    if (out / "data_docs").exists():
        mlflow.log_artifacts(str(out / "data_docs"), artifact_path="data_docs")


@task(name="validate", task_run_name="{stage}", retries=0)  # a data failure is not transient: never retried
def validate_task(run: dict[str, str], stage: str = "validate") -> dict:
    from dvc.exceptions import ReproductionError

    try:
        return run_stage(stage, **run)
    except ReproductionError as e:
        cfg = load_config(ValidateConfig, stage)
        report = Path(cfg.out_dir) / "result.json"  # fresh: DVC removed the old outs first
        if report.exists() and not json.loads(report.read_text())["success"]:
            raise ValidationFailed(failure_message(json.loads(report.read_text()), cfg.documents)) from e
        raise


if __name__ == "__main__":
    main()
