"""`forgeline lineage`: the chain from a registered model back to the raw documents, each link
verified (MLflow run, git commit, DVC objects in cache/remote, weights = DVC out, source sha256),
and a broken link named when one is. Runs on the session's stack (tests/test_stack.py).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.test_stack import shared_stack

pytestmark = pytest.mark.slow

# the registered model is the rlhf stage's; a stage comes after every stage that read its outputs, so
# chat_data and pretrain (both read by sft) share a place and may come in either order
CHAIN = ["model_version", "rlhf", "reward", "sft", {"chat_data", "pretrain"}, "tokenizer", "chunk", "validate",
         "ingest", "documents"]


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    stack = shared_stack(request, tmp_path_factory)
    first = stack.wait(stack.runs["first"], timeout=900)
    assert first.state_type.value == "COMPLETED", stack.log_tail()
    stack.wait(stack.runs["second"], timeout=300)  # nothing runs while we look
    return stack


def lineage(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgeline", "lineage", *args], cwd=stack.ws, env=stack.env(),
                          capture_output=True, text=True, timeout=300)


def chain_of(result: dict) -> list[str]:
    return [link["kind"] if link["kind"] != "stage" else link["stage"] for link in result["links"]]


def link_of(result: dict, stage: str) -> dict:
    return next(link for link in result["links"] if link.get("stage") == stage and link["kind"] == "stage")


def matches_chain(chain: list[str]) -> bool:
    tie = CHAIN.index({"chat_data", "pretrain"})
    return (chain[:tie] == CHAIN[:tie] and set(chain[tie:tie + 2]) == CHAIN[tie]
            and chain[tie + 2:] == CHAIN[tie + 1:])


def test_model_to_documents_json(stack):
    proc = lineage(stack, "models:/forgeline-llm@candidate", "--json")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and not result["broken"]
    assert matches_chain(chain_of(result)), chain_of(result)
    model, *stages, docs = result["links"]
    assert "candidate" in model["aliases"] and model["flow_run_id"] == stages[0]["flow_run_id"]
    assert stack.flow_run(model["flow_run_id"]).state_type.value == "COMPLETED"
    assert {c["what"]: c["ok"] for c in model["checks"]}["weights = DVC out"] is True
    lock = __import__("yaml").safe_load((stack.ws / "dvc.lock").read_text())["stages"]
    for link in stages:
        assert link["status"] == "FINISHED" and link["git_commit"].removesuffix("-dirty")
        assert link["outs"] == {o["path"]: o["md5"] for o in lock[link["stage"]]["outs"]}
        assert all(c["ok"] for c in link["checks"]), link["checks"]
    assert model["run_id"] == stages[0]["run_id"]
    assert stages[0]["upstream"]["sft"] == link_of(result, "sft")["run_id"]
    assert stages[0]["upstream"]["reward"] == link_of(result, "reward")["run_id"]
    assert link_of(result, "sft")["upstream"]["pretrain"] == link_of(result, "pretrain")["run_id"]
    assert link_of(result, "pretrain")["upstream"]["tokenizer"] == link_of(result, "tokenizer")["run_id"]
    # raw inputs: every source file with its sha256, checked against the commit
    summary = json.loads((stack.ws / "data" / "ingest" / "summary.json").read_text())
    assert len(docs["documents"]) == summary["documents"] > 0
    assert all(len(d["sha256"]) == 64 for d in docs["documents"])
    assert docs["dep_md5"] == next(d["md5"] for d in lock["ingest"]["deps"] if d["path"] == "data/raw")
    assert {c["what"]: c["ok"] for c in docs["checks"]}["source files"] is True


def test_text_output_and_run_id_entry(stack):
    result = json.loads(lineage(stack, "models:/forgeline-llm@candidate", "--json").stdout)
    tokenizer_run = link_of(result, "tokenizer")["run_id"]
    proc = lineage(stack, tokenizer_run)
    assert proc.returncode == 0, proc.stdout[-3000:]
    heads = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [h.split("] ", 1)[1].split()[0] for h in heads] == ["tokenizer", "chunk", "validate", "ingest", "documents:"], heads
    assert f"run {tokenizer_run}" in proc.stdout and "OK" in proc.stdout.splitlines()[0]


def test_missing_dvc_object_breaks_its_link(stack, tmp_path):
    result = json.loads(lineage(stack, "models:/forgeline-llm@candidate", "--json").stdout)
    tokenizer = link_of(result, "tokenizer")
    md5 = tokenizer["outs"]["data/tokenizer"]
    manifest = json.loads((stack.ws / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())
    victim = next(e["md5"] for e in manifest if e["relpath"] == "train.bin")
    homes = [stack.ws / base / "files/md5" / victim[:2] / victim[2:] for base in (".dvc/cache", ".dvcstore")]
    moved = []
    try:
        for i, path in enumerate(homes):
            if path.exists():
                moved.append((path, tmp_path / str(i)))
                shutil.move(path, tmp_path / str(i))
        proc = lineage(stack, "models:/forgeline-llm@candidate")
    finally:
        for src, dst in moved:
            shutil.move(dst, src)
    assert proc.returncode == 2
    assert "BROKEN" in proc.stdout.splitlines()[0]
    broken = proc.stdout.split("broken links:")[1]
    assert f"tokenizer ({tokenizer['run_id']}): out data/tokenizer" in broken and "train.bin" in broken, broken
    assert "pretrain (" not in broken and "chunk (" not in broken
    # in the cache only, or on the remote only, is fine
    assert lineage(stack, "models:/forgeline-llm@candidate").returncode == 0


def test_unknown_git_commit_breaks_its_link(stack):
    result = json.loads(lineage(stack, "models:/forgeline-llm@candidate", "--json").stdout)
    chunk = link_of(result, "chunk")
    client = stack.mlflow()
    client.set_tag(chunk["run_id"], "git.commit", "0" * 40)
    try:
        proc = lineage(stack, "models:/forgeline-llm@candidate", "--json")
    finally:
        client.set_tag(chunk["run_id"], "git.commit", chunk["git_commit"])
    assert proc.returncode == 2
    broken = json.loads(proc.stdout)["broken"]
    assert broken == [f"chunk ({chunk['run_id']}): git commit: {'0' * 40} is not in this repository"], broken
