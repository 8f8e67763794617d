"""Every stage YAML loads into its dataclass; bad configs fail before any work."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import models
import tasks
from forgeline.config import ConfigError, load_config, parse_overrides, stage_config
from forgeline.paths import CONFIGS, ROOT
from forgeline.pipelines import flow_stages


def stage_config_class(stage: str):
    """The config dataclass of a stage: the one its flow's STAGES names (a generic module reused with
    configs/<stage>.yaml, e.g. rag_ingest -> IngestConfig), else tasks/<stage>.py's own."""
    for flow in (ROOT / "flows").glob("*.py"):
        spec = dict(flow_stages(flow)) if flow.stem != "__init__" else {}
        if stage in spec:
            path, name = spec[stage]
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            return getattr(importlib.import_module(module), name)
    module = importlib.import_module(f"tasks.{stage}")
    (cls,) = [v for k, v in vars(module).items() if k.endswith("Config") and v.__module__ == module.__name__]
    return cls


STAGES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def test_packages_resolve_inside_repo():
    # top-level names like `models` and `tasks` can be shadowed by installed packages
    assert Path(models.__file__).resolve().is_relative_to(ROOT)
    assert Path(tasks.__file__).resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("stage", STAGES)
def test_every_yaml_loads_into_its_dataclass(stage):
    cfg = load_config(stage_config_class(stage), stage)
    assert cfg is not None


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_key_fails(stage):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(stage_config_class(stage), stage, ["no_such_key=1"])


def test_wrong_type_fails():
    from tasks.validate import ValidateConfig
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(ValidateConfig, "validate", ["min_chars=many"])
    with pytest.raises(ConfigError, match="percentage"):
        load_config(ValidateConfig, "validate", ["min_ocr_confidence=150"])


def test_overrides_win_over_yaml_and_widen_ints(tmp_path):
    from tasks.validate import ValidateConfig
    path = tmp_path / "validate.yaml"
    path.write_text("min_chars: 7\nmin_ocr_confidence: 50\n")
    cfg = load_config(ValidateConfig, "validate", ["min_chars=9"], path=path)
    assert cfg.min_chars == 9 and cfg.min_ocr_confidence == 50.0
    assert isinstance(cfg.min_ocr_confidence, float)


def test_parse_overrides_rejects_missing_equals():
    assert parse_overrides(["a=1", "b=x y", "c="]) == {"a": 1, "b": "x y", "c": ""}
    with pytest.raises(ConfigError):
        parse_overrides(["oops"])


def test_a_config_file_names_the_stage_a_generic_module_runs_as(tmp_path, monkeypatch):
    """`python -m tasks.ingest config=configs/rag_ingest.yaml`: stage rag_ingest, that file's values."""
    from tasks.ingest import IngestConfig

    monkeypatch.chdir(tmp_path)  # a relative config= path is read from the cwd, as DVC runs a stage
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rag_ingest.yaml").write_text("source: data/rag_raw\nout_dir: data/rag_ingest\n")
    stage, cfg = stage_config(IngestConfig, "ingest", ["config=configs/rag_ingest.yaml", "max_pages=5"])
    assert stage == "rag_ingest"
    assert (cfg.source, cfg.out_dir, cfg.max_pages) == ("data/rag_raw", "data/rag_ingest", 5)
    # without config= the module is its own stage, configs/ingest.yaml
    stage, cfg = stage_config(IngestConfig, "ingest", ["max_pages=5"])
    assert (stage, cfg.out_dir, cfg.max_pages) == ("ingest", "data/ingest", 5)
    with pytest.raises(ConfigError, match="no such file"):
        stage_config(IngestConfig, "ingest", ["config=configs/rag_ingets.yaml"])
    with pytest.raises(ConfigError, match="unknown key"):
        stage_config(IngestConfig, "ingest", ["config=configs/rag_ingest.yaml", "no_such_key=1"])
