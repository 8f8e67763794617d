"""Lineage: git commit and the DVC digests of each stage's inputs and outputs (from dvc.lock), and
the audit that walks MLflow's lineage tags from a model version back to the raw documents,
verifying each link (`trace`; the CLI is `forgeline lineage`, docs/operations.md).
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from forgeline.paths import ROOT


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD commit, suffixed `-dirty` when tracked files differ from it.

    Inside a pipeline run, the commit that run took before writing its one-off overrides
    (forgeline/workspace.py pipeline_run says why).
    """
    if pinned := os.environ.get("FORGELINE_GIT_COMMIT"):
        return pinned
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
#     forgeline lineage models:/forgeline-llm@candidate [--json] [--strict]
#     forgeline lineage <mlflow run id>
#
# Each check, each link and the whole chain is OK, BROKEN or UNVERIFIED:
#   OK          checked here and it holds;
#   BROKEN      checked here and it does not hold (a missing object, a different hash, an empty
#               lineage.upstream tag, a commit this repo lacks);
#   UNVERIFIED  could not be checked here (a store that cannot be reached, a file not available,
#               a `-dirty` commit), with the reason. Never counted as OK.
# A link takes the worst state of its checks, the chain the worst of its links.
#
# The checks: the MLflow run finished; its git commit exists in this repo and was clean; every
# lineage.upstream tag names a run; every DVC object it recorded (outs, and each file of a
# directory out) is in the cache or on the remote; every dep that no stage of the chain made
# (code, raw data) hashes, at the run's commit or in the working tree, to the md5 DVC recorded;
# the registered weights are byte-identical to the training stage's DVC out; each raw document
# hashes to the sha256 ingest recorded.

OK, UNVERIFIED, BROKEN = "OK", "UNVERIFIED", "BROKEN"
_RANK = {OK: 0, UNVERIFIED: 1, BROKEN: 2}


def worst(states) -> str:
    """The worst of some states; nothing checked is UNVERIFIED, never OK."""
    return max(states, key=_RANK.__getitem__, default=UNVERIFIED)


def _check(what: str, state: str, detail: str = "") -> dict[str, Any]:
    return {"what": what, "state": state, "detail": detail}


def _close(link: dict[str, Any], checks: list[dict[str, Any]]) -> dict[str, Any]:
    link["checks"] = checks
    link["state"] = worst(c["state"] for c in checks)
    return link


def commit_exists(sha: str, root: Path = ROOT) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=root,
                          capture_output=True).returncode == 0


def _commit_check(commit: str, root: Path) -> dict[str, Any]:
    sha = commit.removesuffix("-dirty")
    if not sha or sha == "unknown":
        return _check("git commit", BROKEN, "no git commit recorded")
    if not commit_exists(sha, root):
        return _check("git commit", BROKEN, f"{sha} is not in this repository")
    if commit != sha:
        return _check("git commit", UNVERIFIED, f"{commit}: tracked files differed from the commit when the run "
                                                "started, so its code is not reproducible from a commit")
    return _check("git commit", OK, commit)


class RemoteUnreachable(Exception):
    """The DVC remote could not be asked: whether an object is there is unknown."""


