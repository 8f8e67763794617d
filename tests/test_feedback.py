"""Feedback closes the loop: the store, the pair rules, POST /v1/feedback, the chat_data merge, and
(slow) the whole loop on the session's stack: records -> `forgeline feedback export` (dvc add) ->
a run of the llm/nightly deployment with rlhf.algorithm=dpo -> chat_data merges the pairs -> DPO
trains on them -> a new model version."""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forgeline.chat import read_jsonl
from forgeline.feedback import append_record, latest, make_record, preference_pairs, read_records

ROOT = Path(__file__).resolve().parents[1]
Q1 = [{"role": "user", "content": "What is 2 + 3?"}]
Q2 = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "Spell backwards: c a t"}]


def rec(id, messages, reply, rating, better=None, session="s1"):
    return make_record(id=id, session=session, messages=messages, reply=reply, rating=rating, better=better,
                       model="forgeline-llm", model_version="3")


# ----------------------------------------------------------------------------- the store


def _append_many(store: str, worker: int) -> None:
    for i in range(100):
        append_record(rec(f"w{worker}-{i}", Q1, "x" * 3000, "up"), Path(store))


def test_store_appends_from_many_processes_never_interleave(tmp_path):
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(str(tmp_path), w))
             for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 400 and len({json.loads(line)["id"] for line in lines}) == 400


def test_a_torn_last_line_is_skipped_and_the_last_record_of_an_id_counts(tmp_path):
    append_record(rec("a", Q1, "6", "up"), tmp_path)
    append_record(rec("a", Q1, "6", "down", better="5"), tmp_path)
    with open(tmp_path / "records.jsonl", "a") as fh:
        fh.write('{"id": "b", "sess')   # a crash mid-write
    records = read_records(tmp_path)
    assert [r["id"] for r in records] == ["a", "a"]
    (a,) = latest(records)
    assert a["rating"] == "down" and a["better"] == "5" and a["time"].endswith("+00:00")


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="rating"):
        rec("a", Q1, "6", "meh")
    with pytest.raises(ValueError, match="end with the user turn"):
        rec("a", Q1 + [{"role": "assistant", "content": "5"}], "6", "up")
    with pytest.raises(ValueError, match="user/assistant"):
        rec("a", [{"role": "system", "content": "x"}, *Q1], "6", "up")


# ----------------------------------------------------------------------------- the pair rules


def test_pair_rules():
    records = [
        rec("r1", Q1, "6", "down", better="5"),             # better_answer: 5 over 6
        rec("r2", Q1, "5", "up", session="s2"),              # thumbs_up: 5 over each reply to Q1 rated down
        rec("r3", Q1, "7", "down"),                          # thumbs_up: 5 over 7
        rec("r4", Q2, "t a c", "up", better="t a c!"),       # better answer on a reply rated up: no pair
        rec("r5", Q2, "c a t", None, better="t a c"),        # unrated: no pair
        rec("r6", Q2, "a c t", "down", better="a c t"),      # better answer = the reply: no better_answer pair,
        rec("r7", Q1, "4", "down"), rec("r7", Q1, "4", "up"),  # but r4 rated up answers Q2; r7 ends rated up
    ]
    pairs = preference_pairs(records)
    got = sorted((p["rule"], p["chosen"], p["rejected"], tuple(p["records"])) for p in pairs)
    # r1's better answer is r2's reply: that pair is kept once, under the rule that found it first
    assert got == [("better_answer", "5", "6", ("r1",)), ("thumbs_up", "4", "6", ("r1", "r7")),
                   ("thumbs_up", "4", "7", ("r3", "r7")), ("thumbs_up", "5", "7", ("r3", "r2")),
                   ("thumbs_up", "t a c", "a c t", ("r6", "r4"))]
    pair = next(p for p in pairs if p["records"] == ["r3", "r2"])
    assert pair["prompt"] == Q1 and pair["sessions"] == ["s1", "s2"] and pair["model_version"] == "3"


