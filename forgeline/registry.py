"""Model registry: the trained model of a pipeline run becomes a version of `forgeline-llm`.

The version's source is the training stage run's `model/` artifacts (safetensors weights, config,
tokenizer; logged by the rlhf stage, tasks/rlhf/, the last training stage). Its tags name where it came from, so `forgeline lineage
models:/forgeline-llm@candidate` can walk back from it: the Prefect flow run, the git commit, the
MLflow run and the DVC md5 of the stage output the weights came from.

    register("rlhf", parent_run_id, flow_run_id)   # the flow's last step
    model = load_model("models:/forgeline-llm@candidate")  # a GPT, no pickle involved
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from forgeline.tracking import init_tracking, tracking_uri

MODEL_NAME = "forgeline-llm"
ALIAS = "candidate"


def has_model(client, run_id: str) -> bool:
    return "model" in {a.path for a in client.list_artifacts(run_id)}


def stage_run(client, parent_run_id: str, stage: str):
    """The pipeline run's child run of `stage`, and the run that trained the model it holds.

    A skipped stage (DVC found it up to date) points at its producer with `forgeline.reused_run_id`.
    A stage DVC restored from its run cache ran no code, so logged no model: the model is then
    that of the earliest finished run of the stage with the same output md5s.
    """
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp_id], max_results=5,
                              filter_string=(f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                             f"and tags.`forgeline.stage` = '{stage}'"))
    if not runs:
        raise LookupError(f"pipeline run {parent_run_id} has no {stage} stage run")
    child = runs[0]
    producer = client.get_run(child.data.tags.get("forgeline.reused_run_id") or child.info.run_id)
    if has_model(client, producer.info.run_id):
        return child, producer
    outs = " and ".join(f"tags.`{k}` = '{v}'" for k, v in producer.data.tags.items() if k.startswith("dvc.out."))
    if outs:
        for run in client.search_runs([exp_id], order_by=["attributes.start_time ASC"], max_results=50,
                                      filter_string=f"tags.`forgeline.stage` = '{stage}' and "
                                                    f"attributes.status = 'FINISHED' and {outs}"):
            if has_model(client, run.info.run_id):
                return child, run
    raise FileNotFoundError(f"{stage} run {producer.info.run_id} logged no model/ artifacts, nor did any "
                            f"finished {stage} run with the same DVC outputs")


def register(stage: str, parent_run_id: str, flow_run_id: str = "", alias: str = ALIAS,
             name: str = MODEL_NAME) -> dict[str, Any]:
    """Register the `model/` artifacts of the run that trained this pipeline run's model.

    Idempotent per training run: a pipeline run that reused the model (stage skipped) gets the
    existing version back, tags unchanged (they name the flow run that trained it). Moves `alias`
    to the version. Returns {'name', 'version', 'run_id', 'created', 'uri'}.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    init_tracking()
    client = mlflow.MlflowClient(tracking_uri())
    child, producer = stage_run(client, parent_run_id, stage)
    run_id = producer.info.run_id
    try:
        client.create_registered_model(name, description="Forgeline LLM: model/ artifacts of a training stage run")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    created = not existing
    if existing:
        version = max(existing, key=lambda v: int(v.version))
    else:
        tags = {"forgeline.stage": stage, "prefect.flow_run_id": producer.data.tags.get("prefect.flow_run_id", flow_run_id),
                "git.commit": producer.data.tags.get("git.commit", "unknown"),
                "mlflow.parent_run_id": producer.data.tags.get("mlflow.parentRunId", parent_run_id)}
        tags.update({k: v for k, v in producer.data.tags.items() if k.startswith(("dvc.out.", "lineage.upstream."))})
        version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags,
                                              description=f"{stage} run {run_id}")
    client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(child.info.run_id, "forgeline.model_version", f"{name}/{version.version}")
    return {"name": name, "version": int(version.version), "run_id": run_id, "created": created,
            "uri": f"models:/{name}/{version.version}"}


def resolve(uri: str):
    """`models:/name@alias` or `models:/name/version` -> its ModelVersion."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = rest.rpartition("/")
    return client.get_model_version(name, version)


def download(uri: str, dst: str | Path) -> Path:
    """The model files of a registered version (or any artifact URI), copied into `dst`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))


def load_model(uri: str = f"models:/{MODEL_NAME}@{ALIAS}", device: str = "cpu"):
    """A registered version back into a GPT: config.json + model.safetensors, no pickle."""
    from forgeline.checkpoint import load_model_folder

    with tempfile.TemporaryDirectory(prefix="forgeline-model-") as tmp:
        return load_model_folder(download(uri, tmp), device=device)