class DvcObjects:
    """Where DVC objects are: the local cache, else the default remote (opened on first need)."""

    def __init__(self, root: Path = ROOT):
        from dvc.repo import Repo

        self.repo = Repo(str(root))
        self.cache = self.repo.cache.local
        self._remote = None
        self._remote_error = ""  # once unreachable, not asked again during this audit
        self._remote_listed = False
        self.remote_name = self.repo.config["core"].get("remote")
        self._git_fs: dict[str, Any] = {}

    def where(self, md5: str) -> str | None:
        """'cache', 'remote <name>', or None when the object is nowhere. Raises RemoteUnreachable
        when it is not in the cache and the remote cannot be asked."""
        if self.cache.exists(md5):
            return "cache"
        if not self.remote_name:
            return None
        if not self._remote_error:
            try:
                if self._remote is None:
                    self._remote = self.repo.cloud.get_remote_odb(self.remote_name)
                if self._remote.exists(md5):
                    return f"remote {self.remote_name}"
                # fsspec's http and s3 `exists` answer False when the server cannot be reached:
                # a "no" counts only once a listing of the remote answered (empty is an answer)
                if not self._remote_listed:
                    self._probe_remote()
                    self._remote_listed = True
                return None
            except Exception as e:
                self._remote_error = f"remote {self.remote_name!r} unreachable: {type(e).__name__}: {str(e)[:200]}"
        raise RemoteUnreachable(self._remote_error)

    def _probe_remote(self) -> None:
        """Raise unless the remote answers. An HTTP remote is asked directly (dvc-http cannot list,
        and reports a refused connection as 'not found'); any HTTP status is an answer."""
        import urllib.error
        import urllib.request

        path = str(self._remote.path)
        if path.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(urllib.request.Request(path, method="HEAD"), timeout=10).close()
            except urllib.error.HTTPError:
                pass
            return
        try:
            self._remote.fs.ls(path)
        except FileNotFoundError:
            pass

    def read(self, md5: str) -> bytes:
        where = self.where(md5)
        if where is None:
            raise FileNotFoundError(f"DVC object {md5} is neither in the cache nor on remote {self.remote_name!r}")
        odb = self.cache if where == "cache" else self._remote
        with odb.fs.open(odb.oid_to_path(md5), "rb") as fh:
            return fh.read()

    def manifest(self, md5: str) -> dict[str, str]:
        """A directory object's files: {relpath: md5}."""
        import json

        return {e["relpath"]: e["md5"] for e in json.loads(self.read(md5))}

    def md5_of(self, path: str, rev: str = "") -> tuple[str, dict[str, str]] | None:
        """DVC's md5 of `path` (file, or directory as `<md5>.dir`) and, for a directory, its
        {relpath: md5}: at git commit `rev`, or in the working tree. None where the path is not."""
        from dvc_data.hashfile.build import build

        if rev:
            from dvc.fs import GitFileSystem

            fs = self._git_fs.setdefault(rev, GitFileSystem(scm=self.repo.scm, rev=rev))
            full, ignore = "/" + path, None
        else:
            fs, ignore = self.repo.fs, self.repo.dvcignore
            full = fs.join(self.repo.root_dir, path)
        if not fs.exists(full):
            return None
        _, _, obj = build(self.cache, full, fs, "md5", dry_run=True, ignore=ignore)
        files = {"/".join(key): hash_info.value for key, _, hash_info in obj} if obj.hash_info.isdir else {}
        return obj.hash_info.value, files

    def close(self) -> None:
        self.repo.close()


def _dvc_checks(objects: DvcObjects, kind: str, items: dict[str, str]) -> list[dict[str, Any]]:
    checks = []
    for path, md5 in items.items():
        if not md5:
            checks.append(_check(f"{kind} {path}", BROKEN, "no md5 recorded"))
            continue
        try:
            where = objects.where(md5)
            if where is None:
                checks.append(_check(f"{kind} {path}", BROKEN,
                                     f"md5 {md5}: neither in the DVC cache nor on remote {objects.remote_name!r}"))
                continue
            missing = []
            if md5.endswith(".dir"):
                missing = [rel for rel, m in objects.manifest(md5).items() if objects.where(m) is None]
        except RemoteUnreachable as e:
            checks.append(_check(f"{kind} {path}", UNVERIFIED, f"md5 {md5}: not in the DVC cache, and {e}"))
            continue
        checks.append(_check(f"{kind} {path}", BROKEN if missing else OK,
                             f"md5 {md5} in {where}" + (f"; files missing: {missing}" if missing else "")))
    return checks