def test_export_command_writes_the_pairs(tmp_path):
    store = tmp_path / "store"
    for r in (rec("r1", Q1, "6", "down", better="5"), rec("r2", Q2, "t a c", "up")):
        append_record(r, store)
    out = tmp_path / "pairs.jsonl"
    proc = subprocess.run([sys.executable, "-m", "forgeline", "feedback", "export", "--store", str(store),
                           "--out", str(out), "--no-dvc", "--no-guard"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 records, 2 replies" in proc.stdout and "1 pairs" in proc.stdout
    (pair,) = read_jsonl(out)
    assert (pair["rule"], pair["chosen"], pair["rejected"], pair["prompt"]) == ("better_answer", "5", "6", Q1)


def test_the_guard_screens_pairs_before_training_moves_towards_them(tmp_path):
    """A chosen reply the response evaluator flags (the classifier, PII) or a prompt the input filter flags
    is never exported; the rest is."""
    from forgeline.feedback import export
    from tests.test_serve_llm import RuleGuard   # the guard's real rules, its classifier flagging "bomb"

    guard = RuleGuard()
    q_card = [{"role": "user", "content": "my card is 4111 1111 1111 1111, what is 2 + 3?"}]
    for r in (rec("ok", Q1, "6", "down", better="5"),
              rec("harm", Q2, "t a c", "down", better="build a bomb like this"),
              rec("pii", Q2, "x", "down", better="mail me at jane.doe@gmail.com"),
              rec("card", q_card, "6", "down", better="5")):
        append_record(r, tmp_path)
    found = export(tmp_path, tmp_path / "pairs.jsonl", dvc=False, guard=guard)
    assert [p["records"] for p in read_jsonl(tmp_path / "pairs.jsonl")] == [["ok"]]
    assert found["dropped"] == {"violence_weapons": 1, "pii": 2}


# ----------------------------------------------------------------------------- POST /v1/feedback


@pytest.fixture
def client(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.page import router

    monkeypatch.setenv("FORGELINE_FEEDBACK_DIR", str(tmp_path))
    with TestClient(create_app([("page", router)])) as c:
        yield c


def test_post_feedback_stores_a_record(client, tmp_path):
    body = {"id": "chatcmpl-1", "session": "sess-1", "messages": Q2, "reply": "t a c", "rating": "down",
            "better": " t a c ", "model": "forgeline-llm", "model_version": "7"}
    res = client.post("/v1/feedback", json=body)
    assert res.status_code == 200 and res.json()["stored"] is True
    (stored,) = read_records(tmp_path)
    assert {k: stored[k] for k in body} == {**body, "better": "t a c"}


@pytest.mark.parametrize("body, status, param", [
    ("not json", 400, None),
    ({"id": "x", "session": "s", "messages": Q1, "reply": "r", "rating": "great"}, 400, None),
    ({"id": "x", "session": "s", "messages": "hi", "reply": "r", "rating": "up"}, 400, "messages"),
    ({"id": "x", "session": "s", "messages": Q1, "reply": 5, "rating": "up"}, 400, "reply"),
    ({"id": "x", "session": "s", "messages": Q1, "reply": "r", "rating": "up", "admin": True}, 400, "admin"),
    ({"id": "x", "session": "s", "messages": Q1, "reply": "r" * 300_000, "rating": "up"}, 413, None),
])
def test_post_feedback_refuses_bad_bodies(client, tmp_path, body, status, param):
    res = client.post("/v1/feedback", content=body if isinstance(body, str) else json.dumps(body),
                      headers={"Content-Type": "application/json"})
    assert res.status_code == status
    err = res.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param
    assert read_records(tmp_path) == []


def test_the_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "/page/chat.js" in page.text and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in client.get("/page/chat.js").text
    assert client.get("/page/..%2Fpage.py").status_code == 404


# ----------------------------------------------------------------------------- the chat_data merge


def test_chat_data_merges_feedback_pairs_with_provenance(tmp_path):
    from tasks.chat_data import ChatDataConfig, chat_data

    store = tmp_path / "store"
    questions = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(30)]
    for i, q in enumerate(questions):
        append_record(rec(f"r{i}", q, str(i), "down", better=str(i + 1)), store)
    subprocess.run([sys.executable, "-m", "forgeline", "feedback", "export", "--store", str(store),
                    "--out", str(tmp_path / "pairs.jsonl"), "--no-dvc", "--no-guard"], cwd=ROOT, check=True, capture_output=True)
    cfg = ChatDataConfig(pydocs=str(ROOT / "data/raw/pydocs/pydocs_head.txt.gz"),
                         words=str(ROOT / "data/raw/austen/persuasion.txt.gz"), out_dir=str(tmp_path / "out"),
                         train_per_task=5, val_per_task=2, feedback=str(tmp_path / "pairs.jsonl"))
    summary = chat_data(cfg)
    rows = {s: read_jsonl(tmp_path / "out" / f"pref_{s}.jsonl") for s in ("train", "val")}
    fb = {s: [r for r in rows[s] if r["provenance"] == "feedback"] for s in rows}
    assert len(fb["train"]) + len(fb["val"]) == 30 and fb["train"] and fb["val"]   # split by conversation
    assert all(r["provenance"] == "rule" for s in rows for r in rows[s] if r["task"] != "feedback")
    for r in fb["train"] + fb["val"]:
        assert r["prompt"][0] == {"role": "system", "content": cfg.system_prompt} and r["rule"] == "better_answer"
        i = int(r["rejected"])
        assert r["prompt"][1:] == questions[i] and r["chosen"] == str(i + 1) and r["records"] == [f"r{i}"]
    assert summary["pref_provenance"]["feedback"] == 30
    assert summary["pref_train"]["better_answer"] == len(fb["train"])
    assert "Feedback pairs" in (tmp_path / "out" / "card.md").read_text()


def test_chat_data_without_feedback_and_with_a_dvc_file_but_no_data(tmp_path):
    from tasks.chat_data import feedback_pairs

    assert feedback_pairs(str(tmp_path / "pairs.jsonl"), "sys", 0.1) == {"train": [], "val": []}
    (tmp_path / "pairs.jsonl.dvc").write_text("outs:\n- md5: 0\n  path: pairs.jsonl\n")
    with pytest.raises(FileNotFoundError, match="dvc pull"):
        feedback_pairs(str(tmp_path / "pairs.jsonl"), "sys", 0.1)


def test_the_shipped_feedback_folder_is_a_valid_empty_dep():
    """A fresh clone has data/feedback/ (in git) without pairs: chat_data's dep exists, no pairs come in."""
    tracked = subprocess.run(["git", "ls-files", "data/feedback"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "data/feedback/README.md" in tracked.split() and "data/feedback/pairs.jsonl" not in tracked.split()
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["chat_data"]["deps"]
    assert "data/feedback" in deps
    assert yaml.safe_load((ROOT / "configs/chat_data.yaml").read_text())["feedback"] == "data/feedback/pairs.jsonl"


# ----------------------------------------------------------------------------- the whole loop, on the session's stack


@pytest.mark.slow
def test_ratings_retrain_with_dpo_from_the_deployment(request, tmp_path_factory):
    """records -> `forgeline feedback export` (dvc add, committed) -> a run of llm/nightly with
    rlhf.algorithm=dpo: chat_data merges the pairs, DPO trains on that chat data, a new version is registered."""
    from tests.test_stack import shared_stack

    stack = shared_stack(request, tmp_path_factory)
    for name in ("first", "second"):   # the stack's own runs; ours queues behind them anyway
        assert stack.wait(stack.runs[name], timeout=900).state_type.value == "COMPLETED", stack.log_tail()
    ws = stack.ws
    store = ws / ".forgeline" / "feedback"   # where the page stores them in that workspace
    for r in (rec("a1", Q1, "6", "down", better="5"), rec("a2", Q1, "5", "up", session="s2"),
              rec("a3", Q1, "7", "down"), rec("a4", Q2, "c a t", "down", better="t a c"),
              rec("a5", Q2, "t a c", "up"), rec("a6", Q2, "a c t", "down")):
        append_record(r, store)
    out = stack.cli("feedback", "export", "--no-guard").stdout   # screening: test_the_guard_screens_pairs_...
    assert "6 records" in out and "4 pairs" in out, out
    assert (ws / "data/feedback/pairs.jsonl.dvc").exists() and not subprocess.run(
        ["git", "ls-files", "--error-unmatch", "data/feedback/pairs.jsonl"], cwd=ws, capture_output=True).returncode == 0
    exported = read_jsonl(ws / "data/feedback/pairs.jsonl")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(git + ["add", "data/feedback/pairs.jsonl.dvc", "data/feedback/.gitignore"], cwd=ws, check=True)
    subprocess.run(git + ["commit", "-qm", "feedback pairs"], cwd=ws, check=True)

    run_id = stack.trigger({"rlhf": {"algorithm": "dpo"}})
    done = stack.wait(run_id, timeout=900)
    assert done.state_type.value == "COMPLETED", (done.state, stack.log_tail())

    # chat_data merged every exported pair, with its provenance
    rows = [r for s in ("train", "val") for r in read_jsonl(ws / "data/chat_data" / f"pref_{s}.jsonl")]
    merged = sorted((r["chosen"], r["rejected"]) for r in rows if r["provenance"] == "feedback")
    assert merged == sorted((p["chosen"], p["rejected"]) for p in exported) and len(merged) == 4
    # DPO trained in this flow run on that chat data; its model is the new candidate
    client = stack.mlflow()
    exp = client.get_experiment_by_name("forgeline-llm").experiment_id
    runs = {r.data.tags["forgeline.stage"]: r for r in client.search_runs(
        [exp], filter_string=f"tags.`prefect.flow_run_id` = '{run_id}'") if "forgeline.stage" in r.data.tags}
    chat, rlhf = runs["chat_data"], runs["rlhf"]
    assert chat.data.tags["dvc.skipped"] == "false" and "dvc.dep.data/feedback" in chat.data.tags
    assert rlhf.data.tags["dvc.skipped"] == "false" and rlhf.data.tags["rlhf.algorithm"] == "dpo"
    assert rlhf.data.tags["dvc.dep.data/chat_data"] == chat.data.tags["dvc.out.data/chat_data"]
    # the exported pairs of the train split had a share of every DPO batch
    train_feedback = [r for r in read_jsonl(ws / "data/chat_data/pref_train.jsonl") if r["provenance"] == "feedback"]
    assert rlhf.data.metrics["feedback_pairs_train"] == len(train_feedback) > 0
    assert int(rlhf.data.params["feedback_per_batch"]) > 0
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    dep = next(d for d in lock["chat_data"]["deps"] if d["path"] == "data/feedback")
    assert chat.data.tags["dvc.dep.data/feedback"] == dep["md5"]
    (version,) = client.search_model_versions(f"name='forgeline-llm' and tags.`prefect.flow_run_id` = '{run_id}'")
    assert client.get_model_version_by_alias("forgeline-llm", "candidate").version == version.version
