"""Report card: one readable page per pipeline run, from whatever stage outputs the workspace holds.

Not a DVC stage: it runs at the end of every pipeline run, skipped stages included, and reads
data/<stage>/ outputs plus the stage timings of the run's MLflow child runs. It writes
data/report/report.md, its PNG plots and a self-contained report.html (plots inlined); the Prefect
task also logs them to the parent MLflow run (artifacts under report/) and publishes the markdown
as a Prefect artifact. Sections whose stage has not run (or does not exist yet: SFT, RLHF) say so.

    python -m tasks.report [parent_run_id=<mlflow run id>] [key=value ...]
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task

from forgeline.config import ConfigError, load_config


@dataclass
class ReportConfig:
    data_dir: str = "data"
    out_dir: str = "data/report"
    title: str = "Forgeline LLM pipeline report"
    parent_run_id: str = ""   # MLflow parent run of the pipeline run: stage timings; "" = none
    flow_run_id: str = ""     # Prefect flow run, for the header
    # model stages in pipeline order: label -> folder under data_dir with history.json + summary.json
    training: dict[str, str] = field(default_factory=lambda: {
        "pretrain": "pretrain", "SFT": "sft", "reward model": "reward", "RLHF": "rlhf"})
    # evaluated models in pipeline order: label -> folder under data_dir with metrics.json (+ samples.json)
    evaluations: dict[str, str] = field(default_factory=lambda: {
        "base (pretrain)": "evaluate", "SFT": "sft", "RLHF": "rlhf"})
    max_samples: int = 3      # sample generations shown per evaluated model
    max_chars: int = 400      # of each prompt / continuation shown

    def check(self) -> None:
        if self.max_samples < 0 or self.max_chars < 20:
            raise ConfigError("report: need max_samples >= 0 and max_chars >= 20")


# ----------------------------------------------------------------------------- reading stage outputs


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def stage_timings(parent_run_id: str) -> list[dict[str, Any]]:
    """The pipeline run's stages from its MLflow child runs, in start order:
    [{'stage', 'status', 'skipped', 'reused_run_id', 'seconds', 'run_id'}]."""
    import mlflow

    from forgeline.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"])
    return [{"stage": r.data.tags.get("forgeline.stage", r.info.run_name), "status": r.info.status,
             "skipped": r.data.tags.get("dvc.skipped") == "true",
             "reused_run_id": r.data.tags.get("forgeline.reused_run_id", ""),
             "seconds": r.data.metrics.get("stage_seconds"), "run_id": r.info.run_id} for r in children]


def _quarantine_reasons(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    reasons: dict[str, int] = {}
    for reason in pq.read_table(path, columns=["reason"]).column("reason").to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


# ----------------------------------------------------------------------------- plots


def _series(points: list) -> tuple[list, list]:
    """history rows [step, value, ...] or [step, {metric: value}] -> (steps, values); a dict row
    gives its "loss" (else its first number)."""
    xs, ys = [], []
    for row in points:
        v = row[1]
        if isinstance(v, dict):
            v = v.get("loss", next((x for x in v.values() if isinstance(x, (int, float))), None))
        if isinstance(v, (int, float)):
            xs.append(row[0])
            ys.append(v)
    return xs, ys


def _figure(width: float, height: float):
    """A figure drawn by Agg without pyplot: pyplot's import (its backend machinery, ~0.5 s) and its
    global figure registry buy nothing for a PNG written once."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


# PNG text chunk naming the sha256 of what a plot was drawn from (see _plot_losses_once)
INPUTS_KEY = "forgeline.inputs.sha256"


def _png_inputs_key(path: Path) -> str | None:
    """The INPUTS_KEY text chunk of a PNG written by _plot_losses_once, or None."""
    from PIL import Image  # matplotlib's own PNG reader

    try:
        with Image.open(path) as png:
            return png.info.get(INPUTS_KEY)  # text chunks before the image data, not decoded
    except FileNotFoundError:
        return None


def _plot_losses_once(histories: dict[str, tuple[dict, bool]], path: Path) -> bool:
    """Draw the loss curves unless `path` already holds them drawn from the same histories (their
    sha256 is kept in the PNG): a rerun whose training stages were all skipped by DVC redraws nothing.
    Returns whether it drew."""
    import hashlib

    key = hashlib.sha256(json.dumps(histories, sort_keys=True).encode()).hexdigest()
    if _png_inputs_key(path) == key:
        return False
    _plot_losses(histories, path, metadata={INPUTS_KEY: key})
    return True


