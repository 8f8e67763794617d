"""tasks/report.py: a report card from fake stage outputs and MLflow child runs, readable on its own."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from forgeline.config import load_config
from tasks.report import ReportConfig, build_report, prefect_markdown, publish

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def data(tmp_path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    write(d / "ingest" / "summary.json", {"files": 12, "documents": 10, "quarantined": 2, "pages": 40,
                                          "ocr_pages": 3, "ocr_confidence": 91.5, "chars": 123456})
    pq.write_table(pa.table({"source": ["a.pdf", "b.png"], "sha256": ["x", "y"], "reason": ["encrypted", "corrupt"],
                             "detail": ["", ""]}), d / "ingest" / "quarantine.parquet")
    write(d / "validate" / "result.json", {"success": True, "evaluated_expectations": 6, "failed_expectations": 0})
    write(d / "chunk" / "summary.json", {"n_chunks": 321, "train_chunks": 300, "val_chunks": 21, "train_docs": 9,
                                         "val_docs": 1, "chunk_chars_mean": 812.5, "splitter": "recursive"})
    write(d / "tokenizer" / "meta.json", {"vocab_size": 512, "n_tokens": {"train": 40000, "val": 4000},
                                          "n_bytes": {"train": 120000, "val": 12000}, "bytes_per_token": 3.0,
                                          "n_docs": {"train": 9, "val": 1},
                                          "special_tokens": {"<|pad|>": 0, "<|endoftext|>": 1}})
    write(d / "pretrain" / "history.json", {"train": [[1, 6.2], [2, 5.9], [3, 5.5]], "val": [[0, 6.3], [3, 5.7]]})
    write(d / "pretrain" / "summary.json", {"steps": 3, "final_train_loss": 5.5, "val_loss": 5.7, "params": 98765,
                                            "train_seconds": 12.5, "processes": 1})
    write(d / "evaluate" / "metrics.json", {"val_loss": 5.75, "val_perplexity": 314.19, "val_bits_per_byte": 2.77,
                                            "scored_tokens": 3968, "scored_bytes": 11904, "eval_seconds": 1.0})
    write(d / "evaluate" / "samples.json", [{"prompt": "It was a <dark> night", "continuation": " and stormy",
                                             "decoding": {"temperature": 0.8, "top_k": 40}}])
    # an SFT stage in the newer format: metrics.json instead of summary.json, replies with answers
    write(d / "sft" / "history.json", {"train": [[1, 3.0], [2, 2.5]], "val": [[2, 2.7]], "base": {}})
    write(d / "sft" / "metrics.json", {"steps": 2, "val_loss": 2.7, "task_accuracy": 0.25, "base_task_accuracy": 0.0,
                                       "train_seconds": 3.0})
    write(d / "sft" / "samples.json", [{"task": "add", "prompt": "What is 2 + 3?", "answer": "5", "reply": "5",
                                        "correct": True}])
    # a reward model: its held-out series is an accuracy, not a loss
    write(d / "reward" / "history.json", {"train": [[1, 0.9, 0.5], [2, 0.7, 0.6]], "val": [[2, 0.66]]})
    write(d / "reward" / "metrics.json", {"steps": 2, "val_loss": 0.8, "pairwise_accuracy": 0.66})
    return d


@pytest.fixture
def mlflow_runs(tmp_path, monkeypatch):
    """A parent run with three stage child runs, tagged as forgeline.workspace.run_stage tags them."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("report-test", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="llm").info.run_id
    for stage, skipped, secs in (("ingest", True, 0.8), ("chunk", False, 2.5), ("pretrain", False, 42.0)):
        child = client.create_run(exp, run_name=stage, tags={"mlflow.parentRunId": parent, "forgeline.stage": stage})
        tags = [RunTag("dvc.skipped", str(skipped).lower())]
        if skipped:
            tags.append(RunTag("forgeline.reused_run_id", "abc123"))
        client.log_batch(child.info.run_id, metrics=[Metric("stage_seconds", secs, 0, 0)], tags=tags)
        client.set_terminated(child.info.run_id)
    return client, parent


