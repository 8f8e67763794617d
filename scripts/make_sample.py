"""Build the shipped sample data/raw/ (and the OCR ground truth data/groundtruth/) from ../shared/data.

    .venv/bin/python scripts/make_sample.py [--shared ../shared/data]

Reproducible: the same inputs give byte-identical files (gzip mtime 0, fixed noise seed, fixed
PDF dates), so rerunning it leaves git and DVC with nothing to do. Provenance: data/README.md.
"""
from __future__ import annotations

import argparse
import gzip
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pypdf
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]  # run as a plain script: forgeline is not on sys.path
DATA = ROOT / "data"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"
PDF_DATE = time.gmtime(0)  # fixed creation/modification date: byte-identical reruns
SCAN_DPI = 300
SCAN_PAGES = 3
LEADING = 1.5  # line pitch / font size
JPEG_QUALITY = 25  # office-scanner grade; keeps the three 300 dpi pages near 1.1 MB


def read_gz(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def write_gz(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))


def head_paragraphs(text: str, max_chars: int) -> str:
    """The longest run of whole blank-line-separated paragraphs from the start within max_chars."""
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars].rstrip() + "\n"


def head_lines(text: str, max_chars: int) -> str:
    cut = text.rfind("\n", 0, max_chars)
    return text[:cut].rstrip() + "\n"


# ---------------------------------------------------------------- text corpus
def make_text(shared: Path, raw: Path) -> None:
    corpus = shared / "corpus"
    shutil.copyfile(corpus / "austen_persuasion.txt.gz", raw / "austen" / "persuasion.txt.gz")
    # sotu holds one address per line, blank-line separated, oldest first: the last 8 addresses
    addresses = [a for a in read_gz(corpus / "sotu.txt.gz").split("\n\n") if a.strip()]
    first = len(addresses) - 8
    for i, address in enumerate(addresses[first:], start=first):
        write_gz(raw / "sotu" / f"address_{i:03d}.txt.gz", address.strip() + "\n")
    # reST, not Markdown: kept as .txt so nothing downstream parses it as Markdown
    write_gz(raw / "pydocs" / "pydocs_head.txt.gz", head_paragraphs(read_gz(corpus / "pydocs.txt.gz"), 400_000))
    write_gz(raw / "debhandbook" / "debhandbook_head.txt.gz",
             head_paragraphs(read_gz(corpus / "debhandbook.txt.gz"), 300_000))
    write_gz(raw / "brown" / "brown_head.txt.gz", head_lines(read_gz(corpus / "brown.txt.gz"), 300_000))


# ---------------------------------------------------------------- real PDFs
def make_pdfs(shared: Path, raw: Path) -> None:
    pdfs = shared / "pdf"
    shutil.copyfile(pdfs / "R-FAQ.pdf", raw / "pdf" / "R-FAQ.pdf")
    reader = pypdf.PdfReader(pdfs / "reportlab-userguide.pdf")
    writer = pypdf.PdfWriter()
    for page in reader.pages[:10]:
        writer.add_page(page)
    writer.compress_identical_objects(remove_duplicates=True, remove_unreferenced=True)
    buf = io.BytesIO()
    writer.write(buf)
    (raw / "pdf" / "reportlab-userguide-p1-10.pdf").write_bytes(buf.getvalue())


# ---------------------------------------------------------------- scanned PDF
def wrap_pages(paragraphs: list[str], font: ImageFont.FreeTypeFont, width_px: int,
               lines_per_page: int) -> list[list[str]]:
    """Greedy word wrap into pages of lines; "" lines separate paragraphs."""
    lines: list[str] = []
    for para in paragraphs:
        line = ""
        for word in para.split():
            trial = f"{line} {word}" if line else word
            if font.getlength(trial) <= width_px:
                line = trial
            else:
                lines.append(line)
                line = word
        lines += [line, ""]
    pages = [lines[i:i + lines_per_page] for i in range(0, len(lines), lines_per_page)]
    return pages


def scan_page(lines: list[str], font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> Image.Image:
    """A letter page at 300 dpi: dark-grey ink on off-white paper, slight blur, skew and noise."""
    w, h, margin, lead = int(8.5 * SCAN_DPI), 11 * SCAN_DPI, SCAN_DPI, int(font.size * LEADING)
    page = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * lead), line, font=font, fill=35)
    page = page.rotate(0.3, resample=Image.Resampling.BICUBIC, fillcolor=255)  # degrees
    page = page.filter(ImageFilter.GaussianBlur(0.7))  # px: toner spread
    arr = np.asarray(page, dtype=np.float32) * (238 / 255)  # paper is not white
    arr += rng.normal(0.0, 3.0, arr.shape)  # grey levels of sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def make_scan(shared: Path, raw: Path, groundtruth: Path) -> None:
    """Chapter 1 of Northanger Abbey typeset, rasterised and saved as an image-only PDF."""
    text = read_gz(shared / "corpus" / "austen_northangerabbey.txt.gz")
    start = text.index("No one who had ever seen Catherine Morland")
    paragraphs = [" ".join(p.split()) for p in text[start:].split("\n\n") if p.strip()]
    font = ImageFont.truetype(FONT, size=round(12 / 72 * SCAN_DPI))  # 12 pt
    lines_per_page = (11 * SCAN_DPI - 2 * SCAN_DPI) // int(font.size * LEADING)
    pages = wrap_pages(paragraphs, font, int(6.5 * SCAN_DPI), lines_per_page)[:SCAN_PAGES]
    rng = np.random.default_rng(0)
    images = [scan_page(lines, font, rng) for lines in pages]
    out = raw / "scanned" / "northanger-abbey-ch1-scan.pdf"
    out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out, "PDF", save_all=True, append_images=images[1:], resolution=SCAN_DPI,
                   quality=JPEG_QUALITY, optimize=True, title="Northanger Abbey, chapter 1 (scan)",
                   creationDate=PDF_DATE, modDate=PDF_DATE)
    groundtruth.mkdir(parents=True, exist_ok=True)
    gt = "\f".join("\n".join(lines).strip() + "\n" for lines in pages)  # form feed between pages
    (groundtruth / "northanger-abbey-ch1-scan.txt").write_text(gt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    raw, groundtruth = DATA / "raw", DATA / "groundtruth"
    shutil.rmtree(raw, ignore_errors=True)  # rebuilt whole: no stale files survive
    for sub in ("austen", "sotu", "pydocs", "debhandbook", "brown", "pdf"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    make_text(args.shared, raw)
    make_pdfs(args.shared, raw)
    make_scan(args.shared, raw, groundtruth)
    total = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    n = sum(1 for p in raw.rglob("*") if p.is_file())
    print(f"wrote {n} files, {total / 1e6:.2f} MB under {raw.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
