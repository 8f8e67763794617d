"""Ingest: read every raw document under `source` (a local folder or s3://bucket/prefix) into one
table of plain text, and set aside what cannot be read. Text, Markdown and HTML (optionally
gzip-compressed) are decoded here, in whatever encoding charset-normalizer detects; PDFs and images are untrusted and are parsed in a child process
under an address-space limit and a wall-clock timeout. PDF pages without a usable text layer, and
images, are rendered and OCR'd by tesseract (in-process, one engine per OCR thread: tesserocr),
several pages at once, while the child renders on.
A bad file becomes a quarantine row with a reason, never a failed run. Only regular files inside
the source root are read: a link that leaves the root, and any fifo, device or socket, is
quarantined unopened (a fifo would block the read forever).

Outputs in out_dir: documents.parquet (one row per file; a PDF's pages joined by form feed "\\f",
each page's OCR word confidence in page_ocr_confidence),
quarantine.parquet (source, sha256, reason, detail) and summary.json (counts, pages/s).

    python -m tasks.ingest [key=value ...]
    python -m tasks.ingest config=configs/rag_ingest.yaml   # the same module as another pipeline's stage rag_ingest
"""
from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import posixpath
import re
import resource
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.paths import ROOT
from forgeline.tracking import stage_run

# pyarrow, fsspec, pypdfium2, PIL and mlflow are imported inside functions: the parser child
# imports this module and should start fast and small.

MB = 1 << 20
REASONS = ("corrupt", "encrypted", "empty", "wrong_type", "oversized", "timeout",
           "resource_limit", "ocr_failed", "unsupported", "outside_source")
TEXT_KINDS = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}
PARSED_KINDS = {".pdf": "pdf", ".png": "image", ".jpg": "image", ".jpeg": "image",
                ".tif": "image", ".tiff": "image"}
