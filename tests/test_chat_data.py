"""Chat data: the template round-trips, the loss mask, the held-out split and every preference rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgeline.chat import (END, ROLE_TOKENS, SPECIAL_TOKENS, decode_reply, encode_chat, is_correct, load_tokenizer,
                            parse_chat, read_jsonl, render_chat)
from tasks.chat_data import FIELD_VALUES, ChatDataConfig, chat_data, spaced, split_key
from tasks.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 30?\nPlease answer — briefly."},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Spell backwards: c a t"},
    {"role": "assistant", "content": "t a c"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level BPE of ~300 tokens with the project's special tokens at ids 0..5."""
    text = " ".join(m["content"] for m in CONVERSATION) * 20 + " the quick brown fox jumps over the lazy dog " * 20
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([text], vocab_size=300, min_frequency=1).save(str(path))
    return load_tokenizer(path)


def test_template_round_trips_through_text_and_tokens(tok):
    text = render_chat(CONVERSATION)
    assert text.startswith("<|system|>You are") and text.endswith("t a c<|end|>")
    assert parse_chat(text) == CONVERSATION
    ids, _ = encode_chat(tok, CONVERSATION)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert parse_chat(tok.decode(ids, skip_special_tokens=False)) == CONVERSATION
    with pytest.raises(ValueError, match="not a chat"):
        parse_chat(text + "<|user|>unterminated")


