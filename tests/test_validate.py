"""The Great Expectations gate: passes a good documents table, names every failure of a bad one."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.validate import ValidateConfig, ValidationFailed, validate

GOOD_TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. "


def documents(**columns) -> pd.DataFrame:
    base = {
        "doc_id": ["a", "b", "c"],
        "sha256": ["1" * 64, "2" * 64, "3" * 64],
        "text": [GOOD_TEXT * 3, GOOD_TEXT * 2, GOOD_TEXT],
        "ocr_confidence": [np.nan, 91.5, np.nan],  # only OCR'd documents carry a confidence
        "printable_ratio": [1.0, 0.999, 1.0],
    }
    base.update(columns)
    return pd.DataFrame(base)


def run(tmp_path, df, **cfg):
    df.to_parquet(tmp_path / "documents.parquet")
    config = ValidateConfig(documents=str(tmp_path / "documents.parquet"), out_dir=str(tmp_path / "out"), **cfg)
    return validate(config), tmp_path / "out"


def test_good_table_passes_and_writes_data_docs(tmp_path):
    summary, out = run(tmp_path, documents())
    assert summary["success"] and summary["failed_expectations"] == 0
    assert summary["evaluated_expectations"] == 6
    assert (out / "data_docs" / "index.html").exists()
    assert json.loads((out / "result.json").read_text())["success"] is True


def test_bad_table_names_each_failed_expectation_with_its_count(tmp_path):
    bad = documents(
        sha256=["1" * 64, "1" * 64, "3" * 64],          # duplicate content: 2 unexpected
        text=[GOOD_TEXT, "too short", None],             # 1 too short, 1 null
        ocr_confidence=[np.nan, 12.0, np.nan],           # OCR too unsure: 1
        printable_ratio=[1.0, 1.0, 0.4],                 # binary-ish text: 1
    )
    with pytest.raises(ValidationFailed) as err:
        run(tmp_path, bad)
    message = str(err.value)
    assert "5 of 6 expectations failed" in message
    assert "expect_column_values_to_be_unique(sha256): 2 unexpected" in message
    assert "expect_column_values_to_not_be_null(text): 1 unexpected" in message
    assert "expect_column_value_lengths_to_be_between(text): 1 unexpected" in message
    assert "expect_column_values_to_be_between(ocr_confidence): 1 unexpected" in message
    assert "expect_column_values_to_be_between(printable_ratio): 1 unexpected" in message
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["success"] is False and result["failed_expectations"] == 5
    assert (tmp_path / "out" / "data_docs" / "index.html").exists()


def test_thresholds_come_from_config(tmp_path):
    df = documents(ocr_confidence=[np.nan, 70.0, np.nan])
    run(tmp_path, df, min_ocr_confidence=60.0)
    with pytest.raises(ValidationFailed, match="ocr_confidence"):
        run(tmp_path, df, min_ocr_confidence=80.0)


def test_empty_table_fails(tmp_path):
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between"):
        run(tmp_path, documents().iloc[:0])
