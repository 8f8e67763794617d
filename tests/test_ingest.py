"""Ingest: good files become documents, each kind of bad file ends in quarantine with its reason.

Fixtures are built in tmp_path from the shipped sample (data/raw/pdf/R-FAQ.pdf) and from text
drawn with Pillow's bundled font, so nothing depends on files outside the repo except tesseract.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import random
import socket
import struct
import threading
import zlib
from pathlib import Path

import pandas as pd
import pypdf
import pytest
from PIL import Image, ImageDraw, ImageFont

from forgeline.config import ConfigError, load_config
from forgeline.paths import ROOT
from tasks.ingest import (DOC_COLUMNS, REASONS, IngestConfig, gunzip, html_to_text, ingest,
                          otsu_threshold, prepare_page, printable_ratio, Quarantine, skew_angle,
                          tsv_to_text)

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
    enc = docs.set_index("source")["encoding"]
    assert enc["notes/readme.txt"] == enc["notes/compressed.txt.gz"] == "utf-8"
    assert enc[["pdf/rfaq-2p.pdf", "scan/photo.png"]].isna().all()  # pdfium and OCR give text, not bytes
    assert (docs["replaced_chars"] == 0).all()
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


def test_tilted_scan_is_straightened_and_its_paper_whitened():
    import numpy as np

    tilted = scan_image().rotate(1.5, resample=Image.Resampling.BICUBIC, fillcolor=235)
    small = np.asarray(tilted.reduce(4))
    assert skew_angle(small < otsu_threshold(small), 5.0) == pytest.approx(1.5, abs=0.1)
    assert skew_angle(np.zeros((50, 50), bool), 5.0) == 0.0  # nothing to line up
    kept, straight = prepare_page(tilted, 0.0), prepare_page(tilted, 5.0)
    # a tilted line of text spans more pixel rows than the same line level
    rows_with_ink = [int((page < 128).any(axis=1).sum()) for page in (kept, straight)]
    assert rows_with_ink[1] < 0.8 * rows_with_ink[0]
    assert (straight[straight > 200] == 255).all()  # paper (235 and noise) is pure white
    assert (straight < 40).any()  # ink keeps its own grey level: not binarised


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


# ---------------------------------------------------------------- links, special files, encodings
def test_links_leaving_the_source_are_quarantined_unread(tmp_path):
    outside = write(tmp_path / "outside", {"secret.txt": "SECRET-FILE root:x:0:0\n",
                                           "dir/inner.txt": "SECRET-DIR contents\n"})
    src = write(tmp_path / "src", {"ok.txt": "An ordinary document.\n", "sub/b.md": "# Inside\n"})
    (src / "passwd.txt").symlink_to("/etc/passwd")  # the file a careless ingest would leak
    (src / "secret.txt").symlink_to(outside / "secret.txt")
    (src / "up.txt").symlink_to("../outside/secret.txt")  # relative, escaping by ..
    (src / "elsewhere").symlink_to(outside / "dir", target_is_directory=True)
    (src / "copy-of-ok.txt").symlink_to("ok.txt")  # inside the root: ingested once, as ok.txt
    (src / "subdir-again").symlink_to(src / "sub", target_is_directory=True)
    (src / "broken.txt").symlink_to(src / "missing.txt")
    docs, q, summary = run(src, tmp_path / "out")
    assert docs["source"].tolist() == ["ok.txt", "sub/b.md"]
    assert q.set_index("source")["reason"].to_dict() == {
        "broken.txt": "corrupt", "elsewhere": "outside_source", "passwd.txt": "outside_source",
        "secret.txt": "outside_source", "up.txt": "outside_source"}
    assert (q["sha256"] == "").all()  # never read
    assert "directory outside" in q.set_index("source")["detail"]["elsewhere"]
    cells = " ".join(map(str, [*docs.to_numpy().ravel(), *q.to_numpy().ravel()]))
    assert "SECRET" not in cells and "root:x:0" not in cells
    assert summary["quarantined_outside_source"] == 4 and summary["files"] == 7


def test_special_files_are_quarantined_without_blocking(tmp_path):
    src = write(tmp_path / "src", {"ok.txt": "An ordinary document.\n"})
    os.mkfifo(src / "pipe.txt")  # reading it would wait for a writer forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock.md"))
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=run(src, tmp_path / "out")), daemon=True)
    worker.start()
    worker.join(timeout=120)
    try:
        assert not worker.is_alive(), "ingest blocked on the fifo"
    finally:
        if worker.is_alive():  # release a reader stuck in open(): give it a writer
            os.close(os.open(src / "pipe.txt", os.O_WRONLY | os.O_NONBLOCK))
        sock.close()
    docs, q, _ = result["r"]
    assert docs["source"].tolist() == ["ok.txt"]
    detail = q.set_index("source")["detail"]
    assert q.set_index("source")["reason"].to_dict() == {"pipe.txt": "outside_source", "sock.md": "outside_source"}
    assert "fifo" in detail["pipe.txt"] and "socket" in detail["sock.md"]


ENCODED = {  # file -> (text, bytes on disk, encoding recorded)
    "cp1252.txt": (t := "\u201cSmart quotes\u201d cost 5 \u20ac at the caf\u00e9 \u2014 na\u00efve.\n",
                   t.encode("cp1252"), "cp1252"),
    # Latin-1 text (no bytes 0x80-0x9f) is byte-identical to cp1252, and recorded as cp1252
    "latin1.md": (t := "Gr\u00fc\u00dfe aus K\u00f6ln, \u00e9t\u00e9 \u00e0 la plage. \u00abbonjour\u00bb\n",
                  t.encode("latin-1"), "cp1252"),
    "french.txt": (t := "Le caf\u00e9 co\u00fbte 5\u20ac. \u201cC\u2019est la vie\u201d, dit-il \u2014 \u00e0 l\u2019\u00e9t\u00e9.\n" * 20,
                   t.encode("cp1252"), "cp1252"),
    "russian.txt": (t := "\u0421\u044a\u0435\u0448\u044c \u0436\u0435 \u0435\u0449\u0451 \u044d\u0442\u0438\u0445 "
                         "\u043c\u044f\u0433\u043a\u0438\u0445 \u0444\u0440\u0430\u043d\u0446\u0443\u0437\u0441\u043a\u0438\u0445 "
                         "\u0431\u0443\u043b\u043e\u043a, \u0434\u0430 \u0432\u044b\u043f\u0435\u0439 \u0447\u0430\u044e.\n",
                    t.encode("cp1251"), "cp1251"),
    "utf16.txt": (t := "Notepad\u2019s \u201cUnicode\u201d: caf\u00e9.\n", t.encode("utf-16"), "utf-16"),
    "utf8.txt": (t := "Plain UTF-8: caf\u00e9 \u2014 \u20ac.\n", t.encode(), "utf-8"),
}


def test_legacy_encodings_are_detected_and_recorded(tmp_path):
    page = "<html><body><p>Caf\u00e9 cr\u00e8me \u2014 \u201cbr\u00fbl\u00e9e\u201d.</p></body></html>"
    src = write(tmp_path / "src", {**{name: raw for name, (_, raw, _) in ENCODED.items()},
                                   "page.html": page.encode("cp1252")})
    docs, q, _ = run(src, tmp_path / "out")
    assert q.empty, q.to_string()
    docs = docs.set_index("source")
    for name, (text, _, encoding) in ENCODED.items():
        assert (docs.loc[name, "text"], docs.loc[name, "encoding"]) == (text, encoding), name
    assert docs.loc["page.html", "text"] == "Caf\u00e9 cr\u00e8me \u2014 \u201cbr\u00fbl\u00e9e\u201d.\n"
    assert docs.loc["page.html", "encoding"] == "cp1252" and (docs["replaced_chars"] == 0).all()


def test_damaged_utf8_binary_and_unsure_encodings(tmp_path):
    text = "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve \u00fcber. "
    src = write(tmp_path / "src", {
        # mostly UTF-8 with one bad byte: kept as UTF-8, the byte becomes U+FFFD (not cp932 mojibake)
        "damaged.txt": text.encode() * 3 + b"\xff and on.\n",
        "binary.txt": bytes(b for b in random.Random(0).randbytes(4096) if b),  # no NULs to give it away
        "binary.md": bytes(range(1, 256)) * 8,
        # seven bytes of cp1251 read equally well as Big5, Shift JIS, GB18030...: not confident
        "short-cyrillic.txt": "\u043f\u0440\u0438\u0432\u0435\u0442\n".encode("cp1251"),
    })
    docs, q, _ = run(src, tmp_path / "out")
    assert docs["source"].tolist() == ["damaged.txt"]
    damaged = docs.iloc[0]
    assert damaged["text"] == text * 3 + "\ufffd and on.\n"
    assert (damaged["encoding"], damaged["replaced_chars"]) == ("utf-8", 1)
    assert q.set_index("source")["reason"].to_dict() == {
        "binary.md": "wrong_type", "binary.txt": "wrong_type", "short-cyrillic.txt": "wrong_type"}
    assert "ambiguous encoding" in q.set_index("source")["detail"]["short-cyrillic.txt"]


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
