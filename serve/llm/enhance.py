"""The prompt enhancer (book ch. 4.4): the user's text cleaned, the chat template filled, the history cut to
the context. Each change is a trace entry, so a reply can be explained.

- whitespace: control characters dropped, runs of blanks collapsed, blank lines capped at one;
- case: a message typed in capitals (>= 80 % of >= 8 letters) is lower-cased, sentences re-capitalised;
- typos: a word of >= 5 letters that is no word of the tokenizer's vocabulary, with exactly one vocabulary
  word (>= 5 letters, same first letter) one edit away (Damerau: delete, transpose, replace, insert), is
  replaced by it. Conservative on purpose: a 4096-token vocabulary misses many real words, and a wrong
  "fix" is worse than a typo;
- template: forgeline/chat.py's, with the service's system prompt first (a client's system text is
  appended to it, it cannot replace it);
- context: the oldest turns are dropped until prompt + reply fit the model's block_size; then the reply
  budget shrinks down to `min_reply_tokens`; past that the request is refused as too long.
"""
from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass, field

from forgeline.chat import encode_chat

_CONTROL = {c for c in map(chr, range(32)) if c not in "\n\t"} | {"\x7f"}
_WORD = re.compile(r"[A-Za-z]+")


class ContextTooLong(ValueError):
    """The newest message alone (with the system prompt) leaves no room for a reply."""


def normalise_whitespace(text: str) -> str:
    text = "".join(c for c in unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
                   if c not in _CONTROL)
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalise_case(text: str) -> str:
    """Shouted text (>= 80 % capitals among >= 8 letters) in sentence case; anything else unchanged."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 8 or sum(c.isupper() for c in letters) < 0.8 * len(letters):
        return text
    lowered = text.lower()
    return re.sub(r"(^|[.!?]\s+|\n)([a-z])", lambda m: m.group(1) + m.group(2).upper(), lowered)


def vocabulary_words(tok, min_len: int = 3) -> frozenset[str]:
    """Whole words among the tokenizer's tokens (byte-level BPE marks a leading space with 'Ġ'), lower-cased."""
    words = set()
    for token in tok.get_vocab():
        word = token.removeprefix("Ġ")
        if len(word) >= min_len and word.isascii() and word.isalpha():
            words.add(word.lower())
    return frozenset(words)


def _edits1(word: str) -> set[str]:
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    letters = string.ascii_lowercase
    return ({a + b[1:] for a, b in splits if b} | {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
            | {a + c + b[1:] for a, b in splits if b for c in letters} | {a + c + b for a, b in splits for c in letters})


def fix_typos(text: str, words: frozenset[str], min_len: int = 5) -> tuple[str, list[dict]]:
    """(text with obvious typos fixed, [{'from', 'to'}]): see the module docstring for 'obvious'."""
    fixes = []

    def fix(m: re.Match) -> str:
        w = m.group(0)
        low = w.lower()
        if len(w) < min_len or low in words or (w != low and w != w.capitalize()):   # names, CamelCase, CAPS
            return w
        cands = {c for c in _edits1(low) & words if len(c) >= min_len and c[0] == low[0]}
        if len(cands) != 1:
            return w
        to = cands.pop()
        to = to.capitalize() if w[0].isupper() else to
        fixes.append({"from": w, "to": to})
        return to

    return _WORD.sub(fix, text), fixes


@dataclass
class Enhanced:
    ids: list[int]                   # the prompt's tokens, ending with <|assistant|>
    messages: list[dict]             # the turns it encodes (system first)
    max_new_tokens: int              # the reply budget that fits the context
    trace: list[dict] = field(default_factory=list)


class PromptEnhancer:
    def __init__(self, tok, system_prompt: str, context: int, min_reply_tokens: int = 16, fix_typos: bool = True):
        self.tok, self.system_prompt, self.context = tok, system_prompt, context
        self.min_reply_tokens = min_reply_tokens
        self.words = vocabulary_words(tok) if fix_typos else frozenset()

    def clean(self, text: str) -> tuple[str, list[dict]]:
        """One user message through whitespace, case and typo fixing; the changes as trace entries."""
        notes = []
        spaced = normalise_whitespace(text)
        if spaced != text:
            notes.append({"step": "prompt_enhancer", "decision": "whitespace_normalised"})
        cased = normalise_case(spaced)
        if cased != spaced:
            notes.append({"step": "prompt_enhancer", "decision": "case_normalised"})
        fixed, fixes = fix_typos(cased, self.words) if self.words else (cased, [])
        if fixes:
            notes.append({"step": "prompt_enhancer", "decision": "typos_fixed", "fixes": fixes})
        return fixed, notes

    def __call__(self, messages: list[dict], max_new_tokens: int) -> Enhanced:
        """Client turns (system/user/assistant) -> the prompt ids that fit the context with the reply."""
        trace: list[dict] = []
        client_system = " ".join(m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip())
        system = {"role": "system", "content": self.system_prompt + (" " + client_system if client_system else "")}
        if client_system:
            trace.append({"step": "prompt_enhancer", "decision": "client_system_appended"})
        turns = []
        for i, m in enumerate(m for m in messages if m["role"] != "system"):
            content = m["content"]
            if m["role"] == "user":
                content, notes = self.clean(content)
                trace += notes
            turns.append({"role": m["role"], "content": content})
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("the last message must be the user's")
        while True:
            ids, _ = encode_chat(self.tok, [system, *turns], add_generation_prompt=True)
            room = self.context - len(ids)
            if room >= max_new_tokens or len(turns) == 1:
                break
            turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
            trace.append({"step": "prompt_enhancer", "decision": "history_truncated", "kept_turns": len(turns)})
        if room < self.min_reply_tokens:
            raise ContextTooLong(f"the prompt takes {len(ids)} of the model's {self.context} tokens, leaving "
                                 f"{max(room, 0)} for the reply (at least {self.min_reply_tokens} needed)")
        if room < max_new_tokens:
            trace.append({"step": "prompt_enhancer", "decision": "max_tokens_reduced", "from": max_new_tokens, "to": room})
            max_new_tokens = room
        trace.append({"step": "prompt_enhancer", "decision": "template_filled", "prompt_tokens": len(ids),
                      "turns": len(turns) + 1})
        return Enhanced(ids, [system, *turns], max_new_tokens, trace)
