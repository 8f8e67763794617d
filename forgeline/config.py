"""Stage configs: a dataclass with defaults < configs/<stage>.yaml < `key=value` overrides.

Unknown keys and values of the wrong type fail here, before a stage does any work.

    cfg = load_config(ChunkConfig, "chunk", ["chunk_size=800", "splitter=regex"])
    stage, cfg = stage_config(IngestConfig, "ingest", ["config=configs/rag_ingest.yaml"])  # stage "rag_ingest"
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, get_args, get_origin, get_type_hints

import yaml

from forgeline.paths import ROOT, config_path


class ConfigError(ValueError):
    """A config that must not start a run: unknown key, wrong type, bad value."""


def _check(name: str, value: Any, tp: Any) -> Any:
    """Return `value` checked (and int->float widened) against the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{name}={value!r}: must be one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r}: expected a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_check(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a mapping")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}={value!r}: expected a number")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={value!r}: expected a string")
    raise ConfigError(f"{name}: unsupported annotation {tp!r}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a=1", "b=x"]` -> `{"a": 1, "b": "x"}`; values are read as YAML scalars."""
    out = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def build_config(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Construct `cls` from `values`, failing on unknown keys and wrong types."""
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    checked = {k: _check(f"{where}: {k}", v, hints[k]) for k, v in values.items()}
    cfg = cls(**checked)
    if hasattr(cfg, "check"):
        cfg.check()  # cross-field rules live on the dataclass itself
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    return data


def load_config(cls: type, stage: str, overrides: list[str] | dict | None = None,
                path: str | Path | None = None) -> Any:
    """defaults < configs/<stage>.yaml (or `path`) < overrides."""
    path = Path(path) if path else config_path(stage)
    values = read_yaml(path)
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides or []))
    return build_config(cls, values, where=f"{stage} config ({path.name})")


def stage_config(cls: type, stage: str, argv: list[str]) -> tuple[str, Any]:
    """(stage name, config) from a stage module's command line: `key=value` overrides, and optionally
    `config=configs/S.yaml` to run the module as stage S, e.g. the generic ingest as the RAG
    pipeline's own `rag_ingest` (`python -m tasks.ingest config=configs/rag_ingest.yaml`). One name
    everywhere: S is the DVC stage, the MLflow run, and by that file's out_dir the folder data/S/.
    """
    path, rest = None, []
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "config":
            path = Path(value.strip())
        else:
            rest.append(item)
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config={path}: no such file")
        stage = path.stem
    return stage, load_config(cls, stage, rest, path=path)


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_overrides(stage: str, overrides: dict[str, Any], path: str | Path | None = None) -> None:
    """Set `overrides` in the stage YAML in place (as `dvc exp run -S` does), so DVC sees them.

    A ruamel.yaml round trip: comments, key order and every line not overridden stay as they were.
    """
    from ruamel.yaml import YAML

    path = Path(path) if path else config_path(stage)
    rt = YAML()  # round-trip mode
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line the file did not wrap
    data = rt.load(path.read_text()) if path.exists() else None
    if data is None:
        data = {}
    data.update(overrides)
    out = io.StringIO()
    rt.dump(data, out)
    _write_atomic(path, out.getvalue().encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a kill leaves either the old file or the new one, mode kept."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # os.open's mode is masked by the umask
    os.replace(tmp, path)


def read_backup(backup: Path, root: Path = ROOT) -> dict[Path, bytes | None]:
    """{config path: its bytes before a one-off run's overrides (None: it did not exist)}; {} without a backup."""
    try:
        saved = json.loads(backup.read_text())
    except FileNotFoundError:
        return {}
    return {root / rel: None if b64 is None else base64.b64decode(b64) for rel, b64 in saved.items()}


def restore_backup(backup: Path, root: Path = ROOT) -> list[str]:
    """Put the files saved in `backup` back byte for byte, then drop it; returns the paths restored.

    Idempotent: killed half-way, the backup is still there and the next call finishes the job.
    """
    saved = read_backup(backup, root)
    for path, original in saved.items():
        if original is None:
            path.unlink(missing_ok=True)
        elif not path.exists() or path.read_bytes() != original:
            _write_atomic(path, original)
    backup.unlink(missing_ok=True)
    return [str(p.relative_to(root)) for p in saved]


@contextlib.contextmanager
def one_off_overrides(overrides: dict[Path, dict[str, Any]], backup: Path, root: Path = ROOT) -> Iterator[None]:
    """Write {config file: {key: value}} into those files for the length of the block only.

    The originals are saved to `backup` (atomically) before any file is touched and put back when
    the block ends, also on an exception. A SIGKILL skips the `finally`: the backup stays, and the
    next run restores it before anything else (restore_backup).
    """
    paths = [path for path, kv in overrides.items() if kv]
    if not paths:
        yield
        return
    saved = {str(p.relative_to(root)): base64.b64encode(p.read_bytes()).decode() if p.exists() else None
             for p in paths}
    backup.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(backup, json.dumps(saved).encode())
    try:
        for path in paths:
            write_overrides(path.stem, overrides[path], path)
        yield
    finally:
        restore_backup(backup, root)


def params_model(cls: type):
    """A pydantic model of optional overrides for a stage config: the Prefect UI renders it as a form.

    Every field defaults to None, meaning "keep what configs/<stage>.yaml says".
    """
    import pydantic

    hints = get_type_hints(cls)
    def default(f):
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    fields = {f.name: (hints[f.name] | None, pydantic.Field(default=None, description=f"default: {default(f)!r}"))
              for f in dataclasses.fields(cls)}
    return pydantic.create_model(f"{cls.__name__}Overrides", __config__=pydantic.ConfigDict(extra="forbid"),
                                 **fields)


def _params_field(stage: str) -> str:
    """The pydantic field of a stage: a stage named like a BaseModel method (`validate`) gets a `_`."""
    import pydantic

    return f"{stage}_" if hasattr(pydantic.BaseModel, stage) else stage


def pipeline_params(name: str, stages: dict[str, type]):
    """A flow's parameters as one pydantic model: per stage a sub-model of optional overrides (a form
    section in the Prefect UI), then `wait_s` and `push`. `.overrides()` -> {stage: {key: value}}."""
    import pydantic

    class PipelineParams(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(populate_by_name=True, extra="forbid")

        def overrides(self) -> dict[str, dict]:
            return {s: getattr(self, _params_field(s)).model_dump(exclude_none=True) for s in stages}

    fields: dict[str, Any] = {}
    for stage, cls in stages.items():
        model = params_model(cls)
        fields[_params_field(stage)] = (model, pydantic.Field(default_factory=model, alias=stage))
    fields["wait_s"] = (float, pydantic.Field(0.0, description="seconds to wait for another run to free the workspace"))
    fields["push"] = (bool, pydantic.Field(True, description="dvc push the outputs to the default remote at the end"))
    return pydantic.create_model(name, __base__=PipelineParams, **fields)
