"""The guard steps of the pipeline (book ch. 4.4): the input safety filter, the response safety evaluator, the
system prompt's secret kept out of every reply, and the rejection response generator.

The classifier and the PII rules are forgeline/safety.py's Guard (the `safety` stage's model); this module only
calls it, through two methods any guard provides:

    guard.check_input(text) -> verdict      guard.check_output(text) -> verdict

where a verdict has `allowed: bool` (or `flagged`), and optionally `reason`, `category` and `scores`.

**The canary.** The system prompt carries a secret; `secret_leak` finds it in a reply written plainly, in other
case, spaced or dotted letters, reversed, ROT13, base64 or hex, whole or any 8 characters of it in a row. The
evaluator runs it on every reply (and on a stream before each piece is released), so the secret stays in
whatever the small model writes: enforced, not left to luck.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import re
from dataclasses import dataclass, field

FRAGMENT = 8          # this many characters of the secret in a row count as a leak


@dataclass
class Verdict:
    allowed: bool
    reason: str = ""              # machine-readable: input_unsafe, output_unsafe, secret_leak, pii, ...
    category: str = ""            # what the guard saw (e.g. violence, pii:email)
    scores: dict = field(default_factory=dict)


def as_verdict(v, reason: str) -> Verdict:
    """A guard's answer as a Verdict: objects with `allowed` or `flagged`, or a bool (True = allowed)."""
    if isinstance(v, Verdict):
        return v
    if isinstance(v, bool):
        return Verdict(v, "" if v else reason)
    allowed = bool(v.allowed) if hasattr(v, "allowed") else not bool(v.flagged)
    category = str(getattr(v, "category", "") or "")
    scores = dict(getattr(v, "scores", None) or {})
    return Verdict(allowed, "" if allowed else (getattr(v, "reason", "") or reason), category, scores)


def _alnum(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _decoded_runs(text: str) -> list[str]:
    """Text hidden in base64 (standard or URL-safe) or hex runs of >= 12 characters in `text`, each tried
    from its first few offsets (a run may start mid-group); undecodable ones skipped."""
    out = []
    for run in re.findall(r"[A-Za-z0-9+/=_-]{12,}", text):
        std = run.replace("-", "+").replace("_", "/").rstrip("=")
        for start in range(4):
            part = std[start:]
            try:
                out.append(base64.b64decode(part[: len(part) // 4 * 4], validate=True).decode("latin-1"))
            except (binascii.Error, ValueError):
                pass
        for start in range(2):
            part = run[start:]
            try:
                out.append(bytes.fromhex(part[: len(part) // 2 * 2]).decode("latin-1"))
            except ValueError:
                pass
    return out


def secret_leak(text: str, secret: str) -> str | None:
    """How `text` gives away `secret` ('plain', 'reversed', 'rot13', 'encoded'), or None.

    Compared on letters and digits only, lower-cased, so spacing, dots, dashes and case do not hide it;
    any FRAGMENT characters of it in a row count."""
    key = _alnum(secret)
    if not key:
        return None
    frags = {key[i:i + FRAGMENT] for i in range(max(1, len(key) - FRAGMENT + 1))}
    forms = {"plain": _alnum(text), "reversed": _alnum(text)[::-1], "rot13": _alnum(codecs.encode(text, "rot13"))}
    forms["encoded"] = "|".join(_alnum(d) for d in _decoded_runs(text))
    for how, form in forms.items():
        if any(f in form for f in frags):
            return how
    return None


def rejection_reply(reason: str, category: str = "", detail: str = "") -> str:
    """The reply the user gets instead of an answer: what happened and what they can do; never empty."""
    what = f" ({category})" if category else ""
    replies = {
        "input_unsafe": f"I can't help with that request: my safety check flagged it{what}. "
                        "If I misread you, please rephrase what you need.",
        "output_unsafe": f"I wrote an answer but held it back: my response check flagged it{what}. "
                         "Please try asking in another way.",
        "secret_leak": "I can't share my instructions or anything secret they contain. "
                       "Ask me something else and I'll gladly help.",
        "pii": f"I can't help with personal data{what}. Please leave out names, addresses, numbers and the like.",
        "session_turn_limit": f"This conversation has reached its limit of turns{detail}. Please start a new session.",
        "session_token_limit": f"This conversation has used up its token budget{detail}. Please start a new session.",
        "empty_reply": "I couldn't come up with an answer to that. Could you ask it in another way?",
        "timeout": "I ran out of time writing the answer. Please try a shorter question.",
    }
    return replies.get(reason, f"I can't answer that request ({reason}). Please try again or rephrase it.")
