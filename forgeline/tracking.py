"""MLflow tracking: one sqlite store inside the project by default, one experiment per pipeline
(`forgeline-<pipeline>`), one run per stage.

A stage started by the pipeline finds its (already created, nested) run id in FORGELINE_RUN_ID
and logs into it: the run already lives in the pipeline's experiment. A stage started by hand or by
`dvc repro` alone opens a run of its own in the experiment of the pipeline whose flow lists the
stage (flows/<pipeline>.py's STAGES; a stage no flow lists yet goes to `forgeline-adhoc`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any, Iterator

from forgeline.paths import ROOT, STATE
from forgeline.pipelines import experiment_name, pipeline_of


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[None]:
    """An flock on `path`: released by the kernel when the holder dies, so never stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def init_tracking(pipeline: str | None = None) -> str:
    """Point MLflow at the store and create its schema and the pipeline's experiment once, under a lock.

    A fresh sqlite file migrated by two processes at once can be corrupted, so the first
    touch of the store is serialised here. With a pipeline, makes `forgeline-<pipeline>` the active
    experiment and returns its id; without one (a process that logs into runs made elsewhere)
    sets no experiment and returns "".
    """
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # only a sqlite file needs the lock; a server serialises its own schema creation, and holding
    # the lock through the client's network retries would stall every other process
    lock = file_lock(STATE / "mlflow-init.lock") if uri.startswith("sqlite:") else contextlib.nullcontext()
    with lock:
        client = mlflow.MlflowClient(uri)
        if pipeline is None:
            client.search_experiments(max_results=1)  # the first query creates the schema
            return ""
        name = experiment_name(pipeline)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///"):
                # the default ./mlruns is relative to the cwd of whoever logs first: pin it
                # beside the database file
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            exp_id = client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def stage_run(stage: str, config: dict[str, Any]) -> Iterator[Any]:
    """Open the stage's MLflow run and log its resolved config as params.

    `stage` is the DVC stage's name: a generic module run with another config logs under that
    config's name (`python -m tasks.ingest config=configs/rag_ingest.yaml` -> run `rag_ingest`)."""
    import mlflow

    from forgeline.lineage import git_commit

    run_id = os.environ.get("FORGELINE_RUN_ID")
    # a pipeline's run already lives in its experiment (MLflow refuses to resume it under another
    # active one); by hand, the stage logs to the experiment of the pipeline it belongs to
    init_tracking(None if run_id else pipeline_of(stage) or "adhoc")
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config).items()})
        mlflow.set_tags({"forgeline.stage": stage, "git.commit": git_commit()})
        yield run