def _dep_check(objects: DvcObjects, path: str, md5: str, commit: str) -> dict[str, Any]:
    """A dep no stage of the chain made (code, raw data): its md5 at the run's commit, else in the
    working tree, must be the one DVC recorded. Not found as recorded: UNVERIFIED (the bytes the
    run read are not here), not BROKEN (they may be elsewhere)."""
    sha = commit.removesuffix("-dirty")
    seen = []
    for rev, place in ((sha, f"at {sha[:12]}"), ("", "in the working tree")):
        if rev and (rev == "unknown" or not commit_exists(rev, objects.repo.root_dir)):
            continue
        found = objects.md5_of(path, rev)
        if found and found[0] == md5:
            return _check(f"dep {path}", OK, f"md5 {md5} {place}")
        seen.append(f"{place} md5 {found[0] if found else 'absent'}")
    return _check(f"dep {path}", UNVERIFIED, f"DVC recorded md5 {md5 or '?'}; " + ", ".join(seen))


def _out_file(objects: DvcObjects, outs: dict[str, str], name: str) -> tuple[str, str, str, str]:
    """File `name` in a run's directory outs: (state, its path, its md5, why not found).

    Read from the DVC cache or remote, else from the working tree's copy of the out when that
    hashes to the recorded md5. OK: found; BROKEN: every out was listed and none holds it;
    UNVERIFIED: an out could not be listed."""
    state, why = BROKEN, []
    for path, md5 in outs.items():
        if not md5.endswith(".dir"):
            continue
        try:
            manifest = objects.manifest(md5)
        except (FileNotFoundError, RemoteUnreachable) as e:
            local = objects.md5_of(path)
            if local is None or local[0] != md5:
                state = UNVERIFIED
                why.append(f"{path} not listed: {e}")
                continue
            manifest = local[1]
        hits = [rel for rel in manifest if rel.rsplit("/", 1)[-1] == name]
        if hits:
            rel = name if name in hits else hits[0]
            return OK, f"{path}/{rel}", manifest[rel], ""
        why.append(f"{path} (md5 {md5}) holds no {name}")
    return state, "", "", "; ".join(why) or "the run recorded no directory out"


def _read_out_file(objects: DvcObjects, path: str, md5: str) -> bytes | None:
    """An out's file by md5: from the DVC cache/remote, else the working tree's copy if it matches."""
    import hashlib

    try:
        return objects.read(md5)
    except (FileNotFoundError, RemoteUnreachable):
        local = Path(objects.repo.root_dir) / path
        if local.is_file() and hashlib.md5(data := local.read_bytes()).hexdigest() == md5:
            return data
    return None


def _run_link(client, run_id: str, objects: DvcObjects, root: Path, reached_by: str = "") -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        link = {"kind": "stage", "stage": reached_by or "?", "run_id": run_id, "upstream": {}, "deps": {}, "outs": {}}
        return _close(link, [_check("mlflow run", BROKEN, f"run {run_id} not found: {e.message[:200]}")])
    tags = run.data.tags
    upstream_tags = {k[len("lineage.upstream."):]: v for k, v in tags.items() if k.startswith("lineage.upstream.")}
    link = {"kind": "stage", "stage": tags.get("forgeline.stage", "?"), "run_id": run_id,
            "status": run.info.status, "flow_run_id": tags.get("prefect.flow_run_id", ""),
            "git_commit": tags.get("git.commit", "unknown"), "parent_run_id": tags.get("mlflow.parentRunId", ""),
            "deps": {k[len("dvc.dep."):]: v for k, v in tags.items() if k.startswith("dvc.dep.")},
            "outs": {k[len("dvc.out."):]: v for k, v in tags.items() if k.startswith("dvc.out.")},
            "upstream": {stage: r for stage, r in upstream_tags.items() if r},
            "params": dict(run.data.params)}
    checks = [_check("mlflow run", OK if run.info.status == "FINISHED" else BROKEN, f"status {run.info.status}"),
              _commit_check(link["git_commit"], root)]
    # an empty tag: when this stage ran, no finished run of that stage had made the out it read
    checks += [_check(f"upstream {stage}", BROKEN, f"tag lineage.upstream.{stage} is empty: no run is recorded as "
                                                   f"making the {stage} output this stage read; the chain ends here")
               for stage, r in upstream_tags.items() if not r]
    if not link["outs"]:
        checks.append(_check("dvc outs", BROKEN, "the run recorded no DVC outputs"))
    checks += _dvc_checks(objects, "out", link["outs"])
    return _close(link, checks)