def _plot_losses(histories: dict[str, tuple[dict, bool]], path: Path, metadata: dict | None = None) -> None:
    """One panel per stage: train loss, and the held-out series (on the loss axis when it is the
    validation loss, else on a second axis: the reward model's and RLHF's held-out accuracy)."""
    n = len(histories)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = _figure(6 * cols, 3.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (label, (hist, val_is_loss)) in zip(axes.flat, histories.items()):
        xs, ys = _series(hist.get("train", []))
        ax.plot(xs, ys, lw=1, label="train loss")
        ax.set(title=label, xlabel="optimizer step", ylabel="loss")
        ax.grid(alpha=0.3)
        vx, vy = _series(hist.get("val", []))
        if vx:
            target = ax if val_is_loss else ax.twinx()
            target.plot(vx, vy, "o-", color="tab:orange", label="validation loss" if val_is_loss else "held-out score")
            if not val_is_loss:
                target.set_ylabel("held-out score")
                target.legend(loc="upper right")
        ax.legend(loc="upper left" if not val_is_loss else "best")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=metadata)


def _plot_timings(rows: list[dict], path: Path) -> None:
    fig = _figure(7, 0.45 * len(rows) + 1.2)
    ax = fig.subplots()
    names = [r["stage"] for r in rows][::-1]
    secs = [r["seconds"] or 0.0 for r in rows][::-1]
    colors = ["#bbbbbb" if r["skipped"] else "#3b75af" for r in rows][::-1]
    ax.barh(names, secs, color=colors)
    for y, s in enumerate(secs):
        ax.text(s, y, f" {s:.1f}s", va="center", fontsize=8)
    ax.set(xlabel="wall-clock seconds (grey: up to date, skipped by DVC)", title="stage timings")
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "—" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


EVAL_NAMES = {  # metrics.json key -> what the report calls it; listed first, in this order
    "val_loss": "val loss (nats/token)", "base_val_loss": "val loss before SFT (same data)",
    "val_perplexity": "perplexity", "val_bits_per_byte": "bits per byte",
    "task_accuracy": "task accuracy (exact match)", "base_task_accuracy": "task accuracy before SFT",
    "policy_task_accuracy": "policy task accuracy", "sft_task_accuracy": "SFT task accuracy (same prompts)",
    "win_rate": "win rate vs SFT", "kl_to_reference": "KL to reference (nats)",
    "scored_tokens": "held-out tokens scored", "train_conversations": "training conversations",
    "dropped_too_long": "conversations dropped (too long)",
}
EVAL_SKIP = {"eval_seconds", "context", "scored_bytes", "train_seconds", "steps"}


