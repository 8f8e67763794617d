"""Model registry: the trained model of a pipeline run becomes a version of `forgeline-llm`.

The version's source is the training stage run's `model/` artifacts (safetensors weights, config,
tokenizer; logged by the rlhf stage, tasks/rlhf/, the last training stage). Its tags name where it came from, so `forgeline lineage
models:/forgeline-llm@candidate` can walk back from it: the Prefect flow run, the git commit, the
MLflow run and the DVC md5 of the stage output the weights came from.

    register("rlhf", parent_run_id, flow_run_id)   # the flow's last step
    model = load_model("models:/forgeline-llm@candidate")  # a GPT, no pickle involved

**Alias history.** MLflow keeps only where an alias points now. Every move made here (`move_alias`:
registration, the deploy gate, `forgeline rollback`) also writes one registered-model tag
`forgeline.alias_history.<ns since epoch>` = JSON {alias, from, to, kind, at, by, via, reason}, so the
history lives in the registry itself (sqlite, PostgreSQL or a server alike) and sorts by its key.
`rollback` replays it: each promotion pushes a champion, each rollback pops one, and the alias goes
back to the version below the top.

    forgeline models                 # versions, aliases, the alias history
    forgeline rollback [--reason ..] # champion back to the previous champion, recorded
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from forgeline.tracking import init_tracking, tracking_uri

MODEL_NAME = "forgeline-llm"
ALIAS = "candidate"
CHAMPION = "champion"       # what serving runs; moved by the deploy gate and `forgeline rollback`
CHALLENGER = "challenger"   # the last candidate the gate turned down
HISTORY_TAG = "forgeline.alias_history."


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
    move_alias(alias, version.version, kind="register", reason=f"registered from {stage} run {run_id}",
               via=f"flow run {flow_run_id}" if flow_run_id else "", name=name, client=client)
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


# ----------------------------------------------------------------------------- aliases and their history


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient(tracking_uri())


def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def aliases(name: str = MODEL_NAME, client=None) -> dict[str, int]:
    """{alias: version} of the registered model; {} when it is not registered yet."""
    from mlflow.exceptions import MlflowException

    try:
        return {a: int(v) for a, v in (client or mlflow_client()).get_registered_model(name).aliases.items()}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def move_alias(alias: str, version: int | str, kind: str, reason: str, via: str = "", name: str = MODEL_NAME,
               client=None) -> dict[str, Any] | None:
    """Point `alias` at `version` and append the move to the alias history. Returns the history entry,
    or None when the alias already points there (nothing moved, nothing recorded).

    kind: register | promote | challenger | rollback | set; via: the run or command that moved it."""
    client = client or mlflow_client()
    before = aliases(name, client).get(alias)
    if before == int(version):
        return None
    client.set_registered_model_alias(name, alias, str(version))
    return _record(client, name, alias, before, int(version), kind, reason, via)


def clear_alias(alias: str, kind: str, reason: str, via: str = "", name: str = MODEL_NAME,
                client=None) -> dict[str, Any] | None:
    """Remove `alias` and record it (`to` None); None when it was not set."""
    client = client or mlflow_client()
    before = aliases(name, client).get(alias)
    if before is None:
        return None
    client.delete_registered_model_alias(name, alias)
    return _record(client, name, alias, before, None, kind, reason, via)


def _record(client, name: str, alias: str, before: int | None, after: int | None, kind: str, reason: str,
            via: str) -> dict[str, Any]:
    event = {"alias": alias, "from": before, "to": after, "kind": kind,
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": _who(), "via": via,
             "reason": reason[:2000]}
    client.set_registered_model_tag(name, f"{HISTORY_TAG}{time.time_ns():020d}", json.dumps(event))
    return event


def alias_history(name: str = MODEL_NAME, alias: str | None = None, client=None) -> list[dict[str, Any]]:
    """Every recorded alias move of the registered model (or of one alias), oldest first."""
    client = client or mlflow_client()
    tags = client.get_registered_model(name).tags
    events = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(HISTORY_TAG)]
    return [e for e in events if alias is None or e["alias"] == alias]


def champion_stack(events: list[dict[str, Any]]) -> list[int]:
    """The champions still standing, oldest first, from one alias's history: a move pushes its
    version (unless it is already on top), a rollback pops the version it left."""
    stack: list[int] = []
    for e in events:
        if e["kind"] == "rollback":
            if stack and stack[-1] == e["from"]:
                stack.pop()
            if not stack or stack[-1] != e["to"]:
                stack.append(e["to"])
        elif e["to"] is not None and (not stack or stack[-1] != e["to"]):
            stack.append(e["to"])
    return stack


def rollback(alias: str = CHAMPION, reason: str = "", via: str = "forgeline rollback", name: str = MODEL_NAME,
             client=None) -> dict[str, Any]:
    """Move `alias` back to the version it pointed at before the current one, and record it.

    Repeated rollbacks walk further back (v1, v2, v3 promoted: rollback -> v2, again -> v1). An alias
    moved outside this history (by hand in the MLflow UI) goes back to the last version the history knows."""
    client = client or mlflow_client()
    current = aliases(name, client).get(alias)
    stack = champion_stack(alias_history(name, alias, client))
    if stack and stack[-1] != current:
        target = stack[-1]
    elif len(stack) >= 2:
        target = stack[-2]
    else:
        raise LookupError(f"{name}@{alias}: no earlier version in its alias history to roll back to "
                          f"(history: {stack or 'empty'})")
    event = move_alias(alias, target, kind="rollback", reason=reason or f"rolled back from version {current}",
                       via=via, name=name, client=client)
    assert event is not None  # target != current by construction
    return event


def models(name: str = MODEL_NAME, client=None) -> dict[str, Any]:
    """What `forgeline models` shows: every version with its aliases and deploy decision, and the alias history."""
    client = client or mlflow_client()
    where = aliases(name, client)
    if not where and not client.search_registered_models(f"name = '{name}'"):
        return {"name": name, "registered": False, "versions": [], "aliases": {}, "history": []}
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    rows = [{"version": int(v.version), "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.creation_timestamp / 1000)),
             "aliases": sorted(a for a, n in where.items() if n == int(v.version)), "run_id": v.run_id,
             "stage": v.tags.get("forgeline.stage", ""), "deploy": v.tags.get("forgeline.deploy.decision", ""),
             "failed": v.tags.get("forgeline.deploy.failed", "")} for v in versions]
    return {"name": name, "registered": True, "versions": rows, "aliases": where,
            "history": alias_history(name, client=client)}


def format_models(info: dict[str, Any]) -> str:
    if not info["registered"]:
        return f"{info['name']}: not registered yet (a pipeline run registers it)"
    lines = [f"{info['name']}: " + ", ".join(f"@{a} -> v{v}" for a, v in sorted(info["aliases"].items())), "",
             f"{'version':>7}  {'created (UTC)':<16}  {'aliases':<30}  {'deploy gate':<10}  run"]
    for r in info["versions"]:
        lines.append(f"{r['version']:>7}  {r['created']:<16}  {','.join(r['aliases']) or '-':<30}  "
                     f"{r['deploy'] or '-':<10}  {r['run_id']}" + (f"\n{'':>9}failed: {r['failed']}" if r["failed"] else ""))
    lines += ["", "alias history (oldest first):"]
    for e in info["history"]:
        src, dst = ("none" if v is None else f"v{v}" for v in (e["from"], e["to"]))
        lines.append(f"  {e['at']}  @{e['alias']}: {src} -> {dst}  [{e['kind']}] by {e['by']}"
                     + (f" via {e['via']}" if e["via"] else "") + f": {e['reason']}")
    if not info["history"]:
        lines.append("  (none recorded)")
    return "\n".join(lines)
