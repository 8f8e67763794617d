"""mt_validate: the Great Expectations gate on the translation pairs, before anything trains on them.

A GX 1.x suite on data/mt_data/pairs.parquet plus columns derived here: no empty side, the
target/source character-length ratio within bounds, each side in its stated language by a cheap
offline detector (stopword profiles, `detect_language`: a side with no stopword of any profile is
undecided and counts as agreeing), unique pair ids, and no document in two splits. Writes
data/mt_validate/result.json and Data Docs; a failed suite exits non-zero naming each failed
expectation and its unexpected count. mt_train refuses to start unless result.json passed on these
very pairs (their sha256).

    python -m tasks.mt_validate [key=value ...]
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import task

from forgeline.config import ConfigError, config_dict, load_config, stage_config
from forgeline.workspace import run_stage

# Frequent function words of each language (none shared between two lists: "la", "un", "de" are left out), enough to
# tell English, French, Spanish and German apart on a sentence that has two or three of them.
STOPWORDS = {
    "en": "the of and to in is that for it with as was on be by this are or from at which not have "
          "can if will all you your has been there would when one their more into only may should".split(),
    "fr": "le les des du une et est pour dans qui sur pas au aux ce cette il elle sont avec "
          "ou par plus ne vous nous être été fichier peut leur mais aussi ces votre".split(),
    "es": "el los las del una y es para en que por con su sus lo se al como pero más este esta "
          "ha son puede usted archivo ser fue sobre entre cuando todo también".split(),
    "de": "der die das und ist nicht ein eine zu den von mit sich auf für im dem werden wird "
          "kann oder auch als nach bei datei sie wenn nur noch".split(),
}
_WORD = re.compile(r"[^\W\d_]+")
_PROFILE = {w: lang for lang, ws in STOPWORDS.items() for w in ws}
assert len(_PROFILE) == sum(map(len, STOPWORDS.values())), "a stopword in two profiles"


def detect_language(text: str) -> str | None:
    """The language whose stopwords occur most often in `text`; None when none occurs or two tie."""
    counts: dict[str, int] = {}
    for w in _WORD.findall(text.lower()):
        if w in _PROFILE:
            counts[_PROFILE[w]] = counts.get(_PROFILE[w], 0) + 1
    if not counts:
        return None
    ranked = sorted(counts.values(), reverse=True)
    if len(ranked) > 1 and ranked[0] == ranked[1]:
        return None
    return max(counts, key=counts.get)


@dataclass
class MTValidateConfig:
    pairs: str = "data/mt_data/pairs.parquet"
    out_dir: str = "data/mt_validate"
    min_pairs: int = 100                 # fewer is not a training set
    min_ratio: float = 0.5               # target/source characters, as mt_data filters
    max_ratio: float = 2.2
    min_language_agreement: float = 0.9  # share of sides whose detected language is the stated one (or undecided)

    def check(self) -> None:
        if not 0 < self.min_ratio <= 1 <= self.max_ratio:
            raise ConfigError("mt_validate: need 0 < min_ratio <= 1 <= max_ratio")
        if not 0 <= self.min_language_agreement <= 1:
            raise ConfigError("mt_validate: min_language_agreement is a share (0-1)")


class ValidationFailed(RuntimeError):
    """The pairs did not meet the suite. Not transient: never retried."""


def derive(pairs: pd.DataFrame) -> pd.DataFrame:
    """The columns the suite checks: length ratio, detected language per side (stated one when
    undecided), the number of splits the row's document appears in."""
    df = pairs.copy()
    df["src_chars"], df["tgt_chars"] = df["src"].str.len(), df["tgt"].str.len()
    df["length_ratio"] = df["tgt_chars"] / df["src_chars"].clip(lower=1)
    for side in ("src", "tgt"):
        detected = df[side].map(detect_language)
        df[f"{side}_undecided"] = detected.isna()
        df[f"{side}_detected"] = detected.fillna(df[f"{side}_lang"])
    df["doc_splits"] = df.groupby("doc_id")["split"].transform("nunique")
    return df


def build_suite(cfg: MTValidateConfig):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    agree = cfg.min_language_agreement
    return gx.ExpectationSuite(name="pairs", expectations=[
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_pairs),
        gxe.ExpectColumnValuesToNotBeNull(column="src"),
        gxe.ExpectColumnValuesToNotBeNull(column="tgt"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="src", min_value=1),
        gxe.ExpectColumnValueLengthsToBeBetween(column="tgt", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="length_ratio", min_value=cfg.min_ratio, max_value=cfg.max_ratio),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="src_lang", column_B="src_detected", mostly=agree),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="tgt_lang", column_B="tgt_detected", mostly=agree),
        gxe.ExpectColumnValuesToBeUnique(column="pair_id"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"]),
        gxe.ExpectColumnValuesToBeBetween(column="doc_splits", min_value=1, max_value=1),
    ])


def mt_validate(cfg: MTValidateConfig) -> dict:
    """Run the suite; write result.json and Data Docs; raise ValidationFailed when it fails."""
    from forgeline.expectations import run_suite

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = derive(pd.read_parquet(cfg.pairs))
    success, evaluated, failures = run_suite(df, build_suite(cfg), out, "pairs")
    with open(cfg.pairs, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    summary = {
        "success": success, "pairs": int(len(df)),
        "pairs_sha256": sha,  # which table this verdict is about: mt_train refuses a report on other pairs
        "undecided_language_share": {s: round(float(df[f"{s}_undecided"].mean()), 4) for s in ("src", "tgt")},
        "evaluated_expectations": evaluated, "failed_expectations": len(failures), "failures": failures,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    if failures:
        lines = [f"  - {f['expectation']}({f['column'] or 'table'}): {f['unexpected_count']} unexpected" for f in failures]
        raise ValidationFailed(f"{len(failures)} of {evaluated} expectations failed on {cfg.pairs}:\n"
                               + "\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    stage, cfg = stage_config(MTValidateConfig, "mt_validate", sys.argv[1:] if argv is None else argv)
    with stage_run(stage, config_dict(cfg)):
        try:
            summary = mt_validate(cfg)
        except ValidationFailed as e:
            mlflow.set_tag("validate.failed", "true")
            mlflow.log_artifact(str(Path(cfg.out_dir) / "result.json"))
            print(f"mt_validate: FAILED\n{e}", file=sys.stderr)
            sys.exit(1)
        mlflow.log_metrics({"pairs": summary["pairs"], "failed_expectations": 0})
        mlflow.log_artifact(str(Path(cfg.out_dir) / "result.json"))
    print(json.dumps(summary))


@task(name="mt_validate", task_run_name="{stage}", retries=0)  # a data failure is not transient: never retried
def mt_validate_task(run: dict[str, str], stage: str = "mt_validate") -> dict:
    from dvc.exceptions import ReproductionError

    try:
        return run_stage(stage, **run)
    except ReproductionError as e:
        report = Path(load_config(MTValidateConfig, stage).out_dir) / "result.json"  # fresh: DVC removed the old outs
        if report.exists() and not (summary := json.loads(report.read_text()))["success"]:
            raise ValidationFailed(f"{summary['failed_expectations']} expectations failed: "
                                   + ", ".join(f"{f['expectation']}({f['column']}): {f['unexpected_count']}"
                                               for f in summary["failures"])) from e
        raise


if __name__ == "__main__":
    main()
