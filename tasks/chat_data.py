"""Chat data: SFT conversations and preference pairs for the alignment stages, in forgeline/chat.py's template.

Everything here ships offline and is rebuilt byte-identically from the same inputs and config.

The chat template, its special tokens and the answer checker are forgeline/chat.py.

**SFT data** (`sft_train.jsonl`, `sft_val.jsonl`; one conversation a line):
- `chatterbot`: PyPI chatterbot-corpus English conversations, turns alternating user/assistant
  (a trailing user turn is dropped).
- `definitions`: the C-API entries of the shipped Python docs sample (data/raw/pydocs): the
  question "What does the C function X do?" (or macro/type/variable), the answer the first
  sentence of the entry, reST markup removed.
- verifiable tasks, whose answers code can check (field `answer`, exact match after strip):
  `add` (two numbers 0..99), `reverse` (a word's letters, space-separated, backwards),
  `count` (letters in a space-separated word), `copy` (one field's value from a two-field passage).
  Words come from the shipped Austen novel; field values from the lists below.
The held-out split is by key, so no val prompt's content is seen in training: the unordered
operand pair for `add` (5 + 7 and 7 + 5 fall on the same side), the word for `reverse` and `count` (shared, so a val word is unseen by every task),
the whole passage and question for `copy`, the first user turn for the others.

**Preference data** (`pref_train.jsonl`, `pref_val.jsonl`; prompt, chosen, rejected). Made only
from verifiable prompts of the same split; chosen is always the correct answer. The rules:
- `wrong_answer` (a plausible mistake, drawn from these in a seeded order):
  add: the sum moved by one of -10, -2, -1, +1, +2, +10 (never negative), or another number with
  as many digits; reverse: the letters in their original order, the correct reversal with one
  adjacent pair of different letters swapped, with one letter replaced by another letter, or
  with one letter dropped; count: the count moved by one of -2, -1, +1, +2 (never below 1);
  copy: the value of the other field, or another value of the asked field's kind that is not in
  the passage.
- `off_topic`: the correct answer of another prompt of a different task, drawn from the same
  split, kept only if it differs from the correct answer.
- `truncated`: the correct answer cut short: the first half (rounded up) of a reversed word's
  letters, a number less its last digit, the first half of a field value's characters; only
  for answers of two or more letters or digits.
- `run_on`: the correct answer followed by a space and the answer of another prompt of the same
  task (the reply does not stop where it should).
`pref_pairs` in configs/chat_data.yaml sets how many pairs of each rule a prompt gets (distinct
rejected answers; fewer where a rule has fewer). `card.md` in the output lists the counts.

**Feedback pairs**: the chat page's ratings, as `forgeline feedback export` made them
(forgeline/feedback.py: `better_answer`, a reply rated down against the user's better answer;
`thumbs_up`, against a reply rated up to the same conversation), read from `feedback`
(data/feedback/pairs.jsonl, a DVC-tracked file; none before the first export) and merged with the
rule-made pairs: task `feedback`, the stage's system prompt put first, split by the conversation.
Every pair says where it came from in `provenance`: `rule` or `feedback` (the latter also names
its feedback `records`).

    python -m tasks.chat_data [key=value ...]
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task

from forgeline.chat import parse_chat, read_jsonl, render_chat, write_jsonl
from forgeline.config import ConfigError, config_dict, load_config
from forgeline.workspace import run_stage

# ----------------------------------------------------------------------------- config

VERIFIABLE = ("add", "reverse", "count", "copy")
PAIR_RULES = ("wrong_answer", "off_topic", "truncated", "run_on")
FIELD_VALUES = {
    "name": ["Anne", "Emma", "John", "Mary", "Henry", "Jane", "Peter", "Lucy", "Tom", "Clara",
             "Oscar", "Nina", "Hugo", "Rosa", "Felix", "Ada", "Leo", "Iris", "Max", "Ruth"],
    "city": ["Paris", "Rome", "Bath", "Oslo", "Lima", "Cairo", "Dublin", "Madrid", "Vienna", "Tokyo",
             "Berlin", "Prague", "Lisbon", "Quito", "Delhi", "Seoul", "Boston", "Sydney", "Milan", "Athens"],
    "colour": ["red", "blue", "green", "black", "white", "yellow", "purple", "orange", "grey", "brown",
               "pink", "gold", "silver", "violet"],
    "animal": ["cat", "dog", "horse", "sheep", "goat", "mouse", "tiger", "lion", "wolf", "fox",
               "bear", "owl", "duck", "frog", "whale", "eagle"],
    "fruit": ["apple", "pear", "plum", "lemon", "mango", "peach", "grape", "cherry", "melon", "lime",
              "fig", "kiwi", "banana", "orange"],
}
TEMPLATES = {
    "add": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."],
    "reverse": ["Spell backwards: {s}", "Write {s} in reverse order."],
    "count": ["How many letters are in {s}?", "Count the letters: {s}"],
    "copy": ["{K1}: {v1}. {K2}: {v2}. What is the {k}?", "Read this. {K1}: {v1}. {K2}: {v2}. Give the {k}."],
}


@dataclass
class ChatDataConfig:
    pydocs: str = "data/raw/pydocs/pydocs_head.txt.gz"     # reST sources: C-API definitions
    words: str = "data/raw/austen/persuasion.txt.gz"       # prose: words for reverse/count
    out_dir: str = "data/chat_data"
    system_prompt: str = "You are a helpful assistant."
    val_fraction: float = 0.1          # share of keys held out (by hash), every source
    train_per_task: int = 3000         # conversations of each verifiable task in sft_train
    val_per_task: int = 200            # ... in sft_val: the held-out prompts every stage is scored on
    min_word: int = 3                  # letters, reverse/count words
    max_word: int = 6
    max_answer_chars: int = 200        # chatterbot/definitions answers longer than this are dropped
    pref_pairs: dict[str, int] = field(default_factory=lambda: {"wrong_answer": 3, "off_topic": 1, "truncated": 1,
                                                                  "run_on": 1})
    seed: int = 0
    feedback: str = ""                 # pairs from the chat page's ratings (forgeline feedback export); "" = none

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError("chat_data: val_fraction must be in (0, 1)")
        if self.train_per_task < 1 or self.val_per_task < 1 or not 1 <= self.min_word <= self.max_word:
            raise ConfigError("chat_data: need train_per_task, val_per_task >= 1 and 1 <= min_word <= max_word")
        unknown = set(self.pref_pairs) - set(PAIR_RULES)
        if unknown or any(not isinstance(v, int) or v < 0 for v in self.pref_pairs.values()):
            raise ConfigError(f"chat_data: pref_pairs maps {sorted(PAIR_RULES)} to counts >= 0; got {self.pref_pairs}")


# ----------------------------------------------------------------------------- splits and sources


def is_val(key: str, fraction: float) -> bool:
    """Stable split: the first 8 hex digits of sha256(key) as a fraction of 2**32."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < fraction * 2**32


