"""Smart Compose: triggering, the phrase generator (beam search from a reused prompt cache), the
confidence filter, post-processing, the endpoint's answers to bad input, and one pipeline run.

The service tests use a small model trained here in seconds on a few repeated sentences, so its
suggestions are known: "My dear Lizzy, I am very" -> "glad to hear it."
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from forgeline.checkpoint import save_model_folder
from forgeline.compose import Composer, ComposeSettings, cut_phrase, should_trigger
from models.gpt import GPT, GPTConfig
from models.gpt2_export import export_gpt2
from models.sampling import GenerationConfig, beam_search, extend_prompt_cache
from serve.app import create_app
from serve.compose import MAX_PREFIX_CHARS, ComposeService, flags_pii, make_router
from tests import conftest
from tests.conftest import run_in

SENTENCES = ["My dear Lizzy, I am very glad to hear it.", "Pray write to me at once, my dear sister.",
             "You may send it to harriet.smith@gmail.com tomorrow.", "I am very glad to see you again."]
STAGES = ["compose_data", "compose_tokenizer", "compose_pretrain", "compose_finetune", "compose_eval"]


def memorising_model(folder):
    """A model folder whose model has learnt SENTENCES by heart (~5 s on one core); threshold -1."""
    from tasks.tokenizer import train_bpe

    text = " ".join(SENTENCES * 40)
    tok = train_bpe([text], vocab_size=400)
    ids = tok.encode(text).ids
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=128, n_layer=2, n_head=2, n_embd=64,
                          pos_encoding="learned", norm="layernorm", mlp="gelu"))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95))
    data = torch.tensor(ids)
    for step in range(200):
        starts = torch.randint(len(ids) - 65, (8,))
        x = torch.stack([data[s:s + 64] for s in starts])
        y = torch.stack([data[s + 1:s + 65] for s in starts])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5, loss.item()
    folder.mkdir(parents=True, exist_ok=True)
    tok_file = folder.parent / "compose_tokenizer.json"
    tok.save(str(tok_file))
    save_model_folder(folder, model.eval(), model.config, tok_file)
    (folder / "compose.json").write_text(json.dumps({**asdict(ComposeSettings(debounce_ms=100)), "threshold": -1.0}))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return memorising_model(tmp_path_factory.mktemp("compose") / "model")


@pytest.fixture(scope="module")
def client(model_dir):
    return TestClient(create_app([("compose", make_router(ComposeService(model_dir)))]))


# ----------------------------------------------------------------------------- triggering


@pytest.mark.parametrize("prefix, event, idle, expected", [
    ("My dear Lizzy, I am ", "type", 500, "ok"),
    ("My dear Lizzy, I am", "type", 500, "not_word_boundary"),      # mid-word
    ("My dear Lizzy, I a", "type", 500, "not_word_boundary"),
    ("My dear Lizzy, I am  ", "type", 500, "not_word_boundary"),    # a second space: not a word end
    ("My dear ", "type", 500, "prefix_too_short"),                  # 2 words < min_prefix_words 3
    ("My dear Lizzy, I am ", "backspace", 500, "after_backspace"),
    ("My dear Lizzy, I am ", "reject", 500, "after_reject"),
    ("My dear Lizzy, I am ", "type", 40, "debounce"),               # keys still coming fast
])
def test_triggering(prefix, event, idle, expected):
    ok, reason = should_trigger(prefix, event, idle, ComposeSettings(min_prefix_words=3, debounce_ms=100))
    assert reason == expected and ok == (expected == "ok")


# ----------------------------------------------------------------------------- cut and post-processing


def test_cut_phrase_ends_at_a_word_or_sentence_boundary():
    assert cut_phrase(" glad to hear it. And then", False, 5) == "glad to hear it."      # sentence end
    assert cut_phrase(" glad to hear yo", False, 5) == "glad to hear"                   # drops a fragment
    assert cut_phrase(" glad to hear you", True, 5) == "glad to hear you"               # end of text: whole
    assert cut_phrase(" one two three four five six seven", False, 3) == "one two three"  # word cap
    assert cut_phrase(" first line\nsecond", True, 5) == "first line"
    assert cut_phrase("ly glad", False, 5) is None      # continues the word being typed
    assert cut_phrase(" glad", False, 5) is None        # one fragment: nothing whole


def test_pii_in_the_suggestion_or_completed_by_it():
    assert flags_pii("You may send it to ", "harriet.smith@gmail.com tomorrow.")
    assert flags_pii("call me on 555-123-", "4567 today")          # the suggestion completes a phone number
    assert flags_pii("my card is ", "4111 1111 1111 1111")
    assert not flags_pii("My dear Lizzy, I am very ", "glad to hear it.")
    assert not flags_pii("write to harriet.smith@gmail.com and ", "tell her")  # PII only in the prefix


# ----------------------------------------------------------------------------- beam search over a reused cache


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "sincos"])
def test_beam_search_from_a_reused_prompt_cache_equals_a_fresh_search(pos_encoding):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32,
                          pos_encoding=pos_encoding)).eval()
    cfg = GenerationConfig(max_new_tokens=6, num_beams=4, num_return_sequences=4, stop_tokens=(1,))
    seq = torch.randint(2, 97, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    cache, computed_all = None, []
    # keystrokes: extend by one token, by two, backspace (shorter), the same prompt again, a new text
    for n in (5, 6, 7, 9, 8, 8, 12, 3, 20):
        prompt = seq[:n]
        cache, computed = extend_prompt_cache(model, prompt, cache, capacity=40)
        computed_all.append(computed)
        cached = beam_search(model, [prompt], cfg, prompt_cache=cache)[0]
        fresh = beam_search(model, [prompt], cfg)[0]
        assert [h.tokens for h in cached] == [h.tokens for h in fresh]
        assert [h.score for h in cached] == pytest.approx([h.score for h in fresh], abs=1e-4)
    # only what changed ran: one token per typed token, the last token again after a backspace
    assert computed_all == [5, 1, 1, 2, 1, 0, 4, 1, 17]
    with pytest.raises(ValueError, match="exactly the one prompt"):
        beam_search(model, [seq[:4]], cfg, prompt_cache=cache)


def test_composer_window_moves_in_strides(model_dir):
    composer = Composer.load(model_dir, context_tokens=12, window_stride=4)
    ids = composer.tokenizer.encode(" ".join(SENTENCES)).ids
    text = " ".join(SENTENCES)
    starts = set()
    for cut in range(20, len(text), 7):
        window = composer.prompt_ids(text[:cut])
        assert len(window) <= 12
        starts.add(len(composer.tokenizer.encode(text[:cut].rstrip(" ")).ids) - len(window))
    assert all(s % 4 == 0 for s in starts) and len(ids) > 12


# ----------------------------------------------------------------------------- the endpoint


def test_suggests_the_learnt_phrase_and_reuses_the_sessions_cache(client):
    prefix = "My dear Lizzy, I am very"
    r = client.post("/v1/compose", json={"prefix": prefix, "session_id": "s1", "idle_ms": 30})
    assert r.status_code == 200 and r.json()["triggered"] is False and r.json()["reason"] == "not_word_boundary"
    first = r.json()["computed_tokens"]
    r = client.post("/v1/compose", json={"prefix": prefix + " ", "session_id": "s1", "idle_ms": 300})
    body = r.json()
    assert r.status_code == 200 and body["triggered"] and body["reason"] == "ok", body
    assert body["suggestion"].startswith("glad to")
    assert body["score"] >= body["threshold"]
    assert body["cached_tokens"] >= first - 1 and body["computed_tokens"] <= 1   # the prompt was cached
    # typing on mid-word: no suggestion, the cache follows
    r = client.post("/v1/compose", json={"prefix": prefix + " gl", "session_id": "s1", "idle_ms": 300})
    assert r.json()["triggered"] is False and r.json()["cached_tokens"] >= first - 1
    # a backspace or a rejected suggestion: no new one at once
    for event in ("backspace", "reject"):
        r = client.post("/v1/compose", json={"prefix": prefix + " ", "session_id": "s1", "last_event": event})
        assert r.json()["suggestion"] is None and r.json()["reason"] == f"after_{event}"


def test_threshold_filters_low_confidence(model_dir):
    strict = model_dir.parent / "strict"
    strict.mkdir(exist_ok=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (strict / name).write_bytes((model_dir / name).read_bytes())
    (strict / "compose.json").write_text(json.dumps({"threshold": -1e-6}))   # nothing is that sure
    c = TestClient(create_app([("compose", make_router(ComposeService(strict)))]))
    body = c.post("/v1/compose", json={"prefix": "My dear Lizzy, I am very "}).json()
    assert body["triggered"] and body["suggestion"] is None and body["reason"] == "low_confidence"
    assert body["score"] is not None and body["score"] < body["threshold"]


def test_drops_a_suggestion_holding_pii(client):
    body = client.post("/v1/compose", json={"prefix": "Pray write to me at once. You may send it to "}).json()
    assert body["triggered"] and body["suggestion"] is None and body["reason"] == "pii", body


@pytest.mark.parametrize("payload, status", [
    ({"prefix": ""}, 400),
    ({"prefix": "   "}, 400),
    ({"prefix": 42}, 400),                                  # not text
    ({"prefix": ["a", "b"]}, 400),
    ({"prefix": "hello\x00world "}, 400),                   # a control character
    ({"prefix": "caf\ufffd au lait "}, 400),                # undecodable bytes upstream
    ({"prefix": "x " * (MAX_PREFIX_CHARS // 2 + 1)}, 413),  # over-long
    ({}, 400),                                              # no prefix
    ({"prefix": "hello there you ", "colour": "red"}, 400),  # unknown field
])
def test_bad_input_is_a_clear_400_or_413(client, payload, status):
    r = client.post("/v1/compose", json=payload)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


def test_bad_bodies_are_400_or_413_never_500(client):
    assert client.post("/v1/compose", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/v1/compose", content=b"\xff\xfe\x00", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/v1/compose", content=b"[1, 2]", headers={"content-type": "application/json"}).status_code == 400
    big = json.dumps({"prefix": "a " * 20_000}).encode()
    assert client.post("/v1/compose", content=big, headers={"content-type": "application/json"}).status_code == 413


def test_without_a_model_the_endpoint_says_so(tmp_path):
    c = TestClient(create_app([("compose", make_router(ComposeService(tmp_path / "none")))]))
    r = c.post("/v1/compose", json={"prefix": "My dear Lizzy, I am "})
    assert r.status_code == 503 and "forgeline run compose" in r.json()["detail"]
    assert c.post("/v1/compose", json={"prefix": ""}).status_code == 400   # bad input is checked first


def test_gpt2_export_gives_transformers_the_same_beams(model_dir):
    from transformers import GPT2LMHeadModel

    composer = Composer.load(model_dir)
    folder = export_gpt2(composer.model, model_dir.parent / "gpt2", eos_token_id=composer.eot, pad_token_id=0)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = composer.prompt_ids("My dear Lizzy, I am very ")
    x = torch.tensor([prompt])
    assert torch.allclose(hf(x).logits, composer.model(x)[0], atol=1e-4)
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), num_beams=4, max_new_tokens=8, do_sample=False,
                         eos_token_id=composer.eot, pad_token_id=0)[0, len(prompt):].tolist()
    ours = beam_search(composer.model, [prompt], composer.gen)[0][0].tokens
    assert ours == theirs


# ----------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
def test_compose_pipeline_end_to_end(workspace):
    short = ["compose_data.max_pairs=40", "compose_pretrain.max_steps=30", "compose_pretrain.eval_interval=15",
             "compose_pretrain.ckpt_interval=15", "compose_pretrain.log_interval=10", "compose_finetune.max_steps=10",
             "compose_finetune.eval_batches=2", "compose_eval.sim_sentences=4"]
    out = run_in(workspace, "-m", "flows.compose", "--no-push", *short)
    assert conftest.stage_lines(out.stdout, STAGES) == {s: "ran" for s in STAGES}, out.stdout[-3000:]
    data = workspace / "data"
    pairs = pd.read_parquet(data / "compose_data" / "pairs.parquet")
    domain = pd.read_parquet(data / "compose_data" / "domain.parquet")
    # split by document: no held-out chapter's text is in training
    assert set(domain.loc[domain["split"] == "train", "doc_id"]).isdisjoint(pairs["doc_id"])
    assert all(p.endswith(" ") for p in pairs["prefix"])
    metrics = json.loads((data / "compose_eval" / "metrics.json").read_text())
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] < metrics["perplexity_base"] * 1.5
    assert 0 <= metrics["test_coverage"] <= 1 and 0 <= metrics["saved_keystrokes"] < 1
    served = json.loads((data / "compose_eval" / "model" / "compose.json").read_text())
    assert served["threshold"] == metrics["threshold"] and served["num_beams"] == 4
    assert (data / "compose_eval" / "precision_coverage.png").stat().st_size > 0
    assert (data / "compose_pretrain" / "model.safetensors").exists()
    assert json.loads((data / "compose_pretrain" / "config.json").read_text())["pos_encoding"] == "learned"


# ----------------------------------------------------------------------------- data and metrics


def test_domain_is_dialogue_and_letters_and_pairs_cut_at_word_boundaries():
    import random

    from tasks.compose_data import ComposeDataConfig, domain_mask, make_pairs

    paras = ["It was a fine morning in the country.",
             '"I am very glad to see you," said Emma.',
             "My dear Lizzy,", "I write in haste to tell you all is well.",
             "Yours affectionately, Jane.", "She folded the letter and sat down."]
    assert domain_mask(paras) == [False, True, True, True, True, False]
    pairs = make_pairs([("doc", "I write in haste to tell you all is well. We go home on Monday.")],
                       ComposeDataConfig(min_prefix_words=3), random.Random(0))
    assert len(pairs) == 2
    for p in pairs:
        assert p["prefix"].endswith(" ") and len(p["prefix"].split()) >= 3 and p["completion"]
        assert (p["prefix"] + p["completion"]) in "I write in haste to tell you all is well. We go home on Monday."


def test_precision_coverage_threshold_and_exact_match():
    from tasks.compose_eval import curve, exact_match, right_words, tune_threshold

    truth = ["glad to hear it.", "at once, my dear", "the world", "very well indeed"]
    results = [("glad to", -0.5), ("at home", -0.7), (None, -math.inf), ("very well indeed", -2.0)]
    assert right_words("glad to", "glad to hear it.") == 2 and right_words("at home", "at once, my") == 1
    points = curve(results, truth)
    assert [p["coverage"] for p in points] == [0.25, 0.5, 0.75]
    assert [p["precision"] for p in points] == pytest.approx([1.0, 0.5, 2 / 3])
    assert tune_threshold(points, 0.5) == -0.7 and tune_threshold(points, 0.9) == -2.0
    em = exact_match(results, truth, threshold=-0.7)
    assert em["coverage"] == 0.5
    assert em["exact_match@1"] == 1.0 and em["shown@1"] == 2       # first words "glad" and "at" both right
    assert em["exact_match@2"] == 0.5 and em["shown@2"] == 2       # "glad to" right, "at home" wrong
    assert em["exact_match@3_all"] == 0.25                         # only "very well indeed", unfiltered
