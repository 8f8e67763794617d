"""`forgeline lineage`: the chain from a registered model back to the raw documents, each check
OK, BROKEN or UNVERIFIED (MLflow run, git commit, upstream tags, DVC objects in cache/remote,
deps at the commit, weights = DVC out, source sha256), and what is not OK named with its reason.

Fast tests: a two-stage chain (ingest -> train -> registered model) built in tmp_path with real
git, DVC (`dvc commit` writes dvc.lock and the cache) and an MLflow sqlite store. Slow tests: the
session's stack (tests/test_stack.py), after a whole pipeline run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_stack import shared_stack

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


@pytest.mark.slow
def test_model_to_documents_json(stack):
    proc = lineage(stack, "models:/forgeline-llm@candidate", "--json")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["state"] != "BROKEN" and not result["broken"], result["broken"]
    # a `-dirty` commit (code not reproducible from a commit), and nothing else, may be left unverified
    assert all(": git commit: " in u and "-dirty" in u for u in result["unverified"]), result["unverified"]
    assert matches_chain(chain_of(result)), chain_of(result)
    model, *stages, docs = result["links"]
    assert "candidate" in model["aliases"] and model["flow_run_id"] == stages[0]["flow_run_id"]
    assert stack.flow_run(model["flow_run_id"]).state_type.value == "COMPLETED"
    assert {c["what"]: c["state"] for c in model["checks"]}["weights = DVC out"] == "OK"
    lock = __import__("yaml").safe_load((stack.ws / "dvc.lock").read_text())["stages"]
    for link in stages:
        assert link["status"] == "FINISHED" and link["git_commit"].removesuffix("-dirty")
        assert link["outs"] == {o["path"]: o["md5"] for o in lock[link["stage"]]["outs"]}
        assert all(c["state"] == "OK" or c["what"] == "git commit" for c in link["checks"]), link["checks"]
        code = f"tasks/{link['stage']}" + ("" if (stack.ws / "tasks" / link["stage"]).is_dir() else ".py")
        assert any(c["what"] == f"dep {code}" and c["state"] == "OK" for c in link["checks"]), (code, link["checks"])
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
    assert {c["what"]: c["state"] for c in docs["checks"]}["source files"] == "OK"


@pytest.mark.slow
def test_text_output_and_run_id_entry(stack):
    result = json.loads(lineage(stack, "models:/forgeline-llm@candidate", "--json").stdout)
    tokenizer_run = link_of(result, "tokenizer")["run_id"]
    proc = lineage(stack, tokenizer_run)
    assert proc.returncode == 0, proc.stdout[-3000:]
    heads = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [h.split("] ", 1)[1].split()[0] for h in heads] == ["tokenizer", "chunk", "validate", "ingest", "documents:"], heads
    state = json.loads(lineage(stack, tokenizer_run, "--json").stdout)["state"]
    assert f"run {tokenizer_run}" in proc.stdout and proc.stdout.splitlines()[0].endswith(f": {state}")


@pytest.mark.slow
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
    broken = proc.stdout.split("broken links:")[1].split("unverified (")[0]
    assert f"tokenizer ({tokenizer['run_id']}): out data/tokenizer" in broken and "train.bin" in broken, broken
    assert "pretrain (" not in broken and "chunk (" not in broken
    # in the cache only, or on the remote only, is fine
    assert lineage(stack, "models:/forgeline-llm@candidate").returncode == 0


@pytest.mark.slow
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


# ---- fast: a two-stage chain built in tmp_path (real git, DVC and MLflow sqlite; no pipeline run)

RAW = {"a.txt": b"alpha\n", "b.txt": b"beta\n", "late.txt": b"read by ingest, never committed\n"}
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """ingest (deps tasks/ingest.py, data/raw) -> train (dep data/ingest/documents.parquet) -> version 1
    of `forgeline-llm` @candidate, tagged the way workspace.py and registry.py tag them. Every check OK."""
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from dvc.repo import Repo

    from forgeline.lineage import digests

    ws = tmp_path_factory.mktemp("chain")
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=ws, check=True)
    for rel, data in {**{f"data/raw/{k}": v for k, v in RAW.items()}, "tasks/ingest.py": b"# ingest\n"}.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(data)
    (ws / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "ingest": {"cmd": "true", "deps": ["tasks/ingest.py", "data/raw"], "outs": ["data/ingest"]},
        "train": {"cmd": "true", "deps": ["data/ingest/documents.parquet"], "outs": ["data/train"]}}}))
    pq.write_table(pa.table({"source": list(RAW), "sha256": [hashlib.sha256(b).hexdigest() for b in RAW.values()],
                             "kind": ["text"] * len(RAW)}), _mkparent(ws / "data/ingest/documents.parquet"))
    weights = os.urandom(4096)
    _mkparent(ws / "data/train/model.safetensors").write_bytes(weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)  # DVC's run cache resolves stage paths from the cwd
        Repo.init(str(ws)).close()
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-q", "-d", "store", str(ws.parent / "store")],
                       cwd=ws, check=True)
        with Repo(str(ws)) as repo:
            repo.commit(None, force=True)  # dvc.lock and the cache, as `dvc repro` leaves them
    # late.txt stays uncommitted: ingest read it from the working tree
    subprocess.run(GIT + ["add", "tasks", "data/raw/a.txt", "data/raw/b.txt", "dvc.yaml", ".dvc"], cwd=ws, check=True)
    subprocess.run(GIT + ["commit", "-qm", "chain"], cwd=ws, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("forgeline-llm", artifact_location=(ws / "mlartifacts").as_uri())
    runs = {}
    for stage, upstream in (("ingest", {}), ("train", {"ingest": "ingest"})):
        found = digests(stage, ws)
        tags = {"forgeline.stage": stage, "git.commit": sha, "prefect.flow_run_id": "flow-1", "dvc.skipped": "false",
                **{f"dvc.dep.{p}": m for p, m in found["deps"].items()},
                **{f"dvc.out.{p}": m for p, m in found["outs"].items()},
                **{f"lineage.upstream.{u}": runs[u] for u in upstream}}
        run_id = client.create_run(exp, tags=tags).info.run_id
        if stage == "ingest":
            client.log_param(run_id, "source", "data/raw")
        else:
            client.log_artifact(run_id, str(ws / "data/train/model.safetensors"), "model")
        client.set_terminated(run_id, "FINISHED")
        runs[stage] = run_id
    client.create_registered_model("forgeline-llm")
    version = client.create_model_version("forgeline-llm", f"runs:/{runs['train']}/model", run_id=runs["train"],
                                          tags={"forgeline.stage": "train", "prefect.flow_run_id": "flow-1",
                                                "git.commit": sha})
    client.set_registered_model_alias("forgeline-llm", "candidate", version.version)
    return SimpleNamespace(ws=ws, uri=uri, client=client, exp=exp, runs=runs, sha=sha, weights=weights)


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def audit(chain, monkeypatch, capsys):
    """`forgeline lineage <args>` on the chain, in-process: (exit code, stdout)."""
    import forgeline.lineage
    from forgeline import cli

    monkeypatch.setattr(forgeline.lineage, "ROOT", chain.ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", chain.uri)
    monkeypatch.setenv("NO_PROXY", os.environ.get("NO_PROXY", ""))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(["lineage", *args])
        return code, capsys.readouterr().out
    return run


def audit_json(audit, target: str = "models:/forgeline-llm@candidate") -> dict:
    return json.loads(audit(target, "--json")[1])


def states(result: dict) -> dict[tuple[str, str], str]:
    """{(link, check): state} over the chain."""
    return {(link.get("stage", link["kind"]), c["what"]): c["state"]
            for link in result["links"] for c in link["checks"]}


@contextlib.contextmanager
def tag(chain, run_id: str, key: str, value: str):
    old = chain.client.get_run(run_id).data.tags[key]
    chain.client.set_tag(run_id, key, value)
    try:
        yield
    finally:
        chain.client.set_tag(run_id, key, old)


@contextlib.contextmanager
def moved(*paths: Path):
    """Move files or folders aside for the duration."""
    aside = [(p, p.with_name(p.name + ".aside")) for p in paths]
    for src, dst in aside:
        shutil.move(src, dst)
    try:
        yield
    finally:
        for src, dst in aside:
            shutil.move(dst, src)


def test_fully_checked_chain_is_ok_even_under_strict(chain, audit):
    result = audit_json(audit)
    names = [link.get("stage", link["kind"]) for link in result["links"]]
    assert names == ["model_version", "train", "ingest", "documents"], names
    assert set(states(result).values()) == {"OK"}, states(result)
    assert result["state"] == "OK" and result["ok"] and not result["broken"] and not result["unverified"]
    # compared, not assumed: the registered weights' md5 is the DVC out's file md5
    weights = next(c for c in result["links"][0]["checks"] if c["what"] == "weights = DVC out")
    assert hashlib.md5(chain.weights).hexdigest() in weights["detail"]
    # raw data: late.txt is not in git at the run's commit, so data/raw is verified in the working tree
    assert states(result)[("ingest", "dep data/raw")] == "OK"
    assert "working tree" in next(c["detail"] for c in result["links"][2]["checks"] if c["what"] == "dep data/raw")
    code, out = audit("models:/forgeline-llm@candidate", "--strict")
    assert code == 0 and out.splitlines()[0] == "lineage of models:/forgeline-llm@candidate: OK"


def test_empty_upstream_tag_is_broken_and_named(chain, audit):
    train = chain.runs["train"]
    with tag(chain, train, "lineage.upstream.ingest", ""):
        result = audit_json(audit)
        code, _ = audit("models:/forgeline-llm@candidate")
    assert result["state"] == "BROKEN" and code == 2
    assert result["broken"] == [f"train ({train}): upstream ingest: tag lineage.upstream.ingest is empty: no run is "
                                "recorded as making the ingest output this stage read; the chain ends here"]


def test_dirty_commit_is_unverified_and_fails_strict(chain, audit):
    train = chain.runs["train"]
    with tag(chain, train, "git.commit", chain.sha + "-dirty"):
        result = audit_json(audit)
        plain, out = audit("models:/forgeline-llm@candidate")
        strict, _ = audit("models:/forgeline-llm@candidate", "--strict")
    assert result["state"] == "UNVERIFIED" and not result["ok"] and not result["broken"]
    assert states(result)[("train", "git commit")] == "UNVERIFIED"
    assert result["unverified"] == [f"train ({train}): git commit: {chain.sha}-dirty: tracked files differed from the "
                                    "commit when the run started, so its code is not reproducible from a commit"]
    assert (plain, strict) == (0, 3)
    assert out.splitlines()[0].endswith(": UNVERIFIED") and "unverified (could not be checked here" in out


def test_unreachable_artifact_store_is_unverified_not_ok(chain, audit):
    """The registered weights cannot be downloaded: neither they nor their match with the DVC out count as checked.
    Here: artifacts proxied by the stack's MLflow server (`mlflow-artifacts:`), audited from the sqlite
    store while the server is down."""
    source = f"mlflow-artifacts:/{chain.exp}/{chain.runs['train']}/artifacts/model"
    chain.client.create_registered_model("offline-llm")
    chain.client.create_model_version("offline-llm", source, run_id=chain.runs["train"],
                                      tags={"forgeline.stage": "train", "prefect.flow_run_id": "flow-1",
                                            "git.commit": chain.sha})
    result = audit_json(audit, "models:/offline-llm/1")
    got = states(result)
    assert got[("model_version", "artifacts")] == "UNVERIFIED", result["links"][0]["checks"]
    assert got[("model_version", "weights = DVC out")] == "UNVERIFIED"
    assert result["state"] == "UNVERIFIED" and not result["broken"]
    assert "mlflow-artifacts URI" in result["unverified"][0] and "not compared" in result["unverified"][1]
    assert audit("models:/offline-llm/1")[0] == 0 and audit("models:/offline-llm/1", "--strict")[0] == 3


def test_unreachable_dvc_remote_is_unverified_and_weights_compared_from_the_working_tree(chain, audit):
    out_md5 = chain.client.get_run(chain.runs["train"]).data.tags["dvc.out.data/train"]
    cached = chain.ws / ".dvc/cache/files/md5" / out_md5[:2] / out_md5[2:]
    config = chain.ws / ".dvc/config"
    saved = config.read_text()
    config.write_text(saved.replace(str(chain.ws.parent / "store"), "http://127.0.0.1:9/store"))
    try:
        with moved(cached):
            result = audit_json(audit)
            with moved(chain.ws / "data/train"):
                not_compared = audit_json(audit)
    finally:
        config.write_text(saved)
    got = states(result)
    assert got[("train", "out data/train")] == "UNVERIFIED"
    assert "remote 'store' unreachable" in " ".join(result["unverified"])
    # the out's listing is not in the cache, but data/train in the working tree hashes to the out's md5
    assert got[("model_version", "weights = DVC out")] == "OK"
    assert result["state"] == "UNVERIFIED"
    assert states(not_compared)[("model_version", "weights = DVC out")] == "UNVERIFIED"


def test_weights_differing_from_the_dvc_out_are_broken(chain, audit):
    run_id = chain.client.create_run(chain.exp, tags=chain.client.get_run(chain.runs["train"]).data.tags).info.run_id
    other = chain.ws.parent / "other" / "model.safetensors"
    _mkparent(other).write_bytes(b"not the trained weights")
    chain.client.log_artifact(run_id, str(other), "model")
    chain.client.set_terminated(run_id, "FINISHED")
    chain.client.create_registered_model("swapped-llm")
    chain.client.create_model_version("swapped-llm", f"runs:/{run_id}/model", run_id=run_id,
                                      tags={"forgeline.stage": "train", "prefect.flow_run_id": "flow-1",
                                            "git.commit": chain.sha})
    result = audit_json(audit, "models:/swapped-llm/1")
    assert states(result)[("model_version", "weights = DVC out")] == "BROKEN"
    assert any("weights = DVC out" in b and hashlib.md5(b"not the trained weights").hexdigest() in b
               for b in result["broken"]), result["broken"]


def test_source_file_not_found_is_unverified_and_changed_is_broken(chain, audit):
    late = chain.ws / "data/raw/late.txt"
    with moved(late):
        gone = audit_json(audit)
    late.write_bytes(b"edited since ingest read it\n")
    try:
        edited = audit_json(audit)
    finally:
        late.write_bytes(RAW["late.txt"])
    assert states(gone)[("documents", "source files")] == "UNVERIFIED"
    assert states(gone)[("ingest", "dep data/raw")] == "UNVERIFIED"
    assert gone["state"] == "UNVERIFIED" and "late.txt" in " ".join(gone["unverified"])
    assert states(edited)[("documents", "source files")] == "BROKEN" and "late.txt" in " ".join(edited["broken"])


def test_text_output_shows_the_three_states_apart(chain, audit):
    train, ingest = chain.runs["train"], chain.runs["ingest"]
    with tag(chain, train, "git.commit", chain.sha + "-dirty"), \
            tag(chain, ingest, "dvc.out.data/ingest", "0" * 32 + ".dir"):
        code, out = audit("models:/forgeline-llm@candidate")
    heads = [line for line in out.splitlines() if line.startswith("[")]
    assert [h[:13] for h in heads] == ["[OK        ] ", "[UNVERIFIED] ", "[BROKEN    ] ", "[UNVERIFIED] "], heads
    assert [h[13:].split()[0] for h in heads] == ["model", "train", "ingest", "documents:"]
    assert out.splitlines()[0].endswith(": BROKEN") and code == 2
    # ingest's out is gone: that link is BROKEN; the documents it listed could not be read, so are UNVERIFIED
    assert "        BROKEN  out data/ingest: md5 " + "0" * 32 in out and "UNVERIFIED  documents table: " in out
    assert "    UNVERIFIED  git commit: " in out and "            OK  mlflow run: status FINISHED" in out
    broken, unverified = out.split("broken links:\n")[1].split("unverified (could not be checked here")
    assert f"ingest ({ingest}): out data/ingest" in broken and f"train ({train}): git commit" in unverified