def chatterbot_conversations() -> list[list[dict]]:
    """English chatterbot-corpus conversations as alternating user/assistant turns, files sorted."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    out = []
    for path in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conv]
            turns = turns[:len(turns) // 2 * 2]  # end on an assistant turn
            if turns and all(turns):
                out.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                            for i, t in enumerate(turns)])
    return out


_DIRECTIVE = re.compile(r"^\.\. c:(function|macro|type|var):: (.+)$")
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :c:func:`X` -> X, :ref:`t <x>` -> t
KIND_WORDS = {"function": "C function", "macro": "C macro", "type": "C type", "var": "C variable"}


def strip_rest(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"\*\*?([^*]+)\*\*?", r"\1", text)
    return " ".join(text.split())


def first_sentence(text: str) -> str | None:
    """Up to the first . ! or ? followed by a space or the end; None if there is none."""
    m = re.search(r"^(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else None


def definitions(path: str) -> list[tuple[str, str, str]]:
    """(kind, name, first sentence of its description) of every C-API entry in the reST sources."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().splitlines()
    found = []
    for i, line in enumerate(lines):
        m = _DIRECTIVE.match(line)
        if not m:
            continue
        kind, sig = m.groups()
        name = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sig.split("(")[0])
        # the description: the first paragraph indented under the directive (options skipped)
        para, j = [], i + 1
        while j < len(lines):
            line = lines[j].strip()
            if not line and para or lines[j] and not lines[j].startswith("   "):
                break
            if line.startswith((".. ", ":")) and para:
                break
            if line and not line.startswith((".. ", ":")):
                para.append(line)
            j += 1
        sentence = first_sentence(strip_rest(" ".join(para)))
        if name and sentence:
            found.append((kind, name[-1], sentence))
    return found


