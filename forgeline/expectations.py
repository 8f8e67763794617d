"""One Great Expectations 1.x run: a suite on a DataFrame, with Data Docs, and its failures in plain terms.

    from forgeline.expectations import run_suite
    success, evaluated, failures = run_suite(df, suite, out_dir="data/img_validate", name="images")

Ephemeral context (nothing written outside `out_dir`); Data Docs under `<out_dir>/data_docs/`.
Each failure is {expectation, column (or "A/B" for a column pair), unexpected_count, partial_unexpected_list}.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def describe_failures(result) -> list[dict]:
    """One entry per failed expectation: its type, column(s), unexpected count and a few values."""
    failures = []
    for r in result.results:
        if r.success:
            continue
        kwargs = r.expectation_config.kwargs
        res = r.result or {}
        failures.append({"expectation": r.expectation_config.type,
                         "column": kwargs.get("column") or "/".join(filter(None, (kwargs.get("column_A"), kwargs.get("column_B")))),
                         "unexpected_count": res.get("unexpected_count", res.get("observed_value")),
                         "partial_unexpected_list": [str(v)[:80] for v in res.get("partial_unexpected_list", [])[:5]]})
    return failures


def run_suite(df: pd.DataFrame, suite, out_dir: str | Path, name: str) -> tuple[bool, int, list[dict]]:
    """Validate `df` against `suite` (a gx.ExpectationSuite); return (success, expectations evaluated, failures)."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site("forgeline", {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str((Path(out_dir) / "data_docs").resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    batch = context.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["forgeline"])]))
    run = checkpoint.run(batch_parameters={"dataframe": df})
    (result,) = run.run_results.values()
    return bool(run.success), len(result.results), describe_failures(result)


class GateClosed(RuntimeError):
    """A stage's input has no passed validation verdict (missing, failed, or about other data)."""


def check_gate(validation: str | Path, data: str | Path, sha_key: str) -> None:
    """Raise GateClosed unless the validate stage's result.json at `validation` passed on these very
    bytes of `data` (its `sha_key` field holds their sha256)."""
    import hashlib
    import json

    path = Path(validation)
    if not path.is_file():
        raise GateClosed(f"{path}: no validation report; run the validate stage first")
    report = json.loads(path.read_text())
    with open(data, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    if not report.get("success"):
        raise GateClosed(f"{path}: {data} failed validation ({report.get('failed_expectations')} expectations)")
    if report.get(sha_key) != sha:
        raise GateClosed(f"{path} is about other data than {data}; rerun the validate stage")
