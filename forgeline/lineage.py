"""Lineage: git commit and the DVC digests of each stage's inputs and outputs (from dvc.lock), and
the audit that walks MLflow's lineage tags from a model version back to the raw documents,
verifying each link (`trace`; the CLI is `forgeline lineage`, docs/operations.md).
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

from forgeline.paths import ROOT


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD commit, suffixed `-dirty` when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def read_lock(root: Path = ROOT) -> dict[str, Any]:
    """dvc.lock's stages: {stage: {'cmd', 'deps': [...], 'outs': [...], 'params': {...}}}."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    return (yaml.load(lock.read_text(), Loader=yaml.CSafeLoader) or {}).get("stages", {})


def lock_entry(stage: str, root: Path = ROOT) -> dict[str, Any]:
    return read_lock(root).get(stage, {})


def digests(stage: str, root: Path = ROOT) -> dict[str, dict[str, str]]:
    """{'deps': {path: md5}, 'outs': {path: md5}} for a stage, as DVC recorded them."""
    entry = lock_entry(stage, root)
    return {kind: {item["path"]: item.get("md5", "") for item in entry.get(kind, [])}
            for kind in ("deps", "outs")}


# ---- the audit: from a registered model (or any stage run) back to the raw documents
#
#     forgeline lineage models:/forgeline-llm@candidate [--json]
#     forgeline lineage <mlflow run id>
#
# Each link is checked: its MLflow run finished, its git commit exists in this repo, every DVC
# object it recorded (outs, and each file of a directory out) is in the cache or on the remote,
# the registered weights are byte-identical to the training stage's DVC out, and each raw
# document hashes to what ingest recorded. A link that fails any check is BROKEN, by name.


def _check(what: str, ok: bool | None, detail: str = "") -> dict[str, Any]:
    """ok None = could not be checked here (not a failure)."""
    return {"what": what, "ok": ok, "detail": detail}


def commit_exists(sha: str, root: Path = ROOT) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=root,
                          capture_output=True).returncode == 0


class DvcObjects:
    """Where DVC objects are: the local cache, else the default remote (opened on first need)."""

    def __init__(self, root: Path = ROOT):
        from dvc.repo import Repo

        self.repo = Repo(str(root))
        self.cache = self.repo.cache.local
        self._remote = None
        self.remote_name = self.repo.config["core"].get("remote")

    @property
    def remote(self):
        if self._remote is None and self.remote_name:
            self._remote = self.repo.cloud.get_remote_odb(self.remote_name)
        return self._remote

    def where(self, md5: str) -> str | None:
        """'cache', 'remote <name>', or None when the object is nowhere."""
        if self.cache.exists(md5):
            return "cache"
        try:
            if self.remote is not None and self.remote.exists(md5):
                return f"remote {self.remote_name}"
        except Exception:  # an unreachable remote counts as "not there", with the cache checked first
            return None
        return None

    def read(self, md5: str) -> bytes:
        for odb in (self.cache, self.remote):
            if odb is not None and odb.exists(md5):
                with odb.fs.open(odb.oid_to_path(md5), "rb") as fh:
                    return fh.read()
        raise FileNotFoundError(f"DVC object {md5} is neither in the cache nor on the remote")

    def manifest(self, md5: str) -> dict[str, str]:
        """A directory object's files: {relpath: md5}."""
        import json

        return {e["relpath"]: e["md5"] for e in json.loads(self.read(md5))}

    def close(self) -> None:
        self.repo.close()


def _dvc_checks(objects: DvcObjects, kind: str, items: dict[str, str]) -> list[dict[str, Any]]:
    checks = []
    for path, md5 in items.items():
        where = objects.where(md5) if md5 else None
        if where is None:
            checks.append(_check(f"{kind} {path}", False,
                                 f"md5 {md5 or '?'}: neither in the DVC cache nor on remote {objects.remote_name!r}"))
            continue
        missing = []
        if md5.endswith(".dir"):
            missing = [rel for rel, m in objects.manifest(md5).items() if objects.where(m) is None]
        checks.append(_check(f"{kind} {path}", not missing,
                             f"md5 {md5} in {where}" + (f"; files missing: {missing}" if missing else "")))
    return checks