def _artifacts_unreachable(e: BaseException) -> bool:
    """True when the artifact store could not be asked (a connection error, or server-proxied
    artifacts seen from a client without the server), not when it answered 'not there'."""
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in ("ConnectionError", "MaxRetryError"):
            return True
        if any(w in str(e) for w in ("Max retries", "Connection refused", "mlflow-artifacts URI")):
            return True
        e = e.__cause__ or e.__context__
    return False


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
        checks.append(_check("artifacts", OK, f"{version.source}/model.safetensors md5 {md5}"))
    except Exception as e:
        md5 = None
        checks.append(_check("artifacts", UNVERIFIED if _artifacts_unreachable(e) else BROKEN,
                             f"{version.source}: {type(e).__name__}: {str(e)[:200]}"))
    if md5 is None:
        checks.append(_check("weights = DVC out", UNVERIFIED, "not compared: the registered weights could not be read"))
    else:
        state, path, want, why = _out_file(objects, producer.get("outs", {}), "model.safetensors")
        if state != OK:
            checks.append(_check("weights = DVC out", state, f"not compared: {why}"))
        else:
            checks.append(_check("weights = DVC out", OK if md5 == want else BROKEN,
                                 f"{path} md5 {want}" + ("" if md5 == want else f", registered weights md5 {md5}")))
    for key in ("prefect.flow_run_id", "git.commit"):
        checks.append(_check(f"tag {key}", OK if version.tags.get(key) else BROKEN, version.tags.get(key, "missing")))
    return _close(link, checks)


def _documents_link(ingest: dict[str, Any], objects: DvcObjects, root: Path = ROOT) -> dict[str, Any]:
    """The raw inputs of an ingest run: each document's source file and sha256, checked against git
    at the run's commit, else the working tree."""
    import hashlib
    import io

    import pyarrow.parquet as pq

    source = ingest["params"].get("source", "data/raw")
    link = {"kind": "documents", "stage": "documents", "run_id": ingest["run_id"], "source": source,
            "git_commit": ingest.get("git_commit", ""), "dep_md5": ingest["deps"].get(source, ""),
            "documents": [], "upstream": {}}
    state, path, table_md5, why = _out_file(objects, ingest["outs"], "documents.parquet")
    table = _read_out_file(objects, path, table_md5) if state == OK else None
    if table is None:
        return _close(link, [_check("documents table", state if state != OK else UNVERIFIED,
                                    f"documents.parquet of the ingest out could not be read: {why or path}")])
    rows = pq.read_table(io.BytesIO(table), columns=["source", "sha256", "kind"]).to_pylist()
    link["documents"] = rows
    checks = [_check("documents table", OK, f"{len(rows)} documents (documents.parquet md5 {table_md5})")]
    sha = link["git_commit"].removesuffix("-dirty")
    if "://" in source:
        checks.append(_check("source files", UNVERIFIED, f"{source}: remote source, sha256 listed but not re-read"))
        return _close(link, checks)
    specs = [f"{sha}:{source.rstrip('/')}/{r['source']}" for r in rows]
    blobs = _git_blobs(specs, root) if sha and sha != "unknown" and commit_exists(sha, root) else {}
    bad, unread = [], []
    for spec, r in zip(specs, rows):
        # any copy with the recorded sha256 is the document ingest read: git at the run's commit,
        # else the working tree (a file not committed then, or one committed since)
        copies = [blobs.get(spec)]
        if (root / source / r["source"]).is_file():
            copies.append((root / source / r["source"]).read_bytes())
        copies = [c for c in copies if c is not None]
        if not copies:
            unread.append(r["source"])
        elif all(hashlib.sha256(c).hexdigest() != r["sha256"] for c in copies):
            bad.append(r["source"])
    if bad:
        checks.append(_check("source files", BROKEN, f"sha256 differs from what ingest recorded: {bad}"))
    elif unread:
        checks.append(_check("source files", UNVERIFIED, f"not found at {sha[:12]} nor in the working tree: {unread}"))
    else:
        checks.append(_check("source files", OK, f"{len(rows)} files under {source} match their sha256"))
    return _close(link, checks)


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