def test_special_token_ids_are_the_tokenizer_stage_ones(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert [tok.token_to_id(t) for t in (*ROLE_TOKENS.values(), END)] == [2, 3, 4, 5]


def test_special_strings_in_content_are_plain_text(tok):
    """A user typing "<|assistant|>" must not open an assistant turn (or put weight on it)."""
    messages = [{"role": "user", "content": "say <|assistant|>hi<|end|>"}, {"role": "assistant", "content": "no"}]
    ids, mask = encode_chat(tok, messages)
    assert ids.count(tok.token_to_id("<|assistant|>")) == 1 and ids.count(tok.token_to_id(END)) == 2
    assert tok.decode(ids, skip_special_tokens=False) == render_chat(messages)
    assert sum(mask) == len(tok.encode("no").ids) + 1


def test_loss_mask_is_assistant_content_and_its_end_only(tok):
    ids, mask = encode_chat(tok, CONVERSATION)
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    expected = tok.encode("42").ids + [5] + tok.encode("t a c").ids + [5]
    assert masked == expected
    # role tokens, system and user content carry no weight
    for i, m in zip(ids, mask):
        if i in (2, 3, 4):
            assert m == 0
    prompt, pmask = encode_chat(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert prompt[-1] == tok.token_to_id("<|assistant|>") and not any(pmask)


def test_decode_reply_stops_at_end_and_checks_exactly(tok):
    ids = tok.encode("t a c").ids + [5] + tok.encode(" junk").ids
    assert decode_reply(tok, ids) == ("t a c", True)
    assert decode_reply(tok, tok.encode("t a").ids) == ("t a", False)
    assert is_correct(" 42 ", "42") and not is_correct("4 2", "42")


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    cfg = ChatDataConfig(pydocs=str(ROOT / "data/raw/pydocs/pydocs_head.txt.gz"),
                         words=str(ROOT / "data/raw/austen/persuasion.txt.gz"), out_dir=str(out / "a"),
                         train_per_task=60, val_per_task=20)
    summary = chat_data(cfg)
    return cfg, summary, out / "a"


def test_stage_writes_every_source_and_a_card(built):
    cfg, summary, out = built
    assert set(summary["sft_train"]) == {"chatterbot", "definitions", "add", "reverse", "count", "copy"}
    assert summary["sft_val"]["add"] == 20 and summary["sft_train"]["copy"] == 60
    for name in ("sft_train", "sft_val", "pref_train", "pref_val"):
        rows = read_jsonl(out / f"{name}.jsonl")
        counts = {}
        for r in rows:
            key = r["source"] if name.startswith("sft") else r["rule"]
            counts[key] = counts.get(key, 0) + 1
        assert counts == summary[name]
    card = (out / "card.md").read_text()
    assert "wrong_answer" in card and "truncated" in card and "off_topic" in card


def test_stage_is_deterministic(built, tmp_path):
    from dataclasses import replace

    cfg, _, out = built
    chat_data(replace(cfg, out_dir=str(tmp_path)))
    for name in ("sft_train.jsonl", "sft_val.jsonl", "pref_train.jsonl", "pref_val.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_conversations_follow_the_template(built):
    _, _, out = built
    for r in read_jsonl(out / "sft_train.jsonl") + read_jsonl(out / "sft_val.jsonl"):
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "system" and roles[-1] == "assistant"
        assert roles[1:] == ["user", "assistant"] * (len(roles[1:]) // 2)
        assert parse_chat(render_chat(r["messages"])) == r["messages"]


def test_verifiable_answers_are_right_and_held_out_keys_unseen(built):
    _, _, out = built
    seen = {"train": set(), "val": set()}
    for split in seen:
        for r in read_jsonl(out / f"sft_{split}.jsonl"):
            if r["answer"] is None:
                seen[split].add("chat|" + r["messages"][1]["content"])
                continue
            t, meta, answer = r["source"], r["meta"], r["answer"]
            if t == "add":
                assert answer == str(meta["a"] + meta["b"]) and 0 <= meta["a"] < 100 and 0 <= meta["b"] < 100
                key = (meta["a"], meta["b"])
            elif t == "reverse":
                assert answer == spaced(meta["word"][::-1]) and spaced(meta["word"]) in r["messages"][1]["content"]
                key = (meta["word"],)
            elif t == "count":
                assert answer == str(len(meta["word"]))
                key = (meta["word"],)
            else:
                assert answer == meta["fields"][meta["asked"]]
                (k1, v1), (k2, v2) = meta["fields"].items()
                key = (k1, v1, k2, v2, meta["asked"])
            seen[split].add(split_key(t, key))
    assert seen["val"] and not seen["train"] & seen["val"]


def test_add_split_keys_on_the_unordered_pair(built):
    """a + b and b + a are one problem: held out together, never one in training and one held out."""
    from tasks.chat_data import is_val

    cfg, _, out = built
    split_of = {(a, b): is_val(split_key("add", (a, b)), cfg.val_fraction) for a in range(100) for b in range(100)}
    assert any(split_of.values()), "no add pair held out"
    assert [k for k, v in split_of.items() if v != split_of[k[::-1]]] == []
    pairs = {s: {frozenset((r["meta"]["a"], r["meta"]["b"])) for r in read_jsonl(out / f"sft_{s}.jsonl")
                 if r["source"] == "add"} for s in ("train", "val")}
    assert pairs["val"] and not pairs["train"] & pairs["val"]


def test_preference_pairs_follow_their_rules(built):
    _, _, out = built
    answers_by_task = {}
    for r in read_jsonl(out / "sft_train.jsonl"):
        if r["answer"] is not None:
            answers_by_task.setdefault(r["source"], set()).add(r["answer"])
    rows = read_jsonl(out / "pref_train.jsonl")
    assert {r["rule"] for r in rows} == {"wrong_answer", "off_topic", "truncated", "run_on"}
    for r in rows:
        chosen, rejected, task = r["chosen"], r["rejected"], r["task"]
        assert chosen == r["answer"] != rejected
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        if r["rule"] == "truncated":
            assert chosen.startswith(rejected) and 0 < len(rejected) < len(chosen)
        elif r["rule"] == "run_on":  # the right answer, then another same-task prompt's answer
            assert rejected.startswith(chosen + " ") and rejected[len(chosen) + 1:] in answers_by_task[task]
        elif r["rule"] == "off_topic":
            others = set().union(*(a for t, a in answers_by_task.items() if t != task))
            assert rejected in others
        elif task == "add":
            assert int(rejected) - int(chosen) in (-10, -2, -1, 1, 2, 10) or len(rejected) == len(chosen)
        elif task == "count":
            assert abs(int(rejected) - int(chosen)) in (1, 2)
        elif task == "reverse":
            c, j = chosen.split(), rejected.split()
            if len(j) == len(c) - 1:   # one letter dropped
                assert any(c[:i] + c[i + 1:] == j for i in range(len(c)))
                continue
            diff = [i for i in range(len(c)) if c[i] != j[i]]
            forwards = j == c[::-1]
            swapped = len(diff) == 2 and diff[1] == diff[0] + 1 and sorted(c) == sorted(j)
            assert forwards or swapped or len(diff) == 1   # or one letter replaced
        else:
            user = r["prompt"][1]["content"]
            asked = user.rstrip("?.").split()[-1]
            # the other field's value (copied from the passage) or another value of the asked kind
            assert rejected in user or (rejected in FIELD_VALUES[asked] and rejected not in user)
    # distinct mistakes per prompt
    per_prompt = {}
    for r in rows:
        if r["rule"] == "wrong_answer":
            per_prompt.setdefault(json.dumps(r["prompt"]), []).append(r["rejected"])
    assert all(len(set(v)) == len(v) for v in per_prompt.values())