def _run_link(client, run_id: str, objects: DvcObjects, reached_by: str = "") -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        return {"kind": "stage", "stage": reached_by or "?", "run_id": run_id, "ok": False, "upstream": {},
                "checks": [_check("mlflow run", False, f"run {run_id} not found: {e.message[:200]}")]}
    tags = run.data.tags
    commit = tags.get("git.commit", "unknown")
    sha = commit.removesuffix("-dirty")
    link = {"kind": "stage", "stage": tags.get("forgeline.stage", "?"), "run_id": run_id,
            "status": run.info.status, "flow_run_id": tags.get("prefect.flow_run_id", ""),
            "git_commit": commit, "parent_run_id": tags.get("mlflow.parentRunId", ""),
            "deps": {k[len("dvc.dep."):]: v for k, v in tags.items() if k.startswith("dvc.dep.")},
            "outs": {k[len("dvc.out."):]: v for k, v in tags.items() if k.startswith("dvc.out.")},
            "upstream": {k[len("lineage.upstream."):]: v for k, v in tags.items()
                         if k.startswith("lineage.upstream.") and v},
            "params": dict(run.data.params)}
    checks = [_check("mlflow run", run.info.status == "FINISHED", f"status {run.info.status}")]
    if sha == "unknown":
        checks.append(_check("git commit", False, "no git commit recorded"))
    else:
        checks.append(_check("git commit", commit_exists(sha),
                             f"{commit}" + (" (uncommitted changes were present)" if commit.endswith("-dirty") else "")
                             if commit_exists(sha) else f"{sha} is not in this repository"))
    if not link["outs"]:
        checks.append(_check("dvc outs", False, "the run recorded no DVC outputs"))
    checks += _dvc_checks(objects, "out", link["outs"])
    # deps that are other stages' outs are checked on those links; code deps live in git
    link["checks"] = checks
    link["ok"] = all(c["ok"] is not False for c in checks)
    return link


def _model_link(client, version, objects: DvcObjects, producer: dict[str, Any]) -> dict[str, Any]:
    """The registered version: its artifacts exist and its weights are the stage's DVC out."""
    import hashlib
    import tempfile

    import mlflow

    from forgeline.tracking import tracking_uri

    link = {"kind": "model_version", "name": version.name, "version": str(version.version),
            "aliases": list(version.aliases), "run_id": version.run_id, "source": version.source,
            "flow_run_id": version.tags.get("prefect.flow_run_id", ""), "git_commit": version.tags.get("git.commit", ""),
            "tags": dict(version.tags), "upstream": {version.tags.get("forgeline.stage", "stage"): version.run_id}}
    checks = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(mlflow.artifacts.download_artifacts(f"{version.source.rstrip('/')}/model.safetensors",
                                                            dst_path=tmp, tracking_uri=tracking_uri()))
            md5 = hashlib.md5(path.read_bytes()).hexdigest()
        checks.append(_check("artifacts", True, f"{version.source}/model.safetensors md5 {md5}"))
    except Exception as e:
        md5 = None
        # an unreachable artifact server is not a broken link: it could not be checked
        unreachable = any(w in str(e) for w in ("Connection", "Max retries", "mlflow-artifacts URI"))
        checks.append(_check("artifacts", None if unreachable else False,
                             f"{version.source}: {type(e).__name__}: {str(e)[:200]}"))
    if md5:
        matched = None
        for path, out_md5 in producer.get("outs", {}).items():
            if out_md5.endswith(".dir") and objects.where(out_md5):
                want = objects.manifest(out_md5).get("model.safetensors")
                if want:
                    matched = (path, want)
        if matched is None:
            checks.append(_check("weights = DVC out", None, "no DVC out with model.safetensors to compare"))
        else:
            checks.append(_check("weights = DVC out", md5 == matched[1],
                                 f"{matched[0]}/model.safetensors md5 {matched[1]}"))
    for key in ("prefect.flow_run_id", "git.commit"):
        checks.append(_check(f"tag {key}", bool(version.tags.get(key)), version.tags.get(key, "missing")))
    link["checks"] = checks
    link["ok"] = all(c["ok"] is not False for c in checks)
    return link


def _documents_link(ingest: dict[str, Any], objects: DvcObjects, root: Path = ROOT) -> dict[str, Any]:
    """The raw inputs of an ingest run: each document's source file and sha256, checked against git."""
    import hashlib
    import io

    import pyarrow.parquet as pq

    source = ingest["params"].get("source", "data/raw")
    link = {"kind": "documents", "stage": "documents", "run_id": ingest["run_id"], "source": source,
            "git_commit": ingest.get("git_commit", ""), "dep_md5": ingest["deps"].get(source, ""),
            "documents": [], "upstream": {}}
    checks = []
    table_md5 = next((objects.manifest(m).get("documents.parquet") for p, m in ingest["outs"].items()
                      if m.endswith(".dir") and objects.where(m)), None)
    if table_md5 is None or objects.where(table_md5) is None:
        link.update(checks=[_check("documents table", False, "documents.parquet of the ingest out is not available")],
                    ok=False)
        return link
    rows = pq.read_table(io.BytesIO(objects.read(table_md5)), columns=["source", "sha256", "kind"]).to_pylist()
    link["documents"] = rows
    checks.append(_check("documents table", True, f"{len(rows)} documents (documents.parquet md5 {table_md5})"))
    sha = link["git_commit"].removesuffix("-dirty")
    if "://" in source:
        checks.append(_check("source files", None, f"{source}: remote source, hashes listed but not re-read"))
    else:
        specs = [f"{sha}:{source.rstrip('/')}/{r['source']}" for r in rows]
        blobs = _git_blobs(specs, root) if sha and commit_exists(sha, root) else {}
        bad, unverified = [], []
        for spec, r in zip(specs, rows):
            data = blobs.get(spec)
            if data is None and (root / source / r["source"]).is_file():
                data = (root / source / r["source"]).read_bytes()  # not in git: the working tree's copy
            if data is None:
                unverified.append(r["source"])
            elif hashlib.sha256(data).hexdigest() != r["sha256"]:
                bad.append(r["source"])
        checks.append(_check("source files", False if bad else (None if unverified else True),
                             f"sha256 differs: {bad}" if bad else
                             (f"not found at {sha[:12]} nor in the working tree: {unverified}" if unverified
                              else f"{len(rows)} files under {source} at {sha[:12]} match their sha256")))
    link["checks"] = checks
    link["ok"] = all(c["ok"] is not False for c in checks)
    return link