def prose_words(path: str, min_len: int, max_len: int) -> list[str]:
    text = gzip.open(path, "rt", encoding="utf-8").read()
    return sorted({w for w in re.findall(r"[a-z]+", text) if min_len <= len(w) <= max_len})


# ----------------------------------------------------------------------------- verifiable tasks


def spaced(word: str) -> str:
    return " ".join(word)


def task_item(task: str, key: tuple, rng: random.Random) -> dict:
    """One verifiable prompt for `key` (a template drawn from rng): {'task', 'key', 'prompt', 'answer', 'meta'}."""
    template = rng.choice(TEMPLATES[task])
    if task == "add":
        a, b = key
        prompt, answer, meta = template.format(a=a, b=b), str(a + b), {"a": a, "b": b}
    elif task in ("reverse", "count"):
        (word,) = key
        prompt = template.format(s=spaced(word))
        answer = spaced(word[::-1]) if task == "reverse" else str(len(word))
        meta = {"word": word}
    else:
        k1, v1, k2, v2, k = key
        prompt = template.format(K1=k1.capitalize(), v1=v1, K2=k2.capitalize(), v2=v2, k=k)
        answer = v1 if k == k1 else v2
        meta = {"fields": {k1: v1, k2: v2}, "asked": k}
    return {"task": task, "key": "|".join(map(str, key)), "prompt": prompt, "answer": answer, "meta": meta}


def task_keys(task: str, words: list[str]) -> list[tuple]:
    if task == "add":
        return [(a, b) for a in range(100) for b in range(100)]
    if task in ("reverse", "count"):
        return [(w,) for w in words]
    keys = []
    for k1 in FIELD_VALUES:
        for k2 in FIELD_VALUES:
            if k1 < k2:
                keys += [(a, v1, b, v2, k) for (a, b) in ((k1, k2), (k2, k1))
                         for v1 in FIELD_VALUES[a] for v2 in FIELD_VALUES[b] for k in (a, b)]
    return keys


def split_key(task: str, key: tuple) -> str:
    """What decides the split: the word is shared by reverse and count, so it is held out of both;
    a + b and b + a are one problem, so `add` keys on the unordered pair."""
    if task in ("reverse", "count"):
        return f"word|{key[0]}"
    if task == "add":
        key = tuple(sorted(key))
    return f"{task}|{'|'.join(map(str, key))}"


def task_items(task: str, words: list[str], cfg: ChatDataConfig) -> dict[str, list[dict]]:
    """train_per_task / val_per_task items of `task`, keys cycled in a seeded order (a key repeats,
    with another template, only if there are fewer keys than items)."""
    rng = random.Random(f"{cfg.seed}|{task}")
    keys = task_keys(task, words)
    rng.shuffle(keys)
    out = {}
    for split, n in (("train", cfg.train_per_task), ("val", cfg.val_per_task)):
        pool = [k for k in keys if is_val(split_key(task, k), cfg.val_fraction) == (split == "val")]
        out[split] = [task_item(task, pool[i % len(pool)], rng) for i in range(n)]
    return out


# ----------------------------------------------------------------------------- preference pairs


