"""Rules about the repository itself: it runs from a fresh clone, and DVC's staleness is complete.

1. Nothing at run time reads `../shared/` (the folder the sample data was copied from): a fresh
   clone has no such sibling, so a test, benchmark or demo that reads it fails there.
2. Every in-repo file a stage's code imports (transitively, lazy imports inside functions too) is a
   dep of that stage in dvc.yaml, so editing it makes DVC rerun the stage; and every listed dep
   exists (in git, or as another stage's out).
3. The library/stage boundary: no stage module imports another stage's, forgeline/ imports no
   stage or flow, models/ imports no prefect/mlflow/dvc.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- 1. no ../shared at run time
CODE_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".json"}
# `../shared`, `shared/data`, or a path built with a "shared" component (`parents[2] / "shared"`,
# `os.path.join(root, "..", "shared")`, `Path("shared")`)
SHARED_PATH = re.compile(r"""\.\./shared\b|\bshared/data\b|[/,(]\s*["']shared["']|["']shared["']\s*/""")
ALLOWED = {
    # a dev tool, not run by tests, benchmarks or the demo: it (re)builds the shipped sample
    # data/raw/ from ../shared/data, with the provenance in data/README.md
    "scripts/make_sample.py",
    "scripts/make_rag_sample.py",  # the same for the RAG pipeline's data/rag_raw/
    "scripts/make_compose_data.py",  # the same for the compose pipeline's data/compose_raw/
    "tests/test_repo_rules.py",  # this file: it holds the patterns
}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.split("\0") if p]


def is_code(path: str) -> bool:
    """Files that run or configure a run: code, scripts, configs, CI. Docs may name ../shared."""
    p = Path(path)
    if p.parts[0] == "docs" or p.suffix == ".md":
        return False
    return p.suffix in CODE_SUFFIXES or p.parts[0] == ".ci"


def shared_hits(path: str, text: str) -> list[str]:
    return [f"{path}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if SHARED_PATH.search(line)]


def test_the_pattern_catches_every_way_of_reaching_shared():
    bad = ['CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"',
           "zcat ../shared/data/corpus/brown.txt.gz", 'corpus: "/work/shared/data/corpus"',
           "p = ROOT.parent / 'shared'", 'os.path.join(ROOT, "..", "shared", "data")']
    good = ["shared = [length(b[0], a[1]) for a, b in zip(chunks, chunks[1:])]",
            "from tests.test_stack import shared_stack", "data/raw/austen/persuasion.txt.gz"]
    assert [len(shared_hits("x.py", line)) for line in bad + good] == [1] * len(bad) + [0] * len(good)


def test_nothing_reads_the_shared_folder_at_run_time():
    hits = []
    for path in tracked_files():
        if is_code(path) and path not in ALLOWED and (ROOT / path).is_file():
            hits += shared_hits(path, (ROOT / path).read_text(errors="replace"))
    assert not hits, ("paths into ../shared (absent in a fresh clone; copy the data into the repo "
                      "with provenance in data/README.md):\n" + "\n".join(hits))


def test_allowed_files_exist():
    assert all((ROOT / p).is_file() for p in ALLOWED)


# ---------------------------------------------------------------------------- 2. dvc.yaml deps are complete
# Library modules that only orchestrate or log: nothing they do reaches a stage's outputs, so an edit
# to them must not rerun the pipeline. Their own imports are not followed.
EXEMPT = {
    # MLflow: opens the stage's run and logs params, metrics and tags; writes nothing under data/
    "forgeline/tracking.py",
    # the Prefect task wrapper (`dvc repro --single-item`), the workspace lock, MLflow datasets and
    # upstream tags: decides when a stage runs, never what it computes
    "forgeline/workspace.py",
    # git commit and dvc.lock digests for MLflow tags, and the `forgeline lineage` audit: reads only
    "forgeline/lineage.py",
}
PACKAGES = {p.parent.name for p in ROOT.glob("*/__init__.py")}


def module_file(name: str) -> Path | None:
    """The repo file of dotted module `name`, or None when it is not one of ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def inert(path: Path) -> bool:
    """A package __init__ that holds only a docstring: importing it cannot change anything."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (lazy imports inside functions included)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from forgeline import metrics`
    return names


def repo_files(module: str) -> set[Path]:
    """The file of `module` and of each package above it (their __init__ runs on import)."""
    parts = module.split(".")
    files = {module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)}
    return {f for f in files if f is not None}


def closure(modules: list[str]) -> set[str]:
    """Repo files (relative paths) reachable by imports from `modules`, not through EXEMPT ones."""
    seen: set[Path] = set()
    todo = [f for m in modules for f in repo_files(m)]
    while todo:
        path = todo.pop()
        if path in seen or path.relative_to(ROOT).as_posix() in EXEMPT:
            continue
        seen.add(path)
        for name in imported_modules(path):
            todo += repo_files(name)
    return {p.relative_to(ROOT).as_posix() for p in seen if not inert(p)}


def cmd_modules(cmd: str) -> list[str]:
    """Modules a stage's cmd runs: `python -m tasks.x`, and `python -m forgeline.launch tasks.x`
    (the launcher and the module it launches)."""
    return [tok for tok in cmd.split() if re.fullmatch(r"[A-Za-z_][\w.]*", tok) and module_file(tok)]


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def missing_deps(stage: dict) -> list[str]:
    deps = stage.get("deps", [])
    return sorted(p for p in closure(cmd_modules(stage["cmd"])) if not covered(p, deps))


