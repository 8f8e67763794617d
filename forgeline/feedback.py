"""Feedback on the assistant's replies, and the preference pairs made from it.

**The store.** The web chat page (serve/page.py) keeps one record per rated reply in a project-local,
append-only JSON-lines file, `.forgeline/feedback/records.jsonl` (FORGELINE_FEEDBACK_DIR moves it).
Each append is one write under an flock, so server workers never interleave lines. A record:

    id            the reply's id (the completion id): a later record with the same id supersedes it
    time          UTC, ISO 8601, when the rating was stored
    session       the chat session id the page keeps across reloads
    model         the model that answered, as the service named it (`model` of the completion)
    model_version the version of it (the completion's `system_fingerprint`), "" if unknown
    messages      the conversation the model answered: user/assistant turns, oldest first
    reply         the assistant's reply
    rating        "up", "down" or null
    better        the user's better answer, or null

The page posts a reply's whole state on every change (thumb, better answer): the last record of an
id is its rating.

**Pairs** (`forgeline feedback export` -> data/feedback/pairs.jsonl; prompt, chosen, rejected), from
the last record of each id, one rule per pair:

- `better_answer`: a reply rated down against the better answer its user wrote (if it differs);
- `thumbs_up`: a reply rated down against a reply rated up to the same conversation (same turns).

A better answer on a reply rated up, or unrated, makes no pair (the user did not reject the reply);
identical pairs are kept once. Each pair names the records it came from.

Users write the better answers, so a pair is screened before training moves the model towards it:
with the safety stage's guard (forgeline/safety.py; data/safety/guard when it exists) every user turn
of its prompt goes through the input filter and its chosen reply through the response evaluator, and a
pair either flags is dropped (counted by category). The export writes the file atomically and
`dvc add`s it (data/feedback/pairs.jsonl.dvc: commit that file; the flow's `dvc push` stores the pairs
on the remote). tasks/chat_data.py merges the pairs with its rule-made ones.

    forgeline feedback export [--store DIR] [--out data/feedback/pairs.jsonl] [--guard DIR | --no-guard] [--no-dvc]
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from forgeline.paths import DATA, ROOT, STATE

RATINGS = ("up", "down", None)
PAIR_RULES = ("better_answer", "thumbs_up")
PAIRS = DATA / "feedback" / "pairs.jsonl"
GUARD = DATA / "safety" / "guard"   # the safety stage's model folder


def store_dir() -> Path:
    """Where the records live: $FORGELINE_FEEDBACK_DIR, else .forgeline/feedback/."""
    return Path(os.environ.get("FORGELINE_FEEDBACK_DIR") or STATE / "feedback")


def make_record(*, id: str, session: str, messages: list[dict], reply: str, rating: str | None,
                better: str | None = None, model: str = "", model_version: str = "",
                time: str | None = None) -> dict:
    """A record with its fields checked (ValueError on a bad one); `time` defaults to now (UTC)."""
    if rating not in RATINGS:
        raise ValueError(f"rating must be 'up', 'down' or null, not {rating!r}")
    if not id or not session:
        raise ValueError("id and session must be non-empty")
    for m in messages:
        if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"messages are user/assistant turns with string content, not {m!r}")
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("messages must end with the user turn the reply answers")
    better = better.strip() if better and better.strip() else None
    return {"id": id, "time": time or datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "session": session, "model": model, "model_version": model_version,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "reply": reply, "rating": rating, "better": better}


def append_record(record: dict, store: Path | None = None) -> None:
    """Append one record to the store's records.jsonl: one write, under an exclusive flock."""
    store = store or store_dir()
    store.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()
    with open(store / "records.jsonl", "ab") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_records(store: Path | None = None) -> list[dict]:
    """Every record of the store, in the order stored (a torn last line, from a crash, is skipped)."""
    path = (store or store_dir()) / "records.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def latest(records: list[dict]) -> list[dict]:
    """The last record of each reply id, in the order their ids first appeared."""
    last = {}
    for r in records:
        last[r["id"]] = r
    return list(last.values())


def conversation_key(messages: list[dict]) -> str:
    """Two replies answer the same prompt when their turns are equal (content stripped)."""
    return json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)


def preference_pairs(records: list[dict]) -> list[dict]:
    """The pairs of the rules above, from the last record of each id; each pair once."""
    current = latest(records)
    ups: dict[str, list[dict]] = {}
    for r in current:
        if r["rating"] == "up":
            ups.setdefault(conversation_key(r["messages"]), []).append(r)
    pairs, seen = [], set()

    def add(rule: str, down: dict, chosen: str, by: list[dict]) -> None:
        key = (conversation_key(down["messages"]), chosen.strip(), down["reply"].strip())
        if chosen.strip() == down["reply"].strip() or key in seen:
            return
        seen.add(key)
        pairs.append({"rule": rule, "prompt": down["messages"], "chosen": chosen, "rejected": down["reply"],
                      "records": [down["id"], *(r["id"] for r in by)], "sessions": sorted({down["session"],
                      *(r["session"] for r in by)}), "model_version": down["model_version"], "time": down["time"]})

    for r in current:
        if r["rating"] != "down":
            continue
        if r["better"]:
            add("better_answer", r, r["better"], [])
        for up in ups.get(conversation_key(r["messages"]), []):
            add("thumbs_up", r, up["reply"], [up])
    return pairs


def screen(pairs: list[dict], guard) -> tuple[list[dict], Counter]:
    """The pairs `guard` (forgeline.safety.Guard) passes, and the dropped ones counted by category: each
    user turn of the prompt through the input filter, the chosen reply through the response evaluator."""
    if guard is None or not pairs:
        return pairs, Counter()
    users = [[m["content"] for m in p["prompt"] if m["role"] == "user"] for p in pairs]
    inputs = iter(guard.check_inputs([t for turns in users for t in turns]))
    kept, dropped = [], Counter()
    for p, turns, out in zip(pairs, users, guard.check_outputs([p["chosen"] for p in pairs])):
        flagged = [v for v in [next(inputs) for _ in turns] + [out] if v.flagged]
        if flagged:
            dropped[flagged[0].category] += 1
        else:
            kept.append(p)
    return kept, dropped


def export(store: Path | None = None, out: Path = PAIRS, dvc: bool = True, guard=None) -> dict:
    """Write the pairs (screened by `guard` if given) to `out` atomically and, with `dvc`, `dvc add` it;
    return the counts."""
    records = read_records(store)
    pairs, dropped = screen(preference_pairs(records), guard)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".pairs-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in pairs)
    os.replace(tmp, out)
    if dvc:
        from dvc.repo import Repo

        with Repo(str(ROOT)) as repo:
            repo.add(str(out))
    current = latest(records)
    return {"records": len(records), "replies": len(current),
            "rated": dict(Counter(str(r["rating"]) for r in current)),
            "pairs": dict(Counter(p["rule"] for p in pairs)), "dropped": dict(dropped), "out": str(out)}
