"""Build data/rag_raw/ (the RAG pipeline's PDFs) from ../shared/data/pdf, with a scanned-only PDF.

A dev tool, not run by tests, benchmarks or the pipeline: the output is committed, with the
provenance in data/README.md. Byte-identical on rerun (pypdf page subsets; the scan is seeded).

- native/: page subsets of real PDFs with their text layer (R-FAQ whole, the ReportLab user guide
  pages 1-20, the Ghostscript 9 colour-management guide pages 1-10);
- scanned/gs9-color-p11-13-scan.pdf: pages 11-13 of the Ghostscript guide rendered at 300 dpi and
  degraded like an office scan (skew, toner blur, grey paper, sensor noise, JPEG), image-only:
  ingest must OCR it. Page 13 is scanned worse (110 dpi, more blur and noise) so that one page
  carries a lower OCR confidence, the case the index must flag rather than drop;
- ocr_reference/gs9-color-p11-13.pdf: the same three pages with their text layer: not served
  (configs/rag_index.yaml leaves ocr_reference/ out of the index); rag_eval measures OCR's effect
  on retrieval by swapping it in for the scan.

    .venv/bin/python scripts/make_rag_sample.py [--shared ../shared/data]
"""
from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
import pypdf
import pypdfium2 as pdfium
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "rag_raw"
NATIVE = {  # output name: (source PDF, first page, last page), 1-based inclusive
    "R-FAQ.pdf": ("R-FAQ.pdf", 1, 52),
    "reportlab-userguide-p1-20.pdf": ("reportlab-userguide.pdf", 1, 20),
    "gs9-color-p1-10.pdf": ("GS9_Color_Management.pdf", 1, 10),
}
SCAN_SOURCE, SCAN_PAGES = "GS9_Color_Management.pdf", (11, 12, 13)
SCAN_NAME, REFERENCE_NAME = "gs9-color-p11-13-scan.pdf", "gs9-color-p11-13.pdf"
SEED = 16
# per page: (dpi, skew degrees, blur px, noise sd in grey levels, JPEG quality); the last page is the bad scan
DEGRADE = {11: (300, 0.6, 0.8, 8.0, 40), 12: (300, -0.4, 0.8, 8.0, 40), 13: (110, 1.2, 1.0, 16.0, 30)}
PDF_DATE = "D:20260101000000+00'00'"


def subset(src: Path, first: int, last: int) -> bytes:
    reader = pypdf.PdfReader(src)
    writer = pypdf.PdfWriter()
    for page in reader.pages[first - 1:last]:
        writer.add_page(page)
    writer.add_metadata({"/Producer": "forgeline scripts/make_rag_sample.py", "/CreationDate": PDF_DATE})
    writer.compress_identical_objects(remove_duplicates=True, remove_unreferenced=True)
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def scan(page: pdfium.PdfPage, number: int, rng: np.random.Generator) -> Image.Image:
    """A real page as an office scanner gives it back: greyscale, tilted, blurred, grey paper, noise."""
    dpi, skew, blur, noise, _ = DEGRADE[number]
    image = page.render(scale=dpi / 72, grayscale=True).to_pil().convert("L")
    image = image.rotate(skew, resample=Image.Resampling.BICUBIC, fillcolor=255)
    image = image.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(image, dtype=np.float32) * (232 / 255) + 8  # ink is not black, paper not white
    arr += rng.normal(0.0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def make_scan(src: Path) -> bytes:
    """The scanned pages as one image-only PDF: each page a JPEG at its own resolution."""
    doc = pdfium.PdfDocument(src)
    rng = np.random.default_rng(SEED)
    out = pypdf.PdfWriter()
    for number in SCAN_PAGES:
        dpi, *_, quality = DEGRADE[number]
        buf = io.BytesIO()
        scan(doc[number - 1], number, rng).save(buf, "PDF", resolution=dpi, quality=quality)
        out.add_page(pypdf.PdfReader(io.BytesIO(buf.getvalue())).pages[0])
    out.add_metadata({"/Producer": "forgeline scripts/make_rag_sample.py", "/CreationDate": PDF_DATE})
    buf = io.BytesIO()
    out.write(buf)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    pdfs = ap.parse_args().shared / "pdf"
    shutil.rmtree(OUT, ignore_errors=True)  # rebuilt whole: no stale files survive
    for sub in ("native", "scanned", "ocr_reference"):
        (OUT / sub).mkdir(parents=True)
    for name, (src, first, last) in NATIVE.items():
        (OUT / "native" / name).write_bytes(subset(pdfs / src, first, last))
    (OUT / "scanned" / SCAN_NAME).write_bytes(make_scan(pdfs / SCAN_SOURCE))
    (OUT / "ocr_reference" / REFERENCE_NAME).write_bytes(
        subset(pdfs / SCAN_SOURCE, SCAN_PAGES[0], SCAN_PAGES[-1]))
    for p in sorted(OUT.rglob("*.pdf")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1e6:.2f} MB")
    print(f"total {sum(p.stat().st_size for p in OUT.rglob('*.pdf')) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
