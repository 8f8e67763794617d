"""A one-off run's overrides apply to that run only.

The files in configs/ come back byte for byte after the run (also after an exception, and after a
SIGKILL: the next run puts them back first), comments survive the override, the stage's MLflow
params hold the values it ran with, dvc.lock the params its outputs were made with, and the next
plain run uses the file's values.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from forgeline.config import one_off_overrides, write_overrides
from forgeline.paths import CONFIGS
from tests.conftest import make_workspace, run_in, workspace_env

CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def first_key(path: Path) -> str:
    return next(iter(yaml.safe_load(path.read_text())))


@pytest.mark.parametrize("src", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_override_changes_only_its_line_and_restores_byte_for_byte(src, tmp_path):
    path = tmp_path / "configs" / src.name
    path.parent.mkdir()
    path.write_bytes(src.read_bytes())
    original = src.read_text()
    key = first_key(path)
    backup = tmp_path / ".forgeline" / "config-backup.json"
    with one_off_overrides({path: {key: "overridden"}}, backup, root=tmp_path):
        assert yaml.safe_load(path.read_text())[key] == "overridden"
        before, after = original.splitlines(), path.read_text().splitlines()
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        # every comment, blank line and key order kept: only the overridden key's line differs
        assert len(before) == len(after) and len(changed) == 1, changed
        assert changed[0][1].startswith(f"{key}: overridden")
        assert backup.exists()
    assert path.read_bytes() == src.read_bytes() and not backup.exists()


def test_write_overrides_keeps_the_comment_on_the_overridden_line(tmp_path):
    path = tmp_path / "chunk.yaml"
    path.write_text("# header\nsplitter: recursive      # recursive | regex\nchunk_size: 1000  # in chars\n")
    write_overrides("chunk", {"chunk_size": 800, "chunk_overlap": 50}, path)
    assert path.read_text() == ("# header\nsplitter: recursive      # recursive | regex\n"
                                "chunk_size: 800   # in chars\nchunk_overlap: 50\n")


def test_exception_in_the_block_restores(tmp_path):
    path = tmp_path / "chunk.yaml"
    path.write_bytes(b"chunk_size: 1000   # keep me\n")
    backup = tmp_path / "backup.json"
    with pytest.raises(RuntimeError), one_off_overrides({path: {"chunk_size": 5}}, backup, root=tmp_path):
        raise RuntimeError("a stage failed")
    assert path.read_bytes() == b"chunk_size: 1000   # keep me\n" and not backup.exists()


# --- pipeline_run in a throw-away copy of the repo (real git, DVC, MLflow) ---------------------

def script(overrides: dict, body: str, stages: tuple[str, ...] = ("chunk",)) -> str:
    imports = "".join(f"from tasks.{s} import {s.capitalize()}Config\n" for s in stages)
    classes = ", ".join(f"{s!r}: {s.capitalize()}Config" for s in stages)
    return (f"import json, time\nimport yaml\nfrom forgeline.workspace import pipeline_run, run_stage\n{imports}"
            f"with pipeline_run('llm', {{{classes}}}, {overrides!r}) as run:\n"
            + "".join(f"    {line}\n" for line in textwrap.dedent(body).strip().splitlines()))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("overrides"))


def test_exception_inside_pipeline_run_restores_configs(ws):
    original = (ws / "configs" / "chunk.yaml").read_bytes()
    proc = run_in(ws, sys.executable, "-c", script({"chunk": {"chunk_size": 777}}, """
        assert yaml.safe_load(open('configs/chunk.yaml'))['chunk_size'] == 777
        raise RuntimeError('a stage failed')"""), check=False)
    assert proc.returncode != 0 and "RuntimeError: a stage failed" in proc.stderr, proc.stderr[-3000:]
    assert "AssertionError" not in proc.stderr  # the override was in the file during the run
    assert (ws / "configs" / "chunk.yaml").read_bytes() == original
    assert not (ws / ".forgeline" / "config-backup.json").exists()


def test_killed_run_is_restored_by_the_next_run(ws):
    original = (ws / "configs" / "chunk.yaml").read_bytes()
    killed = subprocess.Popen(
        [sys.executable, "-c", script({"chunk": {"chunk_size": 777}}, "print('running', flush=True)\ntime.sleep(300)")],
        cwd=ws, env=workspace_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = killed.stdout.readline()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert line.strip() == "running", killed.stderr.read()[-3000:]
    # what a killed run leaves: its override in the file, the original in the backup
    assert yaml.safe_load((ws / "configs" / "chunk.yaml").read_text())["chunk_size"] == 777
    assert (ws / ".forgeline" / "config-backup.json").exists()
    proc = run_in(ws, sys.executable, "-c", script({}, """
        print('inside:', yaml.safe_load(open('configs/chunk.yaml'))['chunk_size'])"""))
    assert "restored configs/chunk.yaml" in proc.stdout
    assert f"inside: {yaml.safe_load(original)['chunk_size']}" in proc.stdout
    assert (ws / "configs" / "chunk.yaml").read_bytes() == original
    assert not (ws / ".forgeline" / "config-backup.json").exists()


@pytest.mark.slow
def test_plain_run_after_a_one_off_run_uses_the_files_value(ws):
    """Ingest with ocr_workers=1 as a one-off, then a plain run: ingest reruns with the file's 2."""
    from tests.test_flow import mlflow_runs
    from tests.test_stack import trim_sample

    trim_sample(ws)  # text files only: no OCR, so ingest takes seconds
    path = ws / "configs" / "ingest.yaml"
    original = path.read_bytes()
    in_file = yaml.safe_load(original)["ocr_workers"]
    run_ingest = "r = run_stage('ingest', run['parent_run_id'])\nprint('RESULT', json.dumps(r))"

    def result(proc) -> dict:
        (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        return json.loads(line.removeprefix("RESULT "))

    one_off = result(run_in(ws, sys.executable, "-c", script({"ingest": {"ocr_workers": 1}}, run_ingest, ("ingest",))))
    assert not one_off["skipped"]
    assert path.read_bytes() == original  # back as committed: git sees nothing
    assert run_in(ws, "git", "status", "--porcelain", "--untracked-files=no").stdout == ""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["ingest"]
    assert lock["params"]["configs/ingest.yaml"]["ocr_workers"] == 1  # what the outputs were made with

    plain = result(run_in(ws, sys.executable, "-c", script({}, run_ingest, ("ingest",))))
    assert not plain["skipped"], "the outputs were made with other params: ingest must rerun"
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["ingest"]
    assert lock["params"]["configs/ingest.yaml"]["ocr_workers"] == in_file

    client, runs = mlflow_runs(ws)
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[one_off["run_id"]].data.params["ocr_workers"] == "1"
    assert by_id[plain["run_id"]].data.params["ocr_workers"] == str(in_file)
    # neither the override nor its restore made a commit tag `-dirty`: the parents' and the stages' own
    for run in (by_id[one_off["run_id"]], by_id[plain["run_id"]]):
        parent = by_id[run.data.tags["mlflow.parentRunId"]]
        assert not run.data.tags["git.commit"].endswith("-dirty"), run.data.tags["git.commit"]
        assert not parent.data.tags["git.commit"].endswith("-dirty")
