"""The guard steps of the pipeline (book ch. 4.4): the input safety filter, the response safety evaluator and the
rejection response generator, over forgeline/safety.py's Guard (rules plus the `safety` stage's classifier):

    guard.check_input(text) -> safety.Verdict          guard.check_output(text, secrets=[canary]) -> safety.Verdict

**The canary.** The system prompt carries a secret. The evaluator passes it to `check_output` on every reply, and
a stream releases text only after that check passed the whole text so far (every few tokens), so no piece holding
the secret, plainly or encoded, is sent: enforced, not left to the small model. Without a guard (a bare model
folder) the canary rule (forgeline.safety's `leaked_secret`) still runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from forgeline.safety import leaked_secret

RULE_REASONS = ("secret_leak", "pii", "prompt_extraction")   # categories that name their own refusal


@dataclass
class Verdict:
    allowed: bool
    reason: str = ""              # why refused: input_unsafe, output_unsafe, secret_leak, pii, prompt_extraction, ...
    category: str = ""            # what the guard saw (e.g. violence_weapons, pii)
    scores: dict = field(default_factory=dict)
    message: str = ""             # the guard's sentence on it (never the secret or the PII itself)


def as_verdict(v, default_reason: str) -> Verdict:
    """forgeline.safety's Verdict (flagged, category, score, reason) as this pipeline's."""
    if not v.flagged:
        return Verdict(True, scores={"harm": float(v.score)})
    reason = v.category if v.category in RULE_REASONS else default_reason
    return Verdict(False, reason, v.category, {v.category: float(v.score)}, v.reason)


def check_secret(text: str, secret: str) -> Verdict:
    """The canary rule alone: cheap enough to run after every streamed token."""
    how = leaked_secret(text, secret)
    return Verdict(False, "secret_leak", "secret_leak", {"secret_leak": 1.0},
                   f"the reply contains a protected secret ({how})") if how else Verdict(True)


def rejection_reply(reason: str, category: str = "", detail: str = "") -> str:
    """The reply the user gets instead of an answer: what happened and what they can do; never empty."""
    what = f" ({category.replace('_', ' ')})" if category else ""
    replies = {
        "input_unsafe": f"I can't help with that request: my safety check flagged it{what}. "
                        "If I misread you, please rephrase what you need.",
        "output_unsafe": f"I wrote an answer but held it back: my response check flagged it{what}. "
                         "Please try asking in another way.",
        "secret_leak": "I can't share my instructions or anything secret they contain. "
                       "Ask me something else and I'll gladly help.",
        "prompt_extraction": "I can't show or repeat my instructions. Ask me something else and I'll gladly help.",
        "pii": "I can't take or give personal data such as card, account or ID numbers and credentials. "
               "Please leave them out and ask again.",
        "session_turn_limit": f"This conversation has reached its limit of turns{detail}. Please start a new session.",
        "session_token_limit": f"This conversation has used up its token budget{detail}. Please start a new session.",
        "empty_reply": "I couldn't come up with an answer to that. Could you ask it in another way?",
    }
    return replies.get(reason, f"I can't answer that request ({reason.replace('_', ' ')}). Please rephrase it.")