def wrong_answers(item: dict, rng: random.Random) -> list[str]:
    """Plausible mistakes for a verifiable item, in a seeded order, all different from its answer."""
    task, answer, meta = item["task"], item["answer"], item["meta"]
    if task == "add":
        n = int(answer)
        out = [str(n + d) for d in (-10, -2, -1, 1, 2, 10) if n + d >= 0]
        out.append(str(rng.randrange(10 ** (len(answer) - 1) if len(answer) > 1 else 0, 10 ** len(answer))))
    elif task == "reverse":
        letters = answer.split()
        out = [spaced(meta["word"])]  # forwards instead of backwards
        i = rng.choice([i for i in range(len(letters) - 1) if letters[i] != letters[i + 1]] or [None])
        if i is not None:
            out.append(" ".join(letters[:i] + [letters[i + 1], letters[i]] + letters[i + 2:]))
        i = rng.randrange(len(letters))
        other = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != letters[i]])
        out.append(" ".join(letters[:i] + [other] + letters[i + 1:]))
        i = rng.randrange(len(letters))
        out.append(" ".join(letters[:i] + letters[i + 1:]))
    elif task == "count":
        out = [str(int(answer) + d) for d in (-2, -1, 1, 2) if int(answer) + d > 0]
    else:
        fields = meta["fields"]
        out = [v for k, v in fields.items() if k != meta["asked"]]
        out += rng.sample([v for v in FIELD_VALUES[meta["asked"]] if v not in fields.values()], 2)
    out = [o for o in dict.fromkeys(out) if o and o != answer]
    rng.shuffle(out)
    return out


