"""Smart Compose's phrase generator: beam search from a cached prompt, a confidence score, a cut at a
word boundary. One implementation for the evaluation stage (tasks/compose_eval.py) and the service
(serve/compose.py), so the threshold tuned on validation is the one the service applies.

The prompt is the text before the caret without its trailing spaces: the user just typed the space
that ends a word, and a byte-level BPE carries a word's leading space in the word's token, so the
model continues "Dear Miss" with " Bennet", not "Bennet". The prompt is the last tokens of the
text in a window whose start moves in steps of `window_stride` tokens, so consecutive keystrokes
share their cached prefix (a window sliding one token per keystroke would share none).

    composer = Composer.load("data/compose_eval/model")
    proposal, cache, computed = composer.propose("I am sure you will ", cache)
    if proposal and proposal.score >= composer.settings.threshold: show(proposal.text)
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from forgeline.chat import EOT
from forgeline.checkpoint import load_model_folder
from models.sampling import GenerationConfig, PromptCache, beam_search, extend_prompt_cache

SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


@dataclass(frozen=True)
class ComposeSettings:
    """Decoding and filtering settings; compose_eval writes them (with the tuned threshold) to the
    served model folder's compose.json."""
    num_beams: int = 4
    max_new_tokens: int = 8         # tokens a suggestion may take before the word-boundary cut
    max_words: int = 5              # longer suggestions are cut at a word boundary
    threshold: float = -math.inf    # length-normalised log-probability (mean per token) a suggestion needs
    context_tokens: int = 96        # at most this many prompt tokens (the window)
    window_stride: int = 32         # the window's start moves in these steps (cache reuse)
    # triggering
    min_prefix_words: int = 3       # no suggestion before this many words
    debounce_ms: int = 0            # no suggestion while keys come faster than this (client-reported idle time)

    def check(self, block_size: int | None = None) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.max_words < 1:
            raise ValueError("num_beams, max_new_tokens and max_words must be >= 1")
        if not 0 < self.window_stride < self.context_tokens:
            raise ValueError("need 0 < window_stride < context_tokens")
        if block_size is not None and self.context_tokens + self.max_new_tokens > block_size:
            raise ValueError(f"context_tokens + max_new_tokens = {self.context_tokens + self.max_new_tokens} "
                             f"> the model's block_size {block_size} (learned positions stop there)")


TRIGGER_EVENTS = ("type", "backspace", "reject", "accept", "paste")  # what the client reports as its last event


def should_trigger(prefix: str, last_event: str, idle_ms: int, settings: ComposeSettings) -> tuple[bool, str]:
    """(trigger?, why): suggest only at a word boundary (the text ends in a typed space after a
    word), after min_prefix_words words, not right after a backspace or a rejected suggestion
    (the user is correcting: wait for the next word), and only once the keys paused for debounce_ms."""
    if last_event in ("backspace", "reject"):
        return False, f"after_{last_event}"
    if not prefix.endswith(" ") or prefix.endswith("  ") or len(prefix) < 2 or prefix[-2].isspace():
        return False, "not_word_boundary"
    if len(prefix.split()) < settings.min_prefix_words:
        return False, "prefix_too_short"
    if idle_ms < settings.debounce_ms:
        return False, "debounce"
    return True, "ok"


@dataclass
class Proposal:
    text: str       # the suggested words, without the leading space
    score: float    # the beam's mean log-probability per generated token


def cut_phrase(continuation: str, finished: bool, max_words: int) -> str | None:
    """The suggestion in a decoded continuation, or None.

    It must start a new word (a leading space); it ends at the first line break and after the
    first sentence end; unless it reached a sentence end or the model's end of text (`finished`),
    its last word may be a fragment of a longer one and is dropped; at most max_words words.
    """
    if not continuation.startswith(" ") or continuation.startswith("  "):
        return None
    text = continuation.split("\n", 1)[0]
    m = SENTENCE_END.search(text)
    if m:
        text, finished = text[:m.end()], True
    words = text.split()
    if not finished:
        words = words[:-1]
    words = words[:max_words]
    return " ".join(words) or None


class Composer:
    """A compose model with its tokenizer and settings; `propose` is one keystroke's suggestion."""

    def __init__(self, model, tokenizer, settings: ComposeSettings):
        settings.check(model.config.block_size if model.config.pos_encoding == "learned" else None)
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.eot = tokenizer.token_to_id(EOT)
        self.gen = GenerationConfig(max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                                    num_return_sequences=settings.num_beams, stop_tokens=(self.eot,))

    @classmethod
    def load(cls, folder: str | Path, **overrides) -> Composer:
        """A model folder (config.json, model.safetensors, tokenizer.json) and its compose.json, if any."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        saved = json.loads((folder / "compose.json").read_text()) if (folder / "compose.json").exists() else {}
        known = {f.name for f in fields(ComposeSettings)}
        settings = ComposeSettings(**{k: v for k, v in {**saved, **overrides}.items() if k in known})
        return cls(load_model_folder(folder), Tokenizer.from_file(str(folder / "tokenizer.json")), settings)

    def prompt_ids(self, prefix: str) -> list[int]:
        """The prompt's tokens: the text without trailing spaces, in the stride-aligned window."""
        ids = self.tokenizer.encode(prefix.rstrip(" "), add_special_tokens=False).ids
        s = self.settings
        start = 0
        if len(ids) > s.context_tokens:
            start = -(-(len(ids) - s.context_tokens) // s.window_stride) * s.window_stride
        return ids[start:] or [self.eot]

    def extend(self, prefix: str, cache: PromptCache | None) -> tuple[PromptCache, int]:
        """The prompt cache for `prefix`, from the previous keystroke's: (cache, tokens computed)."""
        s = self.settings
        return extend_prompt_cache(self.model, self.prompt_ids(prefix), cache, s.context_tokens + s.max_new_tokens)

    def propose(self, prefix: str, cache: PromptCache | None = None
                ) -> tuple[Proposal | None, PromptCache, int]:
        """The best beam that gives a whole-word suggestion (unfiltered by the threshold), the prompt
        cache to pass to the next keystroke, and how many prompt tokens ran through the model."""
        cache, computed = self.extend(prefix, cache)
        for hyp in beam_search(self.model, [cache.tokens], self.gen, prompt_cache=cache)[0]:
            finished = bool(hyp.tokens) and hyp.tokens[-1] == self.eot
            text = self.tokenizer.decode(hyp.tokens[:-1] if finished else hyp.tokens)
            cut = cut_phrase(text, finished, self.settings.max_words)
            if cut:
                return Proposal(cut, hyp.score), cache, computed
        return None, cache, computed

    def save_settings(self, folder: str | Path, **extra) -> None:
        (Path(folder) / "compose.json").write_text(json.dumps({**asdict(self.settings), **extra}, indent=2) + "\n")