MAGIC = [(b"%PDF-", "PDF"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"),
         (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"),
         (b"\x7fELF", "ELF")]
# a byte order mark names its encoding outright (UTF-32 LE's begins with UTF-16 LE's: test it first)
BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16")]
# charset-normalizer candidates whose mess ratio (0-1) is within this of the best one are a tie, and
# on a tie cp1252 wins: it is the web's default for undeclared text (WHATWG), and Latin-1 text is
# byte-identical to it. charset-normalizer 3.5 alone reads French cp1252 as cp1250 (à -> ŕ) and
# short texts as cp775 or hp_roman8.
CP1252_TIE = 0.1
EXIT_MEMORY = 3  # the parser child's exit status after a MemoryError


@dataclass
class IngestConfig:
    source: str = "data/raw"  # local folder or s3://bucket/prefix (read through fsspec/s3fs)
    out_dir: str = "data/ingest"
    # fsspec options for `source`, e.g. {endpoint_url: http://localhost:9000} for MinIO.
    # Credentials come from the environment (AWS_*): these values are logged as MLflow params.
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_file_mb: float = 64.0  # MiB; a larger file, or text over this after gunzip -> oversized
    max_pages: int = 2000  # a PDF (or multi-frame TIFF) with more pages -> oversized
    max_image_pixels: int = 50_000_000  # px per image or rendered page (A4 at 300 dpi is 8.7 Mpx)
    min_text_chars: int = 20  # a PDF page with fewer non-space chars in its text layer is OCR'd
    min_printable_ratio: float = 0.95  # share of printable/whitespace chars; below -> wrong_type
    parse_timeout_s: float = 300.0  # wall clock for the child to parse + render one PDF or image
    parse_memory_mb: int = 2048  # MiB of address space for the parser child (RLIMIT_AS)
    ocr_dpi: int = 300  # render resolution of PDF pages sent to OCR
    ocr_lang: str = "eng"  # tesseract language(s), e.g. "eng+fra"
    ocr_tessdata: str = ""  # folder of <lang>.traineddata; "" = $TESSDATA_PREFIX or the system's
    ocr_timeout_s: float = 120.0  # wall clock for tesseract on one page
    ocr_workers: int = 2  # pages OCR'd at once (one single-threaded tesseract engine each)
    # a scanned page tilted by up to this many degrees is straightened before OCR (0: never)
    ocr_max_skew_deg: float = 5.0

    def check(self) -> None:
        if self.ocr_workers < 1:
            raise ConfigError(f"ocr_workers={self.ocr_workers}: must be >= 1")
        if not 72 <= self.ocr_dpi <= 1200:
            raise ConfigError(f"ocr_dpi={self.ocr_dpi}: must be within 72..1200")
        for name in ("max_file_mb", "parse_timeout_s", "ocr_timeout_s", "max_pages", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be > 0")
        if not 0.0 <= self.ocr_max_skew_deg <= 45.0:
            raise ConfigError(f"ocr_max_skew_deg={self.ocr_max_skew_deg}: must be within 0..45")
        if self.parse_memory_mb < 128:
            raise ConfigError(f"parse_memory_mb={self.parse_memory_mb}: the parser child needs >= 128")
        if not 0.0 <= self.min_printable_ratio <= 1.0:
            raise ConfigError(f"min_printable_ratio={self.min_printable_ratio}: must be within 0..1")


class Quarantine(Exception):
    """A file that cannot become a document: `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- text helpers
def kind_of(name: str) -> tuple[str | None, bool]:
    """(kind, gzipped) from the file name; kind None when the type is not supported."""
    low = name.lower()
    gz = low.endswith(".gz")
    ext = posixpath.splitext(low[:-3] if gz else low)[1]
    if ext in TEXT_KINDS:
        return TEXT_KINDS[ext], gz
    return (None if gz else PARSED_KINDS.get(ext)), gz


def sniff(data: bytes) -> str | None:
    return next((name for magic, name in MAGIC if data.startswith(magic)), None)


def printable_ratio(text: str) -> float:
    if not text:
        return 1.0
    counts = Counter(text)  # counts in C; the per-character test runs once per distinct char
    bad = sum(n for ch, n in counts.items() if not (ch.isprintable() or ch.isspace()))
    return 1.0 - bad / len(text)


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress (multi-member) gzip, refusing more than `limit` bytes of output."""
    out, rest = bytearray(), data
    while rest:
        d = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        try:
            out += d.decompress(rest, limit + 1 - len(out))
        except zlib.error as e:
            raise Quarantine("corrupt", f"gzip: {e}") from None
        if len(out) > limit:
            raise Quarantine("oversized", f"over {limit / MB:g} MiB after decompression")
        if not d.eof:
            raise Quarantine("corrupt", "gzip: truncated stream")
        rest = d.unused_data
    return bytes(out)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: script/style dropped, block elements end lines."""
    SKIP = {"script", "style", "noscript", "template"}
    BLOCK = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption",
             "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol",
             "p", "pre", "section", "table", "td", "th", "title", "tr", "ul"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.skip += tag in self.SKIP
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = (line.strip() for line in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def detect_encoding(data: bytes) -> str:
    """The legacy encoding of non-UTF-8 text, by charset-normalizer; raises Quarantine when unsure."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))  # best first; only candidates under 20% mess are returned
    if not matches:
        raise Quarantine("wrong_type", "not text: no encoding decodes it without mess (charset-normalizer)")
    best = matches[0]
    if any("cp1252" in m.could_be_from_charset for m in matches if m.chaos <= best.chaos + CP1252_TIE):
        return "cp1252"
    # otherwise the best must stand alone: equal mess and coherence with a different reading is a guess
    rivals = [m.encoding for m in matches[1:8] if m.chaos <= best.chaos + 0.01
              and m.coherence >= best.coherence - 0.01 and str(m) != str(best)]
    if rivals:
        raise Quarantine("wrong_type", f"ambiguous encoding: {best.encoding} and {', '.join(rivals)} "
                                       "fit equally well (charset-normalizer)")
    return best.encoding


def decode(data: bytes) -> tuple[str, str, int]:
    """(text, encoding, U+FFFD characters put in for undecodable bytes); raises Quarantine.

    UTF-8 first. A file that is mostly UTF-8 (more valid multi-byte characters than invalid
    sequences) is UTF-8 with a few damaged bytes: those become U+FFFD and are counted, rather than
    the whole file turning to mojibake under a legacy encoding. Anything else goes to detect_encoding.
    """
    for bom, encoding in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding, 0  # the codec drops the BOM
            except UnicodeDecodeError as e:
                raise Quarantine("wrong_type", f"not {encoding} despite its byte order mark: {e.reason}") from None
    if b"\x00" in data:
        raise Quarantine("wrong_type", "binary data (NUL bytes)")
    try:
        return data.decode("utf-8-sig"), "utf-8", 0  # strict; a leading BOM is dropped
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8-sig", "replace")
    replaced = text.count("\ufffd") - data.count("\ufffd".encode())
    multibyte = len(text) - len(text.encode("ascii", "ignore")) - text.count("\ufffd")
    if multibyte > replaced:
        return text, "utf-8", replaced
    encoding = detect_encoding(data)
    return data.decode(encoding), codecs.lookup(encoding).name, 0


def read_text(data: bytes, kind: str, gz: bool, limit: int) -> tuple[str, str, int]:
    """Bytes of a txt/md/html file -> (text, encoding, replaced characters); raises Quarantine."""
    if gz:
        if not data.startswith(b"\x1f\x8b"):
            raise Quarantine("wrong_type", f"not gzip data ({sniff(data) or 'unknown'} content)")
        data = gunzip(data, limit)
    # known binary formats first: charset-normalizer would happily "decode" some of them
    if (fmt := sniff(data)) is not None:
        raise Quarantine("wrong_type", f"{fmt} data in a {kind} file")
    text, encoding, replaced = decode(data)
    text = text.replace("\r\n", "\n")
    return (html_to_text(text) if kind == "html" else text), encoding, replaced


# ---------------------------------------------------------------- parser child (PDF, images)
def _extract_pdf(path: str, workdir: Path, lim: dict, emit: Callable[..., None]) -> None:
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as e:
        # pdfium error codes: 4 = password required, 5 = unsupported security handler
        raise Quarantine("encrypted" if e.err_code in (4, 5) else "corrupt", str(e)) from None
    n = len(doc)
    if n == 0:
        raise Quarantine("corrupt", "PDF has no pages")
    if n > lim["max_pages"]:
        raise Quarantine("oversized", f"{n} pages > max_pages={lim['max_pages']}")
    emit(pages=n)
    scale = lim["dpi"] / 72  # PDF units are points (1/72 in)
    for i in range(n):
        page = doc[i]
        textpage = page.get_textpage()
        # pdfium marks a hyphenated line break with U+FFFE and joins the word halves
        text = textpage.get_text_range().replace("\r\n", "\n").replace("\ufffe", "")
        textpage.close()
        if (len("".join(text.split())) >= lim["min_text_chars"]
                and printable_ratio(text) >= lim["min_printable_ratio"]):
            emit(page=i, text=text)
        else:
            w, h = (math.ceil(v * scale) for v in page.get_size())
            if w * h > lim["max_pixels"]:
                raise Quarantine("oversized", f"page {i + 1} renders to {w}x{h} px at {lim['dpi']} dpi "
                                              f"> max_image_pixels={lim['max_pixels']}")
            # uncompressed 8-bit grey (PGM): 0.004 s to write and read at 300 dpi, PNG took 0.23 s
            image = workdir / f"page{i:05d}.pgm"
            page.render(scale=scale, grayscale=True).to_pil().convert("L").save(image)
            emit(page=i, image=str(image), dpi=lim["dpi"])
        page.close()


def _extract_image(path: str, workdir: Path, lim: dict, emit: Callable[..., None]) -> None:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = lim["max_pixels"]  # PIL's own decompression-bomb guard, on top of ours
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise Quarantine("oversized", f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Quarantine("corrupt", f"{type(e).__name__}: {e}") from None
    n = getattr(im, "n_frames", 1)
    if n > lim["max_pages"]:
        raise Quarantine("oversized", f"{n} frames > max_pages={lim['max_pages']}")
    emit(pages=n)
    for i, frame in enumerate(ImageSequence.Iterator(im)):
        w, h = frame.size
        if w * h > lim["max_pixels"]:
            raise Quarantine("oversized", f"image {w}x{h} px > max_image_pixels={lim['max_pixels']}")
        try:
            frame.load()
            if frame.mode in ("RGBA", "LA", "PA") or "transparency" in frame.info:
                rgba = frame.convert("RGBA")  # transparent pixels would turn black: put them on white
                gray = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")
            else:
                gray = frame.convert("L")
        except (OSError, SyntaxError, ValueError) as e:
            raise Quarantine("corrupt", f"frame {i + 1}: {type(e).__name__}: {e}") from None
        dpi = frame.info.get("dpi", (0, 0))[0]
        image = workdir / f"page{i:05d}.pgm"  # uncompressed: cheap to write and read, see above
        gray.save(image)
        emit(page=i, image=str(image), dpi=round(dpi) if 70 <= dpi <= 2400 else lim["dpi"])


def _extract_main(args: list[str]) -> None:
    """Child entry: `python -m tasks.ingest --extract KIND FILE WORKDIR LIMITS_JSON`.

    Writes one JSON message per line to stdout: {"pages": n}, then per page {"page": i, "text": ...}
    or {"page": i, "image": pgm, "dpi": d}, then {"done": true} or {"error": reason, "detail": ...}.
    """
    kind, path, workdir, lim = args[0], args[1], Path(args[2]), json.loads(args[3])
    # limits first, before the untrusted file is touched (never above a hard limit set outside)
    for which, want in ((resource.RLIMIT_AS, lim["memory_mb"] * MB),
                        # CPU-s: a backstop should the parent die; the wall clock is the parent's job
                        (resource.RLIMIT_CPU, math.ceil(lim["timeout_s"]) + 1)):
        hard = resource.getrlimit(which)[1]
        resource.setrlimit(which, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    # messages go to a private copy of stdout; fd 1 now points at stderr, so whatever a C library
    # prints cannot corrupt them
    messages = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def emit(**msg: Any) -> None:
        messages.write(json.dumps(msg) + "\n")
        messages.flush()

    try:
        (_extract_pdf if kind == "pdf" else _extract_image)(path, workdir, lim, emit)
        emit(done=True)
    except Quarantine as q:
        emit(error=q.reason, detail=q.detail)
    except MemoryError:
        os._exit(EXIT_MEMORY)  # the heap is gone: do not try to format anything
    except Exception as e:  # any other parser failure is a property of the file
        emit(error="corrupt", detail=f"{type(e).__name__}: {e}"[:500])


def run_parser(path: str, kind: str, workdir: Path, cfg: IngestConfig,
               on_message: Callable[[dict], None]) -> None:
    """Run the parser child on one file, passing its messages on; raises Quarantine."""
    lim = {"memory_mb": cfg.parse_memory_mb, "timeout_s": cfg.parse_timeout_s, "dpi": cfg.ocr_dpi,
           "max_pages": cfg.max_pages, "max_pixels": cfg.max_image_pixels,
           "min_text_chars": cfg.min_text_chars, "min_printable_ratio": cfg.min_printable_ratio}
    cmd = [sys.executable, "-m", "tasks.ingest", "--extract", kind, path, str(workdir), json.dumps(lim)]
    expired = threading.Event()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a chatty child cannot block on it
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)

        def expire() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(cfg.parse_timeout_s, expire)
        timer.start()
        finished = False
        try:
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    raise Quarantine("corrupt", f"parser protocol error: {line[:100]!r}") from None
                if "error" in msg:
                    raise Quarantine(msg["error"], msg["detail"])
                finished = finished or msg.get("done", False)
                on_message(msg)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read()[-2000:]
    rc = proc.returncode
    if finished and rc == 0:
        return
    if expired.is_set():
        raise Quarantine("timeout", f"parsing took over parse_timeout_s={cfg.parse_timeout_s:g} s")
    if rc == -signal.SIGXCPU:
        raise Quarantine("timeout", f"parser used over {math.ceil(cfg.parse_timeout_s) + 1} CPU-s")
    if rc == EXIT_MEMORY or rc == -signal.SIGKILL or "MemoryError" in stderr or "bad_alloc" in stderr:
        raise Quarantine("resource_limit", f"parser ran out of memory (parse_memory_mb={cfg.parse_memory_mb})")
    how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    tail = (stderr.strip().splitlines() or [""])[-1]
    raise Quarantine("corrupt", f"parser crashed ({how}) {tail}".strip())


# ---------------------------------------------------------------- OCR
def tsv_to_text(tsv: str) -> tuple[str, list[float]]:
    """tesseract TSV -> (text with lines and paragraphs kept, word confidences 0-100)."""
    out: list[str] = []
    confs: list[float] = []
    prev = None
    for row in tsv.splitlines():
        f = row.split("\t")
        if len(f) < 12 or f[0] != "5" or not f[11].strip():  # level 5 = word (not a header row)
            continue
        key = (f[2], f[3], f[4])  # block, paragraph, line
        if prev is not None:
            out.append(" " if key == prev else "\n" if key[:2] == prev[:2] else "\n\n")
        out.append(f[11])
        prev = key
        if float(f[10]) >= 0:
            confs.append(float(f[10]))
    return "".join(out) + "\n", confs


def otsu_threshold(gray: Any) -> int:
    """The grey level that best splits ink from paper (Otsu: the largest between-class variance)."""
    import numpy as np

    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    w = np.cumsum(hist) / hist.sum()  # share of pixels at or below each level
    mu = np.cumsum(hist * np.arange(256)) / hist.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w - mu) ** 2 / (w * (1 - w))
    return int(np.nanargmax(between)) if not np.isnan(between).all() else 127  # one grey level: blank


def skew_angle(ink: Any, max_deg: float) -> float:
    """Degrees (counter-clockwise) by which the text lines of a page are tilted; 0.0 if unsure.

    The tilt that makes the ink's row profile the most peaked (sum of squared row counts) is the
    one that lines up the text lines: a sweep in 0.5° steps, then 0.05° around the best.
    """
    import numpy as np

    ys, xs = np.nonzero(ink)
    if len(ys) < 100:  # no text to line up
        return 0.0
    xs = xs - ink.shape[1] / 2

    def best(angles: Any) -> float:
        scores = []
        for a in angles:
            rows = np.round(ys + xs * math.tan(math.radians(a))).astype(np.int64)
            counts = np.bincount(rows - rows.min()).astype(np.float64)
            scores.append(counts @ counts)
        return float(angles[int(np.argmax(scores))])

    coarse = best(np.linspace(-max_deg, max_deg, 2 * math.ceil(max_deg / 0.5) + 1))
    return best(np.clip(np.arange(coarse - 0.5, coarse + 0.5 + 1e-9, 0.05), -max_deg, max_deg))


def prepare_page(image: Any, max_skew_deg: float) -> Any:
    """A page image (PIL) -> the 8-bit grey array tesseract reads best and fastest.

    Straightened: tesseract cuts each text line out as an upright box, so a line tilted by 1° is
    cut with the ends of its neighbours in it (CER 0.52 % -> 0.44 % on bench_ingest's scans).
    Paper made pure white (above the Otsu threshold, which tesseract would binarise with anyway;
    the ink keeps its grey edges for the LSTM): tesseract PNG-compresses every line image it
    recognises, and deflating paper noise was 13 % of its time (1.75 -> 1.49 CPU-s a page).
    """
    import numpy as np
    from PIL import Image

    gray = image.convert("L")
    if max_skew_deg > 0 and min(gray.size) >= 64:
        small = np.asarray(gray.reduce(4))  # 75 dpi is plenty to see lines: 0.01 s a page
        angle = skew_angle(small < otsu_threshold(small), max_skew_deg)
        if abs(angle) >= 0.05:  # nearest neighbour: as accurate here as bilinear, 5x cheaper
            gray = gray.rotate(-angle, resample=Image.Resampling.NEAREST, fillcolor=255)
    pixels = np.asarray(gray)
    return np.where(pixels > otsu_threshold(pixels), np.uint8(255), pixels)


# tessdata folders of Debian/Ubuntu (apt tesseract-ocr-<lang>), Fedora and a source build
TESSDATA_DIRS = ("/usr/share/tesseract-ocr/5/tessdata", "/usr/share/tesseract-ocr/4.00/tessdata",
                 "/usr/share/tessdata", "/usr/local/share/tessdata")
_engines = threading.local()  # this OCR thread's tesseract engines, by (lang, tessdata)


def tessdata_dir(cfg: IngestConfig) -> str:
    if cfg.ocr_tessdata:
        return cfg.ocr_tessdata
    lang = cfg.ocr_lang.split("+")[0]
    dirs = [d for d in (os.environ.get("TESSDATA_PREFIX"), *TESSDATA_DIRS) if d]
    return next((d for d in dirs if Path(d, f"{lang}.traineddata").is_file()), dirs[0])


def ocr_engine(cfg: IngestConfig) -> Any:
    """This thread's tesseract engine for cfg's language, loaded once (not once per page)."""
    try:
        import tesserocr
    except ImportError as e:
        raise ImportError(f"OCR needs tesserocr (requirements.txt; bash scripts/install.sh): {e}") from e
    key = (cfg.ocr_lang, tessdata_dir(cfg))
    if not hasattr(_engines, "by_key"):
        _engines.by_key = {}
    engines = _engines.by_key
    if key not in engines:
        try:
            engines[key] = tesserocr.PyTessBaseAPI(path=key[1], lang=key[0])
        except RuntimeError as e:
            raise Quarantine("ocr_failed", f"tesseract cannot load {key[0]!r} from {key[1]}: {e}") from None
    return engines[key]


def ocr_page(image: str, dpi: int, cfg: IngestConfig) -> tuple[str, list[float]]:
    """OCR one page image (deleted afterwards); raises Quarantine.

    In-process (tesserocr releases the GIL): a tesseract process per page paid 0.3 CPU-s a page
    for start, model load and image files. The image it reads is no longer the untrusted file but
    the parser child's own rendering of it, within max_image_pixels.
    """
    from PIL import Image

    try:
        with Image.open(image) as im:
            pixels = prepare_page(im, cfg.ocr_max_skew_deg)
    finally:
        Path(image).unlink(missing_ok=True)
    api = ocr_engine(cfg)
    height, width = pixels.shape
    api.SetImageBytes(pixels.tobytes(), width, height, 1, width)
    api.SetSourceResolution(dpi)
    t0 = time.perf_counter()
    if not api.Recognize(timeout=max(1, round(cfg.ocr_timeout_s * 1000))):
        if time.perf_counter() - t0 >= cfg.ocr_timeout_s:
            raise Quarantine("timeout", f"OCR of a page took over ocr_timeout_s={cfg.ocr_timeout_s:g} s")
        raise Quarantine("ocr_failed", "tesseract could not recognise the page")
    return tsv_to_text(api.GetTSVText(0))


# ---------------------------------------------------------------- one file
@dataclass
class Pending:
    """A file read and parsed, whose OCR'd pages may still be running."""
    source: str
    sha256: str = ""
    kind: str = ""
    pages: list[str | Future] = field(default_factory=list)
    error: Quarantine | None = None
    encoding: str | None = None  # of a text file; None for PDFs and images (pdfium and OCR give text)
    replaced_chars: int = 0  # U+FFFD put in for undecodable bytes of a mostly-UTF-8 file

    def ocr_running(self) -> int:
        return sum(isinstance(p, Future) and not p.done() for p in self.pages)

    def result(self, cfg: IngestConfig) -> dict:
        """The documents row, or the quarantine row (has "reason")."""
        texts, confs, n_ocr = [], [], 0
        page_confs: list[float | None] = []  # per page: its mean word confidence, None = text layer
        n_futures = sum(isinstance(p, Future) for p in self.pages)
        for i, page in enumerate(self.pages):
            if not isinstance(page, Future):
                texts.append(page)
                page_confs.append(None)
            elif self.error is not None:
                page.cancel()  # the file is quarantined already: skip its pages not yet OCR'd
            else:
                try:
                    text, words = page.result()
                except Quarantine as q:
                    self.error = Quarantine(q.reason, f"page {i + 1}: {q.detail}")
                    continue
                n_ocr += 1
                confs += words
                page_confs.append(sum(words) / len(words) if words else None)
                texts.append(text)
                if n_futures >= 20 and n_ocr % 10 == 0:  # a long scan shows it is moving
                    print(f"    {self.source}: {n_ocr}/{n_futures} pages OCR'd", flush=True)
        text = "\f".join(texts)  # form feed between PDF pages, as pdftotext does
        if self.error is None and not text.strip():
            self.error = Quarantine("empty", "no text" + (" after OCR" if n_ocr else ""))
        ratio = printable_ratio(text)
        if self.error is None and ratio < cfg.min_printable_ratio:
            self.error = Quarantine("wrong_type", f"only {ratio:.0%} printable characters")
        if self.error is not None:
            return {"source": self.source, "sha256": self.sha256, "reason": self.error.reason,
                    "detail": self.error.detail}
        return {"doc_id": self.sha256[:16], "source": self.source, "sha256": self.sha256,
                "kind": self.kind, "encoding": self.encoding, "replaced_chars": self.replaced_chars,
                "pages": len(texts), "ocr": n_ocr > 0, "ocr_pages": n_ocr,
                "ocr_confidence": sum(confs) / len(confs) if confs else math.nan,
                # JSON list, one entry per page (null: read from the text layer, or no word found)
                "page_ocr_confidence": json.dumps([None if c is None else round(c, 2) for c in page_confs]),
                "n_chars": len(text), "printable_ratio": ratio, "text": text}


def read_local(path: str, limit: int) -> bytes:
    """A local regular file's bytes, opened without following a link or blocking on a fifo.

    list_files has set links and special files aside already; this holds should one appear
    between the listing and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if os.path.islink(path):  # O_NOFOLLOW refuses a link (ELOOP)
            raise Quarantine("outside_source", "became a symbolic link after listing: not followed") from None
        raise Quarantine("corrupt", f"unreadable: {e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Quarantine("outside_source", f"special file ({file_type(st.st_mode)}): never read")
        if st.st_size > limit:
            raise Quarantine("oversized", f"{st.st_size:,} bytes > max_file_mb={limit / MB:g} MiB")
        try:
            return f.read(limit + 1)
        except OSError as e:
            raise Quarantine("corrupt", f"unreadable: {e}") from None


def start_file(fs: Any, path: str, rel: str, cfg: IngestConfig, tmp: Path,
               pool: ThreadPoolExecutor) -> Pending:
    """Read one file and parse it; OCR'd pages are left running in `pool`."""
    item = Pending(rel)
    kind, gz = kind_of(rel)
    limit = int(cfg.max_file_mb * MB)
    try:
        if kind is None:
            raise Quarantine("unsupported", f"unsupported file type {posixpath.splitext(rel)[1] or rel!r}")
        if "file" in fs.protocol:
            data = read_local(path, limit)
        else:
            size = fs.size(path)
            if size > limit:
                raise Quarantine("oversized", f"{size:,} bytes > max_file_mb={cfg.max_file_mb:g} MiB")
            try:
                data = fs.cat_file(path)
            except OSError as e:
                raise Quarantine("corrupt", f"unreadable: {e}") from None
        if len(data) > limit:  # the file grew after its size was taken
            raise Quarantine("oversized", f"over max_file_mb={cfg.max_file_mb:g} MiB")
        item.sha256, item.kind = hashlib.sha256(data).hexdigest(), kind
        if kind in TEXT_KINDS.values():
            text, item.encoding, item.replaced_chars = read_text(data, kind, gz, limit)
            item.pages = [text]
            return item
        if kind == "pdf":  # readers accept a header anywhere in the first KiB
            fmt = "PDF" if b"%PDF-" in data[:1024] else sniff(data)
            ok = fmt == "PDF"
        else:
            fmt = sniff(data)
            ok = fmt in ("PNG", "JPEG", "TIFF")
        if not ok:
            raise Quarantine("wrong_type", f"{fmt or 'unknown'} data in a {kind} file")
        workdir = Path(tempfile.mkdtemp(dir=tmp))
        local = path
        if "file" not in fs.protocol:  # the child reads a local copy of a remote file
            local = str(workdir / "input")
            Path(local).write_bytes(data)
        del data

        def on_message(msg: dict) -> None:
            if "text" in msg:
                item.pages.append(msg["text"])
            elif "image" in msg:
                item.pages.append(pool.submit(ocr_page, msg["image"], msg["dpi"], cfg))

        try:
            run_parser(local, kind, workdir, cfg, on_message)
        finally:
            if local != path:
                Path(local).unlink()
    except Quarantine as q:
        item.error = q
    return item


def file_type(mode: int) -> str:
    return next((name for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"),
                                         (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                                         (stat.S_ISDIR, "directory"))
                 if test(mode)), "unknown type")


def list_local(root: str) -> tuple[list[tuple[str, str, Quarantine | None]], int]:
    """Walk a local source without following links: (path, rel, quarantine or None) per entry, and
    the number of links skipped because their target, inside the root, is listed under its own path."""
    real_root = os.path.realpath(root)

    def inside(target: str) -> bool:
        return os.path.commonpath([real_root, target]) == real_root

    entries, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: a linked dir is not entered
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(path)
                if not inside(target):
                    what = "directory" if os.path.isdir(target) else "file"
                    entries.append((path, rel, Quarantine(
                        "outside_source", f"symbolic link to a {what} outside the source root ({target}): "
                                          "not followed")))
                elif not os.path.exists(target):
                    entries.append((path, rel, Quarantine("corrupt", f"broken symbolic link to {target}")))
                else:
                    skipped += 1  # its target is ingested once, under the target's own path
            elif stat.S_ISDIR(st.st_mode):
                continue  # os.walk enters it
            elif not stat.S_ISREG(st.st_mode):
                entries.append((path, rel, Quarantine(
                    "outside_source", f"special file ({file_type(st.st_mode)}): never opened")))
            else:
                entries.append((path, rel, None))
    return sorted(entries, key=lambda e: e[1]), skipped


def list_files(fs: Any, root: str) -> tuple[list[tuple[str, str, Quarantine | None]], int]:
    """Sorted (path, path relative to root, quarantine or None) of every file under root, and the
    number of links skipped (see list_local). Object stores have no links or special files."""
    if "file" in fs.protocol and os.path.isdir(root):
        return list_local(root)
    if fs.isfile(root) or "file" in fs.protocol:  # a single file named as the source
        return [(root, posixpath.basename(root), None)], 0
    root = root.rstrip("/")
    return sorted((p, posixpath.relpath(p, root), None) for p in fs.find(root)), 0


# ---------------------------------------------------------------- the stage
DOC_COLUMNS = {"doc_id": "string", "source": "string", "sha256": "string", "kind": "string",
               "encoding": "string", "replaced_chars": "int64", "pages": "int64", "ocr": "bool",
               "ocr_pages": "int64", "ocr_confidence": "float64", "page_ocr_confidence": "string",
               "n_chars": "int64", "printable_ratio": "float64", "text": "string"}
QUARANTINE_COLUMNS = {"source": "string", "sha256": "string", "reason": "string", "detail": "string"}


def write_table(rows: list[dict], columns: dict[str, str], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.type_for_alias(t)) for name, t in columns.items()])
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # readers never see half a file


def ingest(cfg: IngestConfig) -> dict:
    """Ingest cfg.source into cfg.out_dir; returns the summary (also written to summary.json)."""
    import fsspec

    t0 = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(cfg.source, **cfg.storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"ingest source {cfg.source!r} does not exist")
    files, links_skipped = list_files(fs, root)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs, quarantine = [], []
    width = len(str(len(files)))
    inner = f" ({links_skipped} links inside the source skipped: their targets are listed)" if links_skipped else ""
    print(f"ingest: {len(files)} files from {cfg.source}{inner}", flush=True)

    def finish(item: Pending, i: int) -> None:
        row = item.result(cfg)
        if "reason" in row:
            quarantine.append(row)
            note = f"QUARANTINED {row['reason']}: {row['detail']}"
        else:
            docs.append(row)
            ocr = f", {row['ocr_pages']} OCR'd ({row['ocr_confidence']:.0f}% conf)" if row["ocr"] else ""
            enc = f", {row['encoding']}" if row["encoding"] not in (None, "utf-8") else ""
            bad = f", U+FFFD for {row['replaced_chars']} undecodable bytes" if row["replaced_chars"] else ""
            note = f"{row['kind']}{enc}{bad}, {row['pages']} p{ocr}, {row['n_chars']} chars"
        print(f"[{i + 1:>{width}}/{len(files)}] {item.source}: {note}", flush=True)

    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp, \
            ThreadPoolExecutor(cfg.ocr_workers, thread_name_prefix="ocr") as pool:
        pending: deque[Pending] = deque()
        done = 0
        try:
            for path, rel, refused in files:
                pending.append(Pending(rel, error=refused) if refused is not None
                               else start_file(fs, path, rel, cfg, Path(tmp), pool))
                # finish files in order as their OCR completes; a long OCR backlog holds back the
                # next parse, so rendered pages do not pile up on disk
                while pending and (pending[0].ocr_running() == 0
                                   or sum(p.ocr_running() for p in pending) > 4 * cfg.ocr_workers):
                    finish(pending.popleft(), done)
                    done += 1
            while pending:
                finish(pending.popleft(), done)
                done += 1
        except BaseException:
            pool.shutdown(cancel_futures=True)  # e.g. tesseract missing: do not OCR the backlog first
            raise

    write_table(docs, DOC_COLUMNS, out / "documents.parquet")
    write_table(quarantine, QUARANTINE_COLUMNS, out / "quarantine.parquet")
    seconds = time.perf_counter() - t0
    reasons = Counter(q["reason"] for q in quarantine)
    n_pages = sum(d["pages"] for d in docs)
    ocr_docs = [d for d in docs if d["ocr"] and not math.isnan(d["ocr_confidence"])]
    summary = {
        "files": len(files), "documents": len(docs), "quarantined": len(quarantine),
        **{f"quarantined_{r}": reasons.get(r, 0) for r in REASONS},
        "pages": n_pages, "ocr_pages": sum(d["ocr_pages"] for d in docs),
        # page-weighted mean of the documents' mean word confidence; None when nothing was OCR'd
        "ocr_confidence": (sum(d["ocr_confidence"] * d["ocr_pages"] for d in ocr_docs)
                           / sum(d["ocr_pages"] for d in ocr_docs)) if ocr_docs else None,
        "chars": sum(d["n_chars"] for d in docs),
        "seconds": round(seconds, 3), "pages_per_s": round(n_pages / seconds, 3),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"ingest: {summary['documents']} documents, {summary['quarantined']} quarantined "
          f"({dict(reasons)}), {n_pages} pages ({summary['ocr_pages']} OCR'd) in {seconds:.1f} s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--extract"]:  # the parser child, started by run_parser
        _extract_main(args[1:])
        return
    import mlflow
    import pandas as pd

    stage, cfg = stage_config(IngestConfig, "ingest", args)
    with stage_run(stage, config_dict(cfg)):
        summary = ingest(cfg)
        mlflow.log_metrics({k: float(v) for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        out = Path(cfg.out_dir)
        mlflow.log_artifact(str(out / "summary.json"))
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "quarantine.csv"
            pd.read_parquet(out / "quarantine.parquet").to_csv(csv, index=False)
            mlflow.log_artifact(str(csv))


def __getattr__(name: str):
    """`ingest_task`, the Prefect task, built on first access (PEP 562).

    The sandboxed parser child imports this module for every PDF and image; importing Prefect
    there would add over a CPU-second to each file. The flow gets a real Prefect task all the same.
    """
    if name != "ingest_task":
        raise AttributeError(name)
    from prefect import task

    from forgeline.workspace import run_stage

    @task(name="ingest", task_run_name="{stage}", retries=1, retry_delay_seconds=10)  # s3:// can fail transiently
    def ingest_task(run: dict[str, str], stage: str = "ingest") -> dict:
        return run_stage(stage, **run)

    globals()["ingest_task"] = ingest_task
    return ingest_task


if __name__ == "__main__":
    main()