def test_import_closure_follows_lazy_imports_and_stops_at_exempt_modules():
    files = closure(["tasks.rlhf"])
    assert {"tasks/rlhf/__init__.py", "tasks/rlhf/ppo.py", "models/gpt.py", "forgeline/checkpoint.py",
            "forgeline/config.py"} <= files
    assert "forgeline/chat.py" in closure(["tasks.sft"])
    assert not files & EXEMPT and "forgeline/registry.py" not in files  # only lineage (exempt) imports it
    assert "tasks/__init__.py" not in files  # a docstring only
    assert cmd_modules("python -m forgeline.launch tasks.pretrain") == ["forgeline.launch", "tasks.pretrain"]


def test_every_stage_lists_the_code_it_imports():
    gaps = {name: missing for name, stage in stages().items() if (missing := missing_deps(stage))}
    assert not gaps, "dvc.yaml: stages whose code imports files they do not list as deps " \
                     "(an edit to them would rerun nothing):\n" + \
                     "\n".join(f"  {name}: {', '.join(files)}" for name, files in gaps.items())


def test_every_listed_dep_exists():
    tracked = tracked_files()
    outs = [o for stage in stages().values() for o in stage.get("outs", [])]
    bad = [f"{name}: {dep}" for name, stage in stages().items() for dep in stage.get("deps", [])
           if not covered(dep, outs) and not any(covered(t, [dep]) for t in tracked)]
    assert not bad, "dvc.yaml deps that are neither in git nor another stage's out:\n" + "\n".join(bad)


def test_exempt_modules_exist():
    assert all((ROOT / p).is_file() for p in EXEMPT)


# ---------------------------------------------------------------------------- 3. the library/stage boundary
# nanochat's scripts import only the library, never each other: a stage module (tasks/<stage>.py, or the
# modules of a stage package tasks/<stage>/) never imports another stage's; forgeline/ (the library)
# never imports tasks/ or flows/; models/ stays pure PyTorch, free of orchestration and tracking.
ORCHESTRATION = ("prefect", "mlflow", "dvc")


def stage_of(path: Path) -> str | None:
    """The stage a file under tasks/ belongs to: `tasks/sft.py` -> sft, `tasks/rlhf/ppo.py` -> rlhf."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] != "tasks" or len(parts) < 2 or parts[1] == "__init__":
        return None
    return parts[1]


def boundary_violations(path: Path) -> list[str]:
    """The imports of `path` (lazy ones included) that cross the library/stage boundary."""
    rel = path.relative_to(ROOT).as_posix()
    bad = []
    for name in sorted(imported_modules(path)):
        top = name.split(".")[0]
        target = module_file(name)
        if rel.startswith("tasks/") and target is not None and stage_of(target) not in (None, stage_of(path)):
            bad.append(f"{rel} imports stage module {target.relative_to(ROOT).as_posix()}")
        elif rel.startswith("forgeline/") and top in ("tasks", "flows"):
            bad.append(f"{rel} imports {top}/ (the library must not import stages or flows)")
        elif rel.startswith("models/") and top in ORCHESTRATION:
            bad.append(f"{rel} imports {top} (models/ is pure PyTorch)")
    return sorted(set(bad))


def test_the_boundary_check_catches_each_kind_of_crossing(tmp_path, monkeypatch):
    cases = {"tasks/sft.py": "from tasks.pretrain import lr_at\n",
             "tasks/rlhf/ppo.py": "def f():\n    import tasks.reward\n",           # lazy, from a stage package
             "forgeline/registry.py": "def f():\n    from tasks.pretrain import load_pretrained\n",
             "forgeline/cli.py": "import flows.llm\n",
             "models/gpt.py": "def f():\n    import mlflow\n"}
    allowed = {"tasks/rlhf/dpo.py": "from tasks.rlhf.common import lr_at\nfrom forgeline.chat import END\n",
               "forgeline/plan.py": "from models.gpt import GPT\n", "models/sampling.py": "import torch\n"}
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for pkg in ("tasks", "tasks/rlhf", "forgeline", "flows", "models"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    for stage in ("pretrain", "reward", "sft"):
        (tmp_path / "tasks" / f"{stage}.py").write_text("")
    (tmp_path / "flows" / "llm.py").write_text("")
    for rel, src in {**cases, **allowed}.items():
        (tmp_path / rel).write_text(src)
    assert [len(boundary_violations(tmp_path / rel)) for rel in cases] == [1] * len(cases)
    assert [boundary_violations(tmp_path / rel) for rel in allowed] == [[]] * len(allowed)


def test_stages_import_only_the_library_and_the_library_no_stage():
    files = [ROOT / p for p in tracked_files() if p.endswith(".py") and p.split("/")[0] in ("tasks", "forgeline", "models")
             and (ROOT / p).is_file()]
    files += [p for p in ROOT.glob("tasks/**/*.py") if p not in files]   # new stage modules not yet in git
    bad = [v for path in files for v in boundary_violations(path)]
    assert not bad, "imports across the library/stage boundary:\n" + "\n".join(bad)