def truncated(answer: str, task: str) -> str | None:
    if task == "reverse":
        letters = answer.split()
        return " ".join(letters[:(len(letters) + 1) // 2]) if len(letters) >= 2 else None
    if task in ("add", "count"):
        return answer[:-1] if len(answer) >= 2 else None
    return answer[:(len(answer) + 1) // 2] if len(answer) >= 2 else None


def rejected_answers(rule: str, item: dict, others: list[dict], rng: random.Random) -> list[str]:
    if rule == "wrong_answer":
        return wrong_answers(item, rng)
    if rule == "truncated":
        cut = truncated(item["answer"], item["task"])
        return [cut] if cut is not None else []
    if rule == "run_on":
        picks = [o["answer"] for o in rng.sample(others, min(16, len(others))) if o["task"] == item["task"]]
        return [f"{item['answer']} {a}" for a in dict.fromkeys(picks)]
    # off_topic: answers to other prompts of other tasks, in a seeded order
    picks = [o["answer"] for o in rng.sample(others, min(16, len(others))) if o["task"] != item["task"]]
    return [a for a in dict.fromkeys(picks) if a != item["answer"]]


def preference_pairs(items: list[dict], system_prompt: str, counts: dict, rng: random.Random) -> list[dict]:
    pairs = []
    for item in items:
        prompt = [{"role": "system", "content": system_prompt}, {"role": "user", "content": item["prompt"]}]
        for rule in PAIR_RULES:
            for rejected in rejected_answers(rule, item, items, rng)[:counts.get(rule, 0)]:
                pairs.append({"task": item["task"], "rule": rule, "prompt": prompt, "chosen": item["answer"],
                              "rejected": rejected, "answer": item["answer"], "provenance": "rule"})
    return pairs


def feedback_pairs(path: str, system_prompt: str, fraction: float) -> dict[str, list[dict]]:
    """The feedback pairs at `path` in this stage's pair format, split by conversation; none if `path`
    is "" or absent (before the first export). Its .dvc file without the data is an error, not "none"."""
    out = {"train": [], "val": []}
    if not path or not Path(path).exists():
        if path and Path(path + ".dvc").exists():
            raise FileNotFoundError(f"{path}.dvc is committed but {path} is not here: `dvc pull {path}` first")
        return out
    for row in read_jsonl(path):
        turns = [m for m in row["prompt"] if m["role"] != "system"]
        split = "val" if is_val("feedback|" + json.dumps(turns, sort_keys=True), fraction) else "train"
        out[split].append({"task": "feedback", "rule": row["rule"], "answer": None, "provenance": "feedback",
                           "prompt": [{"role": "system", "content": system_prompt}, *turns],
                           "chosen": row["chosen"], "rejected": row["rejected"], "records": row["records"]})
    return out


# ----------------------------------------------------------------------------- the stage


def chat_data(cfg: ChatDataConfig) -> dict:
    """Write sft_{train,val}.jsonl, pref_{train,val}.jsonl, summary.json and card.md to cfg.out_dir."""
    system = {"role": "system", "content": cfg.system_prompt}
    sft = {"train": [], "val": []}

    for conv in chatterbot_conversations():
        if max(len(m["content"]) for m in conv) <= cfg.max_answer_chars:
            split = "val" if is_val("chat|" + conv[0]["content"], cfg.val_fraction) else "train"
            sft[split].append({"source": "chatterbot", "messages": [system, *conv], "answer": None})
    first = {}
    for kind, name, sentence in definitions(cfg.pydocs):
        first.setdefault(name, (kind, sentence))  # a name documented twice: its first entry
    for name, (kind, sentence) in first.items():
        if len(sentence) <= cfg.max_answer_chars:
            split = "val" if is_val("def|" + name, cfg.val_fraction) else "train"
            q = f"What does the {KIND_WORDS[kind]} {name} do?" if kind in ("function", "macro") \
                else f"What is the {KIND_WORDS[kind]} {name}?"
            sft[split].append({"source": "definitions", "answer": None, "messages": [
                system, {"role": "user", "content": q}, {"role": "assistant", "content": sentence}]})

    words = prose_words(cfg.words, cfg.min_word, cfg.max_word)
    verifiable = {"train": [], "val": []}
    for t in VERIFIABLE:
        for split, items in task_items(t, words, cfg).items():
            verifiable[split] += items
            sft[split] += [{"source": t, "answer": it["answer"], "meta": it["meta"], "messages": [
                system, {"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": it["answer"]}]}
                for it in items]

    pref = {s: preference_pairs(verifiable[s], cfg.system_prompt, cfg.pref_pairs, random.Random(f"{cfg.seed}|pref|{s}"))
            for s in ("train", "val")}
    for split, rows in feedback_pairs(cfg.feedback, cfg.system_prompt, cfg.val_fraction).items():
        pref[split] += rows
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        random.Random(f"{cfg.seed}|order|{split}").shuffle(sft[split])
        random.Random(f"{cfg.seed}|order|pref|{split}").shuffle(pref[split])
        write_jsonl(out / f"sft_{split}.jsonl", [{"id": f"sft-{split}-{i}", **r} for i, r in enumerate(sft[split])])
        write_jsonl(out / f"pref_{split}.jsonl", [{"id": f"pref-{split}-{i}", **r} for i, r in enumerate(pref[split])])
    summary = {f"sft_{s}": dict(sorted(Counter(r["source"] for r in sft[s]).items())) for s in sft}
    summary.update({f"pref_{s}": dict(sorted(Counter(r["rule"] for r in pref[s]).items())) for s in pref})
    summary["pref_provenance"] = dict(sorted(Counter(r["provenance"] for s in pref for r in pref[s]).items()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "card.md").write_text(card(summary))
    return summary


def card(summary: dict) -> str:
    doc = sys.modules[__name__].__doc__
    rules = doc[doc.index("**Preference data**"):doc.index("    python -m")].strip()
    lines = ["# chat_data", "", "Built by tasks/chat_data.py from offline sources; counts per source / rule.", ""]
    for name, counts in summary.items():
        lines.append(f"- **{name}** ({sum(counts.values())}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines + ["", rules, ""])


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    cfg = load_config(ChatDataConfig, "chat_data", sys.argv[1:] if argv is None else argv)
    with stage_run("chat_data", config_dict(cfg)):
        summary = chat_data(cfg)
        mlflow.log_metrics({f"{name}.{k}": v for name, counts in summary.items() for k, v in counts.items()})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "card.md"))
    print("chat_data: " + "; ".join(f"{name} {sum(c.values())}" for name, c in summary.items()))


@task(name="chat_data", retries=0)
def chat_data_task(run: dict[str, str]) -> dict:
    return run_stage("chat_data", **run)


if __name__ == "__main__":
    main()