def _sections(cfg: ReportConfig, data: Path, plots: dict[str, str], timings: list[dict]) -> list[str]:
    """The report's markdown lines (plots referenced by file name, beside report.md)."""
    lines: list[str] = []

    # ---- data
    ingest = _json(data / "ingest" / "summary.json")
    chunk = _json(data / "chunk" / "summary.json")
    validate = _json(data / "validate" / "result.json")
    lines += ["## 1. Data", ""]
    if ingest:
        lines += _table(["raw files", "documents", "quarantined", "pages", "OCR pages", "OCR confidence",
                         "characters"],
                        [[ingest.get("files"), ingest.get("documents"), ingest.get("quarantined"),
                          ingest.get("pages"), ingest.get("ocr_pages"), ingest.get("ocr_confidence"),
                          ingest.get("chars")]])
        lines += ["OCR pages are scanned PDF pages or images read by tesseract; OCR confidence is its mean "
                  "word confidence (0–100).", ""]
        reasons = _quarantine_reasons(data / "ingest" / "quarantine.parquet")
        if reasons:
            lines += ["Quarantined files (set aside, not in the corpus), by reason:", ""]
            lines += _table(["reason", "files"], sorted(reasons.items()))
    else:
        lines += ["*No ingest output in this workspace.*", ""]
    if validate:
        verdict = "passed" if validate.get("success") else "FAILED"
        lines += [f"Validation {verdict}: {validate.get('evaluated_expectations')} expectations checked, "
                  f"{validate.get('failed_expectations')} failed.", ""]
    if chunk:
        lines += _table(["chunks", "train chunks", "val chunks", "train docs", "val docs", "mean chunk chars",
                         "splitter"],
                        [[chunk.get("n_chunks"), chunk.get("train_chunks"), chunk.get("val_chunks"),
                          chunk.get("train_docs"), chunk.get("val_docs"), chunk.get("chunk_chars_mean"),
                          chunk.get("splitter")]])
        lines += ["Documents are split into train and validation whole, so no validation text is seen in "
                  "training.", ""]

    # ---- tokenizer
    meta = _json(data / "tokenizer" / "meta.json")
    lines += ["## 2. Tokenizer", ""]
    if meta:
        n_tok, n_bytes = meta.get("n_tokens", {}), meta.get("n_bytes", {})
        lines += _table(["vocab size", "train tokens", "val tokens", "train bytes", "bytes per token",
                         "train docs", "val docs"],
                        [[meta.get("vocab_size"), n_tok.get("train"), n_tok.get("val"), n_bytes.get("train"),
                          meta.get("bytes_per_token"), meta.get("n_docs", {}).get("train"),
                          meta.get("n_docs", {}).get("val")]])
        specials = ", ".join(f"`{k}`={v}" for k, v in meta.get("special_tokens", {}).items())
        lines += [f"Byte-level BPE; special tokens: {specials}. More bytes per token means shorter "
                  "sequences for the same text.", ""]
    else:
        lines += ["*No tokenizer output in this workspace.*", ""]

    # ---- training
    lines += ["## 3. Training", ""]
    rows = []
    for label, folder in cfg.training.items():
        s = _json(data / folder / "summary.json") or _json(data / folder / "metrics.json")
        if s:
            rows.append([label, s.get("steps"), s.get("params"), s.get("final_train_loss"), s.get("val_loss"),
                         s.get("train_seconds")])
    if rows:
        lines += _table(["stage", "steps", "parameters", "final train loss", "val loss", "train seconds"], rows)
        vocab = (meta or {}).get("vocab_size")
        uniform = f" (a uniform guess over the {vocab:,} tokens scores ln {vocab} = {math.log(vocab):.2f})" if vocab else ""
        lines += ["Losses are cross-entropy in nats per token, lower is better" + uniform + ". The reward "
                  "model's loss is its pairwise ranking loss.", ""]
    else:
        lines += ["*No model has been trained in this workspace.*", ""]
    if "losses" in plots:
        lines += [f"![Training loss and held-out score per stage]({plots['losses']})", ""]

    # ---- evaluation
    lines += ["## 4. Evaluation across stages", ""]
    evals = {label: _json(data / folder / "metrics.json") for label, folder in cfg.evaluations.items()}
    present = {k: v for k, v in evals.items() if v}
    if present:
        keys: list[str] = []
        for m in present.values():
            keys += [k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and k not in keys and k not in EVAL_SKIP]
        keys.sort(key=lambda k: (k not in EVAL_NAMES, list(EVAL_NAMES).index(k) if k in EVAL_NAMES else 0, k))
        lines += _table(["metric"] + list(present), [[EVAL_NAMES.get(k, k)] + [m.get(k) for m in present.values()]
                                                     for k in keys])
        lines += ["Each stage scores its own held-out data (documents for the base model, conversations and "
                  "verifiable prompts for SFT and RLHF), so compare a row across columns only where the data "
                  "match; the \"before SFT\" rows score the base model on SFT's data. "
                  "Perplexity is per token (it depends on the tokenizer); bits per byte is per UTF-8 byte of "
                  "held-out text and compares across tokenizers; lower is better for both. Task accuracy is "
                  "exact match of greedy replies on held-out verifiable prompts (higher is better); win rate "
                  "compares the RLHF policy with the SFT model on the same prompts.", ""]
    missing = [k for k, v in evals.items() if not v]
    if missing:
        lines += [f"Not evaluated in this workspace (stage not run, or not in the pipeline yet): "
                  f"{', '.join(missing)}.", ""]

    # ---- samples
    lines += ["## 5. Sample generations", ""]
    shown = False
    for label, folder in cfg.evaluations.items():
        samples = _json(data / folder / "samples.json") or []
        if not samples or cfg.max_samples == 0:
            continue
        shown = True
        lines += [f"### {label}", ""]
        default = (_json(data / folder / "metrics.json") or {}).get("decoding")
        for i, s in enumerate(samples[:cfg.max_samples], 1):
            decoding = s.get("decoding", default)
            how = (", ".join(f"{k}={v}" for k, v in decoding.items()) if decoding
                   else "decoding settings not recorded")
            output = next((s[k] for k in ("continuation", "reply", "policy") if k in s), "")
            lines += [f"**Sample {i}** ({how})", "",
                      f"> **prompt:** {html.escape(_clip(str(s.get('prompt', '')), cfg.max_chars))}", ">",
                      f"> **output:** {html.escape(_clip(str(output), cfg.max_chars))}"]
            if "answer" in s:
                ok = s.get("correct", s.get("policy_correct"))
                verdict = "" if ok is None else (" — correct" if ok else " — wrong")
                lines += [">", f"> **expected:** {html.escape(_clip(str(s['answer']), cfg.max_chars))}{verdict}"]
            lines += [""]
    if not shown:
        lines += ["*No sample generations in this workspace.*", ""]

    # ---- timings
    lines += ["## 6. Stage timings", ""]
    if cfg.parent_run_id:
        if timings:
            lines += _table(["stage", "ran?", "seconds", "MLflow run", "outputs made by run"],
                            [[t["stage"], "skipped (up to date)" if t["skipped"] else "ran", t["seconds"],
                              f"`{t['run_id']}`", f"`{t['reused_run_id']}`" if t["reused_run_id"] else ""]
                             for t in timings])
            total = sum(t["seconds"] or 0.0 for t in timings)
            lines += [f"Total {total:,.1f} s. DVC skips a stage whose code, parameters and inputs are unchanged; "
                      "its outputs then come from the run named in the last column.", ""]
        if "timings" in plots:
            lines += [f"![Seconds per stage]({plots['timings']})", ""]
    else:
        lines += ["*Built outside a pipeline run: no stage timings.*", ""]

    # ---- deployment: the deploy stage writes its own section (tasks/deploy.py render)
    lines += ["## 7. Deployment decision", ""]
    decision = data / "deploy" / "decision.md"
    lines += [decision.read_text(), ""] if decision.exists() else ["*No deploy decision in this workspace.*", ""]
    return lines