def test_report_card_from_stage_outputs_and_mlflow(tmp_path, data, mlflow_runs):
    client, parent = mlflow_runs
    cfg = ReportConfig(data_dir=str(data), out_dir=str(tmp_path / "report"), parent_run_id=parent, flow_run_id="f-1")
    md_path = build_report(cfg)
    md = md_path.read_text()
    # data, tokenizer, training, evaluation, samples, timings: the numbers a reader needs
    for text in ("| 12 | 10 | 2 | 40 | 3 | 91.5 | 123,456 |", "| encrypted | 1 |", "Validation passed",
                 "| 321 | 300 | 21 |", "| 512 | 40,000 | 4,000 |", "`<|endoftext|>`=1",
                 "| pretrain | 3 | 98,765 | 5.5 | 5.7 | 12.5 |", "| SFT | 2 |", "ln 512 = 6.24",
                 "| metric | base (pretrain) | SFT |", "| perplexity | 314.2 | — |",
                 "| task accuracy (exact match) | — | 0.25 |", "Not evaluated in this workspace", "RLHF",
                 "temperature=0.8, top_k=40", "&lt;dark&gt;", "**expected:** 5 — correct",
                 "| ingest | skipped (up to date) | 0.8 |", "`abc123`", "| pretrain | ran | 42 |",
                 parent, "f-1"):
        assert text in md, text
    assert md.index("## 1. Data") < md.index("## 4. Evaluation") < md.index("## 6. Stage timings")
    assert "(loss_curves.png)" in md and "(stage_timings.png)" in md

    # the HTML stands alone: every image inlined, tables rendered
    page = (md_path.parent / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<table>" in page and "<h2>" in page

    from PIL import Image

    for png in ("loss_curves.png", "stage_timings.png"):
        with Image.open(md_path.parent / png) as im:
            assert im.format == "PNG" and im.size[0] > 400

    publish(cfg, md_path)
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/loss_curves.png"} <= logged


def test_report_without_outputs_or_pipeline_run_says_so(tmp_path):
    md = build_report(ReportConfig(data_dir=str(tmp_path / "empty"), out_dir=str(tmp_path / "r"))).read_text()
    for text in ("No ingest output", "No tokenizer output", "No model has been trained", "No sample generations",
                 "no stage timings"):
        assert text in md
    assert not list((tmp_path / "r").glob("*.png"))


def test_prefect_markdown_points_plots_at_mlflow():
    md = "text\n\n![Seconds per stage](stage_timings.png)\n"
    out = prefect_markdown(md, "run42")
    assert "![" not in out and "stage_timings.png" in out and "run42" in out


def test_config_file_loads():
    cfg = load_config(ReportConfig, "report", [])
    assert cfg.out_dir == "data/report" and list(cfg.evaluations)[0] == "base (pretrain)"
    assert (ROOT / "configs" / "report.yaml").exists()


def test_loss_curves_redrawn_only_when_a_history_changes(tmp_path, data):
    from tasks.report import INPUTS_KEY, _png_inputs_key

    cfg = ReportConfig(data_dir=str(data), out_dir=str(tmp_path / "report"))
    png = tmp_path / "report" / "loss_curves.png"
    build_report(cfg)
    first, key = png.stat().st_mtime_ns, _png_inputs_key(png)
    assert key and len(key) == 64
    build_report(cfg)  # nothing changed (a no-op rerun): the same file, not redrawn
    assert png.stat().st_mtime_ns == first and _png_inputs_key(png) == key
    write(data / "sft" / "history.json", {"train": [[1, 3.0], [2, 2.4]], "val": [[2, 2.7]], "base": {}})
    build_report(cfg)
    assert _png_inputs_key(png) != key and png.stat().st_mtime_ns != first
    from PIL import Image
    with Image.open(png) as img:  # a real plot, with the key a later run compares against
        assert img.size[0] > 100 and img.info[INPUTS_KEY] == _png_inputs_key(png)
