"""The workspace a pipeline run holds: one at a time, stages reproduced by DVC, lineage in MLflow.

DVC is the one owner of staleness: each stage is `dvc repro --single-item <stage>`; DVC skips it
when its deps, params and outs match dvc.lock. Every stage still gets an MLflow child run under
the pipeline's parent run; a skipped one says so and points at the run that made its outputs.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import yaml

from forgeline.lineage import digests, git_commit, read_lock
from forgeline.paths import ROOT, STATE
from forgeline.tracking import init_tracking, tracking_uri

LOCK = STATE / "pipeline.lock"
# configs/ as they were before the running pipeline run wrote its one-off overrides (config.one_off_overrides)
CONFIG_BACKUP = STATE / "config-backup.json"


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


@contextlib.contextmanager
def hold_workspace(owner: dict[str, Any], wait_s: float = 0.0, poll_s: float = 1.0) -> Iterator[None]:
    """Hold the workspace lock for a whole pipeline run, waiting up to `wait_s` for it.

    An flock dies with its process, so a killed run never leaves the workspace locked.
    """
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    fh = open(LOCK, "a+")
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "unknown"
                    raise WorkspaceBusy(
                        f"the workspace {ROOT} is held by another pipeline run ({holder}); "
                        f"waited {wait_s:.0f}s. Retry when it finishes, or raise wait_s.") from None
                time.sleep(poll_s)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"), **owner}))
        fh.flush()
        yield
    finally:
        fh.close()  # closing the descriptor releases the flock


def _stage_env(run_id: str) -> dict[str, str]:
    """Environment for the stage command DVC starts: our interpreter first on PATH."""
    env = {"FORGELINE_RUN_ID": run_id, "MLFLOW_TRACKING_URI": tracking_uri(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return env


def _dataset(path: str, md5: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(ROOT / path))
    return MetaDataset(source=source, name=path, digest=md5[:36])


def run_stage(stage: str, parent_run_id: str, flow_run_id: str = "") -> dict[str, Any]:
    """Reproduce one DVC stage inside an MLflow child run; return what happened.

    Returns {'stage', 'run_id', 'skipped', 'deps', 'outs', 'seconds'}.
    """
    import mlflow
    from dvc.repo import Repo
    from mlflow.entities import DatasetInput, InputTag, Metric, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    exp_id = _experiment_of(tracking_uri(), parent_run_id)
    client = mlflow.MlflowClient(tracking_uri())
    run = client.create_run(exp_id, tags={
        MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: stage, "forgeline.stage": stage,
        "prefect.flow_run_id": flow_run_id, "git.commit": git_commit(), "forgeline.workspace": str(ROOT)})
    run_id = run.info.run_id

    saved = {k: os.environ.get(k) for k in ("FORGELINE_RUN_ID", "MLFLOW_TRACKING_URI", "PATH")}
    os.environ.update(_stage_env(run_id))
    # DVC's logger prints its lines itself (stdout); left to propagate, Prefect's root console
    # handler prints each one again. Our own MLflow/DVC bookkeeping replaces its `git add` hint.
    logging.getLogger("dvc").propagate = False
    print(f"[{stage}] dvc repro --single-item {stage} (skipped if its deps, params and outs match dvc.lock)",
          flush=True)
    t0 = time.perf_counter()
    ran_dvc = stage not in up_to_date()
    try:
        if ran_dvc:
            with Repo(str(ROOT)) as repo:
                repo.scm_context.quiet = True
                changed = repo.reproduce(stage, single_item=True)
        else:
            changed = []
            print(f"Stage '{stage}' is up to date (dvc status), skipping", flush=True)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - t0
    # DVC may also "run" a stage by restoring its outputs from its run cache (same deps and
    # params as an earlier run): no code ran, so nothing logged params. That is a reuse too.
    restored = ran_dvc and not client.get_run(run_id).data.params
    skipped = restored or not any(s.addressing == stage for s in changed)

    found = digests(stage)
    tags = {"dvc.skipped": str(skipped).lower(), "dvc.restored_from_run_cache": str(restored).lower()}
    tags.update({f"dvc.dep.{p}": md5 for p, md5 in found["deps"].items()})
    tags.update({f"dvc.out.{p}": md5 for p, md5 in found["outs"].items()})
    if skipped:
        tags["forgeline.reused_run_id"] = producing_run(client, exp_id, stage, found["outs"])
    else:
        forget_producer(stage)  # this run is its newest producer now
    for upstream, (out_path, md5) in upstream_outs(stage).items():
        tags[f"lineage.upstream.{upstream}"] = producing_run(client, exp_id, upstream, {out_path: md5})
    client.log_batch(run_id, metrics=[Metric("stage_seconds", seconds, int(time.time() * 1000), 0)],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    datasets = [DatasetInput(_dataset(p, md5)._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "input")])
                for p, md5 in found["deps"].items() if p.startswith("data/")]
    datasets += [DatasetInput(_dataset(p, md5)._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "output")])
                 for p, md5 in found["outs"].items()]
    client.log_inputs(run_id, datasets)
    client.set_terminated(run_id, "FINISHED")
    return {"stage": stage, "run_id": run_id, "skipped": skipped, "seconds": round(seconds, 2), **found}


@functools.lru_cache(maxsize=4)
def _experiment_of(uri: str, parent_run_id: str) -> str:
    """The parent run's experiment (forgeline-<pipeline>): its stage runs go beside it. Asked once per
    pipeline run, not once per stage."""
    import mlflow

    return mlflow.MlflowClient(uri).get_run(parent_run_id).info.experiment_id


_fresh: dict[tuple, frozenset[str]] = {}


def _signature() -> tuple:
    """Size and mtime of dvc.yaml, dvc.lock and every dep and params file dvc.yaml names: a stage that
    runs rewrites dvc.lock, an edit (or a pipeline run's overrides) touches a file here."""
    dvc_yaml = ROOT / "dvc.yaml"
    stages = yaml.load(dvc_yaml.read_text(), Loader=yaml.CSafeLoader)["stages"].values()
    paths = {dvc_yaml, ROOT / "dvc.lock"}
    for s in stages:
        for item in [*s.get("deps", []), *s.get("params", [])]:
            paths.add(ROOT / (next(iter(item)) if isinstance(item, dict) else item).rstrip(":"))
    sig = []
    for path in sorted(paths):
        try:
            st = path.stat()
            sig.append((str(path), st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            sig.append((str(path), -1, -1))
    return tuple(sig)


def up_to_date() -> frozenset[str]:
    """The stages `dvc status` finds up to date (deps, params and outs match dvc.lock).

    DVC's verdict, asked once for all stages instead of once per stage: `dvc repro --single-item`
    re-parses dvc.yaml and dvc.lock (ruamel, pure Python) for each stage, ~0.3 s a stage here, most
    of what a skipped stage costs. Asked again whenever a file it depends on changed (`_signature`).
    """
    from dvc.repo import Repo

    sig = _signature()
    if sig not in _fresh:
        with Repo(str(ROOT)) as repo:
            stale = repo.status()
            _fresh.clear()
            # addressing: a dvc.yaml stage's name, a `dvc add` file's path (data/feedback/pairs.jsonl.dvc has
            # no name), as status() keys them
            _fresh[sig] = frozenset(s.addressing for s in repo.index.stages) - set(stale)
    return _fresh[sig]


def upstream_outs(stage: str) -> dict[str, tuple[str, str]]:
    """{upstream stage: (its out path, md5 in dvc.lock)} for each out this stage's deps lie in."""
    lock = read_lock()
    mine = [d["path"] for d in lock.get(stage, {}).get("deps", [])]
    found = {}
    for other, entry in lock.items():
        for out in entry.get("outs", []):
            if other != stage and any(d == out["path"] or d.startswith(out["path"] + "/") for d in mine):
                found[other] = (out["path"], out.get("md5", ""))
    return found


# producing_run's answers: {(tracking uri, experiment, stage, out path, md5): run id}. The same
# upstream is asked for by every stage downstream of it (the tokenizer's by six); an answer stays
# right until `stage` runs again (forget_producer), which makes a newer producer.
_producers: dict[tuple[str, str, str, str, str], str] = {}


def producing_run(client, exp_id: str, stage: str, outs: dict[str, str]) -> str:
    """The newest finished, non-skipped run of `stage` whose outputs have these digests."""
    if not outs:
        return ""
    path, md5 = next(iter(outs.items()))
    key = (client.tracking_uri, exp_id, stage, path, md5)
    if key not in _producers:
        runs = client.search_runs(
            [exp_id], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=(f"tags.`forgeline.stage` = '{stage}' and tags.`dvc.skipped` = 'false' "
                           f"and tags.`dvc.out.{path}` = '{md5}' and attributes.status = 'FINISHED'"))
        if not runs:
            return ""  # not remembered: a run that makes these outputs may finish later
        _producers[key] = runs[0].info.run_id
    return _producers[key]


def forget_producer(stage: str) -> None:
    for key in [k for k in _producers if k[2] == stage]:
        del _producers[key]


@contextlib.contextmanager
def pipeline_run(name: str, stages: dict[str, type], overrides: dict[str, dict[str, Any]],
                 wait_s: float = 0.0, flow_run_id: str = "") -> Iterator[dict[str, str]]:
    """Everything a pipeline run does around its stages, in order:

    1. check every stage config with its overrides (a bad one fails here, before any work);
    2. hold the workspace (one pipeline run at a time), and put back configs/ if an earlier run was
       killed before it could;
    3. write the overrides into configs/<stage>.yaml, where DVC sees them (like `dvc exp run -S`),
       for this run only: the files are restored byte for byte when the run ends, failed or not;
    4. open the parent MLflow run that each stage's child run hangs from.
    Yields {'parent_run_id', 'flow_run_id'}.
    """
    import mlflow
    import yaml

    from forgeline.config import build_config, config_path, one_off_overrides, read_backup, read_yaml, restore_backup

    # check against the configs as committed: a running (or killed) run may hold its overrides there now
    hidden = read_backup(CONFIG_BACKUP)
    for stage, cls in stages.items():
        path = config_path(stage)
        base = (yaml.safe_load(hidden[path] or b"") or {}) if path in hidden else read_yaml(path)
        build_config(cls, {**base, **overrides.get(stage, {})}, where=f"{stage} config")
    with hold_workspace({"pipeline": name, "flow_run_id": flow_run_id}, wait_s=wait_s):
        _producers.clear()  # remembered for one pipeline run: stages may have run by hand since
        restored = restore_backup(CONFIG_BACKUP)
        if restored:
            print(f"restored {', '.join(restored)} to what they were before a pipeline run that did not finish "
                  f"wrote its one-off overrides there", flush=True)
        # The commit is taken before the overrides are written and pinned for every run below (stage
        # processes inherit the variable): a config dirty only because of this run's own overrides
        # would tag each of its runs `-dirty`, yet those values are recorded exactly (overrides.json
        # on the parent run, each stage's params) and the file is put back after the run. Edits
        # made by hand before the run still make it `-dirty`.
        commit = git_commit()
        os.environ["FORGELINE_GIT_COMMIT"] = commit
        try:
            with one_off_overrides({config_path(s): kv for s, kv in overrides.items()}, CONFIG_BACKUP):
                close_orphaned_runs(init_tracking(name))  # the experiment forgeline-<name>
                with mlflow.start_run(run_name=name, tags={
                        "forgeline.pipeline": name, "prefect.flow_run_id": flow_run_id,
                        "forgeline.workspace": str(ROOT), "git.commit": commit}) as parent:
                    mlflow.log_dict(overrides, "overrides.json")
                    yield {"parent_run_id": parent.info.run_id, "flow_run_id": flow_run_id}
        finally:
            os.environ.pop("FORGELINE_GIT_COMMIT", None)


def close_orphaned_runs(exp_id: str) -> int:
    """Mark this workspace's pipeline and stage runs still RUNNING as KILLED: we hold the workspace
    lock, so none of them is alive (their process died, e.g. SIGKILL, without ending its run)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    orphans = client.search_runs([exp_id], max_results=1000, filter_string=(
        f"attributes.status = 'RUNNING' and tags.`forgeline.workspace` = '{ROOT}'"))
    for r in orphans:
        client.set_terminated(r.info.run_id, "KILLED")
    return len(orphans)


def push(remote: str | None = None) -> int:
    """`dvc push` of every stage output to the default (or named) remote; returns files pushed."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return repo.push(remote=remote)