def trace(target: str, root: Path | None = None) -> dict[str, Any]:
    """The verified chain from `target` (models:/name@alias, models:/name/N, or an MLflow run id)
    back to the raw documents: {'target', 'state', 'ok', 'links': [...], 'broken': [...],
    'unverified': [...]}; `ok` only when every check is OK."""
    import mlflow

    from forgeline.tracking import tracking_uri

    root = root or ROOT
    client = mlflow.MlflowClient(tracking_uri())
    objects = DvcObjects(root)
    links: list[dict[str, Any]] = []
    try:
        if target.startswith("models:/"):
            from forgeline.registry import resolve

            version = resolve(target)
            producer = _run_link(client, version.run_id, objects, root)
            links += [_model_link(client, version, objects, producer), producer]
            todo = list(producer["upstream"].items())
        else:
            start = client.get_run(target)
            tags = start.data.tags
            if tags.get("forgeline.pipeline"):  # a pipeline's parent run: start from its stages
                children = client.search_runs([start.info.experiment_id],
                                              filter_string=f"tags.`mlflow.parentRunId` = '{target}'")
                todo = [(c.data.tags.get("forgeline.stage", ""), c.data.tags.get("forgeline.reused_run_id")
                         or c.info.run_id) for c in children]
            else:
                todo = [(tags.get("forgeline.stage", ""), tags.get("forgeline.reused_run_id") or target)]
        seen = {link["run_id"] for link in links if link["kind"] == "stage"}
        while todo:
            stage, run_id = todo.pop(0)
            if run_id in seen:
                continue
            seen.add(run_id)
            link = _run_link(client, run_id, objects, root, reached_by=stage)
            links.append(link)
            todo += [(s, r) for s, r in link["upstream"].items() if r not in seen]
        links = _downstream_first(links)
        # deps no stage of the chain made (code, raw data) are checked against git and the working tree
        made = [p for link in links if link["kind"] == "stage" for p in link["outs"]]
        for link in [x for x in links if x["kind"] == "stage"]:
            extra = [_dep_check(objects, path, md5, link["git_commit"]) for path, md5 in link["deps"].items()
                     if not any(path == p or path.startswith(p + "/") for p in made)]
            _close(link, link["checks"] + extra)
        for link in [x for x in links if x.get("stage") == "ingest" and x["kind"] == "stage"]:
            links.append(_documents_link(link, objects, root))
    finally:
        objects.close()
    found = {state: [f"{link.get('stage', link['kind'])} ({link['run_id']}): {c['what']}: {c['detail']}"
                     for link in links for c in link["checks"] if c["state"] == state]
             for state in (BROKEN, UNVERIFIED)}
    state = worst(link["state"] for link in links)
    return {"target": target, "state": state, "ok": state == OK, "links": links,
            "broken": found[BROKEN], "unverified": found[UNVERIFIED]}


def exit_code(result: dict[str, Any], strict: bool = False) -> int:
    """0 all OK; 2 anything BROKEN; UNVERIFIED: 3 under --strict, else 0 (printed, with the reasons)."""
    return {OK: 0, BROKEN: 2, UNVERIFIED: 3 if strict else 0}[result["state"]]


def format_trace(result: dict[str, Any]) -> str:
    lines = [f"lineage of {result['target']}: {result['state']}"]
    for link in result["links"]:
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
        lines.append(f"[{link['state']:<10}] {head}")
        for path, md5 in link.get("deps", {}).items():
            lines.append(f"               dep {path}  md5 {md5}")
        for c in link["checks"]:
            lines.append(f"    {c['state']:>10}  {c['what']}: {c['detail']}")
        for doc in link.get("documents", []):
            lines.append(f"               {doc['sha256'][:16]}  {doc['kind']:<5} {doc['source']}")
    if result["broken"]:
        lines.append("broken links:")
        lines += [f"  {b}" for b in result["broken"]]
    if result["unverified"]:
        lines.append("unverified (could not be checked here; `--strict` fails on these):")
        lines += [f"  {u}" for u in result["unverified"]]
    return "\n".join(lines)
