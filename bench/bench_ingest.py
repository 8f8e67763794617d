"""Benchmark ingest on the shipped scanned PDF: OCR throughput and character accuracy.

Ingests `--copies` copies of each scanned sample (data/raw/scanned/*.pdf) with the stage's OCR
settings, then scores the OCR text against data/groundtruth/<name>.txt: character accuracy =
1 - Levenshtein distance / len(ground truth), both with whitespace runs collapsed to one space.
Prints a markdown table row and writes bench/results/ingest.json. Target: >= 1 page/s at
>= 98% character accuracy on 2 cores.

    python -m bench.bench_ingest [--copies 4] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from forgeline.config import load_config
from forgeline.paths import DATA, ROOT
from tasks.ingest import IngestConfig, ingest

SCANNED = DATA / "raw" / "scanned"
GROUNDTRUTH = DATA / "groundtruth"
RESULTS = ROOT / "bench" / "results" / "ingest.json"
TARGET_PAGES_PER_S, TARGET_ACCURACY = 1.0, 0.98


def levenshtein(a: str, b: str) -> int:
    """Edit distance, one numpy row per character of `a`.

    Insertions chain along a row (cur[j] <= cur[j-1] + 1); that chain is a running minimum of
    cur[j] - j, so each row needs no Python loop over `b`.
    """
    if len(a) < len(b):
        a, b = b, a
    codes = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    idx = np.arange(len(b) + 1)
    prev = idx.copy()
    for i, ch in enumerate(a, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        np.minimum(prev[1:] + 1, prev[:-1] + (codes != ord(ch)), out=cur[1:])  # deletion, substitution
        prev = np.minimum.accumulate(cur - idx) + idx  # insertion
    return int(prev[-1])


def char_accuracy(ocr: str, truth: str) -> float:
    ocr, truth = " ".join(ocr.split()), " ".join(truth.split())
    return 1.0 - levenshtein(ocr, truth) / len(truth)


def cpu_seconds() -> float:
    """CPU-s used so far by this process and its finished children (tesseract, parser)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4, help="copies of each scan: more pages, steadier pages/s")
    ap.add_argument("--workers", type=int, default=None, help="ocr_workers (default: configs/ingest.yaml)")
    args = ap.parse_args()
    scans = sorted(SCANNED.glob("*.pdf"))
    overrides = {} if args.workers is None else {"ocr_workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for scan in scans:
            for k in range(args.copies):
                shutil.copyfile(scan, src / f"{scan.stem}-{k}.pdf")
        cfg = load_config(IngestConfig, "ingest", {"source": str(src), "out_dir": f"{tmp}/out", **overrides})
        load = os.getloadavg()[0]  # other work on the machine slows pages/s: recorded with it
        cpu0 = cpu_seconds()
        summary = ingest(cfg)
        cpu = cpu_seconds() - cpu0
        docs = pd.read_parquet(Path(tmp) / "out" / "documents.parquet")
    assert summary["quarantined"] == 0 and summary["ocr_pages"] == summary["pages"], summary
    truth = {scan.stem: (GROUNDTRUTH / f"{scan.stem}.txt").read_text() for scan in scans}
    t0 = time.perf_counter()
    accuracies = [char_accuracy(row.text, truth[row.source.rsplit("-", 1)[0]]) for row in docs.itertuples()]
    scoring_s = time.perf_counter() - t0
    accuracy = min(accuracies)  # every copy is the same input; min shows any nondeterminism
    tesseract = subprocess.run(["tesseract", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tesseract": tesseract},
        "inputs": [str(s.relative_to(ROOT)) for s in scans], "copies": args.copies,
        "ocr_workers": cfg.ocr_workers, "ocr_dpi": cfg.ocr_dpi,
        "pages": summary["pages"], "ocr_pages": summary["ocr_pages"], "seconds": summary["seconds"],
        "pages_per_s": summary["pages_per_s"], "char_accuracy": round(accuracy, 5),
        # load-independent: what one page costs; idle-machine pages/s <= cpus / cpu_s_per_page
        "cpu_s_per_page": round(cpu / summary["pages"], 3), "load_avg_1m_before": round(load, 2),
        "ocr_confidence": round(summary["ocr_confidence"], 2),
        "target": {"pages_per_s": TARGET_PAGES_PER_S, "char_accuracy": TARGET_ACCURACY},
        "meets_target": summary["pages_per_s"] >= TARGET_PAGES_PER_S and accuracy >= TARGET_ACCURACY,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_path, RESULTS)
    print(f"(accuracy scoring took {scoring_s:.1f} s; load average before the run {load:.2f})")
    print("| stage | pages | OCR workers | dpi | seconds | pages/s | CPU-s/page | char accuracy "
          "| mean conf | target met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| ingest (OCR, {os.cpu_count()} cores) | {result['pages']} | {cfg.ocr_workers} | {cfg.ocr_dpi} "
          f"| {result['seconds']:.2f} | {result['pages_per_s']:.2f} | {result['cpu_s_per_page']:.2f} "
          f"| {accuracy:.2%} | {result['ocr_confidence']:.1f} | {'yes' if result['meets_target'] else 'no'} |")


if __name__ == "__main__":
    main()