def build_report(cfg: ReportConfig) -> Path:
    """Write report.md, its PNG plots and a self-contained report.html into cfg.out_dir; return report.md."""
    from forgeline.lineage import git_commit

    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    histories = {}
    for label, folder in cfg.training.items():
        hist = _json(data / folder / "history.json")
        if hist:
            final = _json(data / folder / "summary.json") or _json(data / folder / "metrics.json") or {}
            val = _series(hist.get("val", []))[1]
            histories[label] = (hist, bool(val) and final.get("val_loss") == val[-1])
    if histories:
        _plot_losses_once(histories, out / "loss_curves.png")
        plots["losses"] = "loss_curves.png"
    timings = stage_timings(cfg.parent_run_id) if cfg.parent_run_id else []
    if timings:
        _plot_timings(timings, out / "stage_timings.png")
        plots["timings"] = "stage_timings.png"

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ids = [f"git commit `{git_commit()}`"]
    if cfg.parent_run_id:
        ids.append(f"MLflow run `{cfg.parent_run_id}`")
    if cfg.flow_run_id:
        ids.append(f"Prefect flow run `{cfg.flow_run_id}`")
    lines = [f"# {cfg.title}", "", f"Built {now}; {', '.join(ids)}.", "",
             "Forgeline's LLM pipeline reads raw documents (text, HTML, PDF, scans), cleans and splits them "
             "into chunks, trains a byte-level BPE tokenizer and a small GPT on them, and evaluates the "
             "model on held-out documents. Each section below is one part of that path; numbers come from "
             "the stage outputs under `data/`.", ""]
    lines += _sections(cfg, data, plots, timings)
    md = "\n".join(lines)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(to_html(md, out, cfg.title))
    return out / "report.md"


CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
blockquote{border-left:3px solid #ccc;margin:.5em 0;padding:.1em 1em;color:#444}code{font-size:90%}"""


def to_html(md: str, folder: Path, title: str) -> str:
    """The markdown as one HTML file, every PNG inlined as a data: URI (no files beside it needed)."""
    import markdown

    body = markdown.markdown(md, extensions=["tables"])

    def inline(m: re.Match) -> str:
        png = (folder / m.group(1)).read_bytes()
        return f'src="data:image/png;base64,{base64.b64encode(png).decode()}"'

    body = re.sub(r'src="([\w.-]+\.png)"', inline, body)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def prefect_markdown(md: str, parent_run_id: str) -> str:
    """The report for Prefect's UI: images cannot travel as files, so they point at MLflow."""
    where = f"MLflow run `{parent_run_id}`, artifacts `report/`" if parent_run_id else "`data/report/`"
    return re.sub(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)", rf"*Plot: \1 — `\2` in {where} (also inlined in report.html).*", md)


def publish(cfg: ReportConfig, report_md: Path) -> None:
    """Log data/report/* to the parent MLflow run (artifact folder report/)."""
    import mlflow

    from forgeline.tracking import init_tracking, tracking_uri

    init_tracking()
    mlflow.MlflowClient(tracking_uri()).log_artifacts(cfg.parent_run_id, str(report_md.parent), "report")


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(ReportConfig, "report", sys.argv[1:] if argv is None else argv)
    path = build_report(cfg)
    if cfg.parent_run_id:
        publish(cfg, path)
    print(f"report: {path} and {path.with_suffix('.html')}")


@task(name="report", retries=0)
def report_task(run: dict[str, str]) -> str:
    from prefect.artifacts import create_markdown_artifact

    cfg = load_config(ReportConfig, "report", {"parent_run_id": run["parent_run_id"],
                                               "flow_run_id": run.get("flow_run_id", "")})
    path = build_report(cfg)
    publish(cfg, path)
    create_markdown_artifact(key="llm-report", markdown=prefect_markdown(path.read_text(), cfg.parent_run_id),
                             description="report card of this pipeline run")
    return str(path)


if __name__ == "__main__":
    main()
