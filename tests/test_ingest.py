"""Ingest: good files become documents, each kind of bad file ends in quarantine with its reason.

Fixtures are built in tmp_path from the shipped sample (data/raw/pdf/R-FAQ.pdf) and from text
drawn with Pillow's bundled font, so nothing depends on files outside the repo except tesseract.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import random
import struct
import zlib
from pathlib import Path

import pandas as pd
import pypdf
import pytest
from PIL import Image, ImageDraw, ImageFont

from forgeline.config import ConfigError, load_config
from forgeline.paths import ROOT
from tasks.ingest import (DOC_COLUMNS, REASONS, IngestConfig, gunzip, html_to_text, ingest,
                          printable_ratio, Quarantine, tsv_to_text)

R_FAQ = ROOT / "data" / "raw" / "pdf" / "R-FAQ.pdf"
SCAN_LINES = ["The quick brown fox jumps over the lazy dog.",
              "Catherine Morland was fond of cricket and baseball.",
              "Pipelines ingest scanned documents with tesseract."]


# ---------------------------------------------------------------- fixture builders
def text_pdf(pages: int = 2) -> bytes:
    reader, writer = pypdf.PdfReader(R_FAQ), pypdf.PdfWriter()
    for page in reader.pages[:pages]:
        writer.add_page(page)
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def scan_image(lines: list[str] = SCAN_LINES) -> Image.Image:
    """Dark text on light grey, 12 pt at 300 dpi, as a scanner would deliver it."""
    font = ImageFont.load_default(size=50)  # Pillow's bundled font: no system fonts needed
    img = Image.new("L", (2400, 150 + 90 * len(lines)), 235)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((120, 80 + 90 * i), line, font=font, fill=30)
    return img


def image_pdf(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PDF", resolution=300)  # one JPEG per page, no text layer
    return buf.getvalue()


def blank_pdf(width_pt: float, height_pt: float) -> bytes:
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=width_pt, height=height_pt)
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def encrypted_pdf() -> bytes:
    reader, writer = pypdf.PdfReader(R_FAQ), pypdf.PdfWriter()
    writer.add_page(reader.pages[0])
    writer.encrypt(user_password="secret", owner_password="owner")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def write(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


GOOD_HTML = """<!doctype html><html><head><title>Forgeline notes</title>
<style>body { color: red }</style><script>var hidden = "do not index";</script></head>
<body><h1>Ingest &amp; parse</h1><p>Visible   paragraph
text.</p><ul><li>first item</li><li>second item</li></ul></body></html>"""


def run(src: Path | str, out: Path, **overrides) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    cfg = load_config(IngestConfig, "ingest", {"source": str(src), "out_dir": str(out), **overrides})
    summary = ingest(cfg)
    docs = pd.read_parquet(out / "documents.parquet")
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert json.loads((out / "summary.json").read_text()) == summary
    return docs, quarantine, summary


# ---------------------------------------------------------------- good files
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("good")
    buf = io.BytesIO()
    scan_image(["Invoice number 4217 from the Forgeline warehouse."]).save(buf, "PNG", dpi=(300, 300))
    src = write(tmp / "src", {
        "notes/readme.txt": "Plain text, UTF-8: café.\n",
        "notes/guide.md": "# Guide\n\nSome *markdown* here.\n",
        "notes/page.html": GOOD_HTML,
        "notes/compressed.txt.gz": gzip.compress(b"Compressed text survives the trip.\n" * 3),
        "pdf/rfaq-2p.pdf": text_pdf(2),
        "scan/scan.pdf": image_pdf(scan_image()),
        "scan/photo.png": buf.getvalue(),
    })
    return run(src, tmp / "out")


def test_good_files_all_become_documents(good):
    docs, quarantine, summary = good
    assert quarantine.empty and summary["quarantined"] == 0
    assert list(docs.columns) == list(DOC_COLUMNS)
    assert docs["source"].tolist() == sorted(docs["source"])  # deterministic order
    assert docs.set_index("source")["kind"].to_dict() == {
        "notes/compressed.txt.gz": "txt", "notes/guide.md": "md", "notes/page.html": "html",
        "notes/readme.txt": "txt", "pdf/rfaq-2p.pdf": "pdf", "scan/photo.png": "image",
        "scan/scan.pdf": "pdf"}
    assert (docs["doc_id"] == docs["sha256"].str[:16]).all()
    assert docs["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert summary["files"] == summary["documents"] == 7 and summary["pages"] == docs["pages"].sum()


def test_text_html_and_text_layer(good):
    docs = good[0].set_index("source")
    assert docs.loc["notes/readme.txt", "text"] == "Plain text, UTF-8: café.\n"
    assert docs.loc["notes/compressed.txt.gz", "text"].count("survives") == 3
    html = docs.loc["notes/page.html", "text"]
    assert "Ingest & parse" in html and "Visible paragraph text." in html and "second item" in html
    assert "do not index" not in html and "color" not in html
    pdf = docs.loc["pdf/rfaq-2p.pdf"]
    assert pdf["pages"] == 2 and not pdf["ocr"] and pdf["ocr_pages"] == 0
    assert math.isnan(pdf["ocr_confidence"]) and "R FAQ" in pdf["text"] and pdf["text"].count("\f") == 1
    assert docs.loc["notes/readme.txt", "pages"] == 1 and docs["printable_ratio"].min() > 0.99


def test_scanned_pdf_and_image_are_ocrd(good):
    docs = good[0].set_index("source")
    scan = docs.loc["scan/scan.pdf"]
    assert scan["ocr"] and scan["ocr_pages"] == 1 and scan["ocr_confidence"] > 50
    for words in ("quick brown fox", "lazy dog", "Catherine Morland", "tesseract"):
        assert words in scan["text"]
    photo = docs.loc["scan/photo.png"]
    assert photo["ocr"] and "Forgeline warehouse" in photo["text"] and photo["ocr_confidence"] > 50
    assert good[2]["ocr_pages"] == 2 and good[2]["ocr_confidence"] > 50


# ---------------------------------------------------------------- bad files
BAD = {  # file -> expected quarantine reason (run with max_file_mb=1)
    "bad/truncated.pdf": "corrupt",
    "bad/encrypted.pdf": "encrypted",
    "bad/empty.txt": "empty",
    "bad/whitespace.md": "empty",
    "bad/blank-scan.pdf": "empty",  # a blank page: OCR finds no text
    "bad/junk.txt": "wrong_type",
    "bad/not-a-pdf.pdf": "wrong_type",
    "bad/pdf-named.txt": "wrong_type",
    "bad/bomb.png": "oversized",
    "bad/huge-page.pdf": "oversized",
    "bad/big.txt": "oversized",
    "bad/gzip-bomb.txt.gz": "oversized",
    "bad/truncated.txt.gz": "corrupt",
    "bad/table.csv": "unsupported",
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    rfaq = R_FAQ.read_bytes()
    src = write(tmp / "src", {
        "bad/truncated.pdf": rfaq[: len(rfaq) // 2],
        "bad/encrypted.pdf": encrypted_pdf(),
        "bad/empty.txt": b"",
        "bad/whitespace.md": " \n\t\n",
        "bad/blank-scan.pdf": blank_pdf(612, 792),
        "bad/junk.txt": random.Random(0).randbytes(4096),
        "bad/not-a-pdf.pdf": "This is a text file wearing a .pdf name.\n",
        "bad/pdf-named.txt": text_pdf(1),
        "bad/bomb.png": png_claiming(50_000, 50_000),
        "bad/huge-page.pdf": blank_pdf(14_400, 14_400),  # 200 in square: 60000 px a side at 300 dpi
        "bad/big.txt": "x" * (1 << 20) + "y",
        "bad/gzip-bomb.txt.gz": gzip.compress(b"a" * (2 << 20)),
        "bad/truncated.txt.gz": gzip.compress(b"some text " * 1000)[:-8],  # trailer cut off
        "bad/table.csv": "a,b\n1,2\n",
        "good.txt": "The one good file among the bad.\n",
    })
    return run(src, tmp / "out", max_file_mb=1.0)


def test_each_bad_file_is_quarantined_with_its_reason(bad):
    docs, quarantine, summary = bad
    assert docs["source"].tolist() == ["good.txt"]
    got = quarantine.set_index("source")["reason"].to_dict()
    assert got == BAD, quarantine.to_string()
    assert set(quarantine["reason"]) <= set(REASONS) and quarantine["detail"].str.len().min() > 0
    assert summary["quarantined"] == len(BAD) and summary["quarantined_oversized"] == 4
    assert summary["files"] == len(BAD) + 1


def test_quarantine_sha256_empty_only_when_unread(bad):
    q = bad[1].set_index("source")
    assert q.loc["bad/big.txt", "sha256"] == "" and q.loc["bad/table.csv", "sha256"] == ""
    assert len(q.loc["bad/encrypted.pdf", "sha256"]) == 64


def test_parse_timeout(tmp_path):
    src = write(tmp_path / "src", {"rfaq.pdf": R_FAQ.read_bytes(), "ok.txt": "still ingested\n"})
    docs, quarantine, _ = run(src, tmp_path / "out", parse_timeout_s=0.05)
    assert docs["source"].tolist() == ["ok.txt"]
    assert quarantine[["source", "reason"]].values.tolist() == [["rfaq.pdf", "timeout"]]


def test_memory_limit_kills_parser_not_pipeline(tmp_path):
    # 200 in square at 150 dpi is 900 Mpx: allowed by the pixel limit, not by 256 MiB of memory
    src = write(tmp_path / "src", {"huge.pdf": blank_pdf(14_400, 14_400)})
    _, quarantine, summary = run(src, tmp_path / "out", parse_memory_mb=256, ocr_dpi=150,
                                 max_image_pixels=2_000_000_000)
    assert quarantine["reason"].tolist() == ["resource_limit"]
    assert summary["quarantined_resource_limit"] == 1


def test_ocr_failure_and_ocr_timeout(tmp_path):
    src = write(tmp_path / "src", {"scan.pdf": image_pdf(scan_image(SCAN_LINES[:1]))})
    _, q, _ = run(src, tmp_path / "a", ocr_lang="no_such_language")
    assert q["reason"].tolist() == ["ocr_failed"] and "page 1" in q["detail"][0]
    _, q, _ = run(src, tmp_path / "b", ocr_timeout_s=0.01)
    assert q["reason"].tolist() == ["timeout"]


def test_s3_source(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = {"endpoint_url": f"http://{host}:{port}"}
        fs = s3fs.S3FileSystem(**endpoint)
        fs.mkdir("forgeline-raw")
        fs.pipe({"forgeline-raw/in/a.txt": b"alpha text\n", "forgeline-raw/in/sub/r.pdf": text_pdf(1),
                 "forgeline-raw/in/empty.md": b""})
        docs, q, _ = run("s3://forgeline-raw/in", tmp_path / "out", storage_options=endpoint)
    finally:
        server.stop()
    assert docs["source"].tolist() == ["a.txt", "sub/r.pdf"] and docs["kind"].tolist() == ["txt", "pdf"]
    assert q[["source", "reason"]].values.tolist() == [["empty.md", "empty"]]


# ---------------------------------------------------------------- config and helpers
def test_shipped_config_loads_and_unknown_key_fails():
    assert load_config(IngestConfig, "ingest").source == "data/raw"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(IngestConfig, "ingest", ["nope=1"])
    with pytest.raises(ConfigError, match="ocr_workers"):
        load_config(IngestConfig, "ingest", ["ocr_workers=0"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(IngestConfig, "ingest", ["parse_timeout_s=soon"])


def test_helpers():
    with pytest.raises(Quarantine, match="oversized"):
        gunzip(gzip.compress(b"a" * 2000), limit=1000)
    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), limit=10) == b"abcd"  # multi-member
    assert html_to_text("<p>a<br>b</p><script>x</script>") == "a\nb\n"
    assert printable_ratio("ab\n\x00") == 0.75
    tsv = ("level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext\n"
           "5\t1\t1\t1\t1\t1\t0\t0\t1\t1\t90\tHello\n5\t1\t1\t1\t1\t2\t0\t0\t1\t1\t80\tworld\n"
           "5\t1\t1\t1\t2\t1\t0\t0\t1\t1\t70\tnext\n5\t1\t2\t1\t1\t1\t0\t0\t1\t1\t60\tblock\n")
    assert tsv_to_text(tsv) == ("Hello world\nnext\n\nblock\n", [90.0, 80.0, 70.0, 60.0])