def _git_blobs(specs: list[str], root: Path) -> dict[str, bytes]:
    """`git cat-file --batch` of `<commit>:<path>` specs -> {spec: content} (missing ones left out)."""
    proc = subprocess.run(["git", "cat-file", "--batch"], cwd=root, input="\n".join(specs).encode() + b"\n",
                          capture_output=True)
    out, pos, found = proc.stdout, 0, {}
    for spec in specs:
        header_end = out.index(b"\n", pos)
        header = out[pos:header_end].split()
        pos = header_end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            found[spec] = out[pos:pos + size]
            pos += size + 1
    return found


def _downstream_first(links: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order links by their longest distance from the start: a stage comes after every stage
    that read its outputs (chunk before validate before ingest)."""
    by_run = {link["run_id"]: link for link in links if link["kind"] == "stage"}
    depth = {id(link): 0 for link in links}
    for _ in range(len(links)):
        for link in links:
            for run_id in link["upstream"].values():
                up = by_run.get(run_id)
                if up is not None and up is not link:
                    depth[id(up)] = max(depth[id(up)], depth[id(link)] + 1)
    return sorted(links, key=lambda link: depth[id(link)])


def trace(target: str, root: Path = ROOT) -> dict[str, Any]:
    """The verified chain from `target` (models:/name@alias, models:/name/N, or an MLflow run id)
    back to the raw documents: {'target', 'ok', 'links': [...], 'broken': [...]}."""
    import mlflow

    from forgeline.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    objects = DvcObjects(root)
    links: list[dict[str, Any]] = []
    try:
        if target.startswith("models:/"):
            from forgeline.registry import resolve

            version = resolve(target)
            producer = _run_link(client, version.run_id, objects)
            links += [_model_link(client, version, objects, producer), producer]
            todo = list(producer["upstream"].values())
        else:
            start = client.get_run(target)
            tags = start.data.tags
            if tags.get("forgeline.pipeline"):  # a pipeline's parent run: start from its stages
                children = client.search_runs([start.info.experiment_id],
                                              filter_string=f"tags.`mlflow.parentRunId` = '{target}'")
                todo = [c.data.tags.get("forgeline.reused_run_id") or c.info.run_id for c in children]
            else:
                todo = [tags.get("forgeline.reused_run_id") or target]
        seen = {link["run_id"] for link in links if link["kind"] == "stage"}
        while todo:
            run_id = todo.pop(0)
            if run_id in seen:
                continue
            seen.add(run_id)
            link = _run_link(client, run_id, objects)
            links.append(link)
            todo += [r for r in link["upstream"].values() if r not in seen]
        links = _downstream_first(links)
        for link in [x for x in links if x.get("stage") == "ingest" and x["kind"] == "stage"]:
            links.append(_documents_link(link, objects, root))
    finally:
        objects.close()
    broken = [f"{link.get('stage', link['kind'])} ({link['run_id']}): {c['what']}: {c['detail']}"
              for link in links for c in link["checks"] if c["ok"] is False]
    return {"target": target, "ok": not broken, "links": links, "broken": broken}


def format_trace(result: dict[str, Any]) -> str:
    lines = [f"lineage of {result['target']}: {'OK' if result['ok'] else 'BROKEN'}"]
    for link in result["links"]:
        mark = "ok    " if link["ok"] else "BROKEN"
        if link["kind"] == "model_version":
            head = (f"model {link['name']}/{link['version']}"
                    f"{' @' + ','.join(link['aliases']) if link['aliases'] else ''}  run {link['run_id']}  "
                    f"flow run {link['flow_run_id'] or '-'}  git {link['git_commit'] or '-'}")
        elif link["kind"] == "documents":
            head = (f"documents: {len(link['documents'])} files from {link['source']} "
                    f"(dvc dep md5 {link['dep_md5'] or '-'})  ingest run {link['run_id']}")
        else:
            head = (f"{link['stage']}  run {link['run_id']} {link.get('status', '')}  "
                    f"flow run {link.get('flow_run_id') or '-'}  git {link.get('git_commit') or '-'}")
        lines.append(f"[{mark}] {head}")
        for path, md5 in link.get("deps", {}).items():
            lines.append(f"           dep {path}  md5 {md5}")
        for c in link["checks"]:
            state = {True: "ok", False: "FAIL", None: "--"}[c["ok"]]
            lines.append(f"    {state:>4}  {c['what']}: {c['detail']}")
        for doc in link.get("documents", []):
            lines.append(f"           {doc['sha256'][:16]}  {doc['kind']:<5} {doc['source']}")
    if result["broken"]:
        lines.append("broken links:")
        lines += [f"  {b}" for b in result["broken"]]
    return "\n".join(lines)
