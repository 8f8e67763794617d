"""Benchmark Smart Compose per keystroke: the service in process and through HTTP, against
transformers' `generate` on the same weights.

The model is the served folder the compose pipeline wrote (data/compose_eval/model: learned
positions, LayerNorm, GELU), exported with models/gpt2_export.py and loaded by transformers'
GPT2LMHeadModel (fp32, sdpa). Keystrokes come from the held-out test letters/dialogue: at each of
`--keystrokes` word ends a 64-token prefix is cut; the keystroke before it (the prefix less its last
token) is sent first and not timed, then the keystroke that completes the word and types the space
is timed: its one new prompt token runs on the session's cached prefix, then beam search (4 beams,
up to 8 new tokens), cut, threshold and PII check. Rows, in interleaved rounds (background load on
the shared cores hits them alike):

  - in process: `ComposeService.handle` (what the endpoint runs);
  - HTTP: POST /v1/compose to a uvicorn server on 127.0.0.1 (one keep-alive connection);
  - in process without the prompt cache (no session: the whole 64-token prompt runs each time);
  - transformers: `generate(num_beams=4, max_new_tokens=8)` on the 64-token prompt.

The first keystrokes are checked: our best beam equals transformers' tokens. Target: in-process
p95 <= 30 ms and >= 1.8x transformers (p50 ratio). Writes bench/results/compose.json.

    .venv/bin/python -m bench.bench_compose [--keystrokes 200] [--threads 1] [--model data/compose_eval/model]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import ROOT, machine, write_result
from forgeline.compose import Composer
from models.gpt2_export import export_gpt2
from models.sampling import beam_search
from serve.compose import ComposeRequest, ComposeService

PREFIX_TOKENS = 64
TARGET_P95_MS = 30.0
TARGET_SPEEDUP = 1.8


def keystroke_pairs(composer: Composer, texts: list[str], n: int) -> list[tuple[str, str]]:
    """(previous keystroke's text, the word-ending keystroke's text + " ") with a 64-token prompt."""
    tok = composer.tokenizer
    pairs = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        for end in range(PREFIX_TOKENS, len(ids) - 1, 9):
            window = ids[end - PREFIX_TOKENS:end]
            full = tok.decode(window)
            nxt = tok.decode(ids[end:end + 1])
            # the word must end here: the next token starts a new word
            if not nxt.startswith(" ") or full.endswith(" ") or "\n" in full[-30:]:
                continue
            pairs.append((tok.decode(window[:-1]), full + " "))
            if len(pairs) == n:
                return pairs
    return pairs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, threads: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "FORGELINE_COMPOSE_MODEL": str(model_dir), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serve.app:create_app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env)
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def post(conn: http.client.HTTPConnection, payload: dict) -> dict:
    conn.request("POST", "/v1/compose", json.dumps(payload), {"content-type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {body[:300]!r}")
    return json.loads(body)


def percentiles(ms: list[float]) -> dict:
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(np.mean(ms)), "n": len(ms)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "data" / "compose_eval" / "model"))
    ap.add_argument("--domain", default=str(ROOT / "data" / "compose_data" / "domain.parquet"))
    ap.add_argument("--keystrokes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", type=int, default=20, help="keystrokes whose beams are compared with transformers'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = machine()

    import transformers
    from transformers import GPT2LMHeadModel

    model_dir = Path(args.model)
    service = ComposeService(model_dir)
    composer = service.load()
    s = composer.settings
    folder = export_gpt2(composer.model, tempfile.mkdtemp(prefix="bench-compose-"), eos_token_id=composer.eot,
                         pad_token_id=0)
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    domain = pd.read_parquet(args.domain)
    texts = domain.loc[domain["split"] == "test", "text"].tolist()
    pairs = keystroke_pairs(composer, texts, args.keystrokes)

    def hf_generate(prompt: list[int]) -> list[int]:
        x = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), num_beams=s.num_beams, max_new_tokens=s.max_new_tokens,
                              do_sample=False, eos_token_id=composer.eot, pad_token_id=0, length_penalty=1.0,
                              early_stopping=False)
        return out[0, len(prompt):].tolist()

    # ---- same weights, same beams
    same = 0
    for _, text in pairs[:args.check]:
        prompt = composer.prompt_ids(text)
        ours = beam_search(composer.model, [prompt], composer.gen)[0][0].tokens
        theirs = hf_generate(prompt)
        theirs = theirs[:theirs.index(composer.eot) + 1] if composer.eot in theirs else theirs
        same += ours == theirs
    print(f"best beam identical to transformers' on {same}/{min(args.check, len(pairs))} prompts", flush=True)

    proc, port = start_server(model_dir, args.threads)
    rows = {"in_process": [], "http": [], "in_process_no_cache": [], "transformers": []}
    prompt_lens, computed, shown = [], [], 0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for w in range(3):  # warm-up: allocator, the server's first model load
            post(conn, {"prefix": pairs[w][1], "session_id": "warm", "idle_ms": 10_000})
            service.handle(ComposeRequest(prefix=pairs[w][1], idle_ms=10_000))
            hf_generate(composer.prompt_ids(pairs[w][1]))
        for i, (prev, text) in enumerate(pairs):
            sid = f"k{i}"
            # in process: the previous keystroke fills the session's cache (untimed), then the timed one
            service.handle(ComposeRequest(prefix=prev, session_id=sid, idle_ms=10_000))
            t0 = time.perf_counter()
            r = service.handle(ComposeRequest(prefix=text, session_id=sid, idle_ms=10_000))
            rows["in_process"].append((time.perf_counter() - t0) * 1000)
            computed.append(r.computed_tokens)
            shown += r.suggestion is not None
            prompt_lens.append(r.cached_tokens + r.computed_tokens)
            # through HTTP
            post(conn, {"prefix": prev, "session_id": sid, "idle_ms": 10_000})
            t0 = time.perf_counter()
            post(conn, {"prefix": text, "session_id": sid, "idle_ms": 10_000})
            rows["http"].append((time.perf_counter() - t0) * 1000)
            # no session: the whole prompt runs
            t0 = time.perf_counter()
            service.handle(ComposeRequest(prefix=text, idle_ms=10_000))
            rows["in_process_no_cache"].append((time.perf_counter() - t0) * 1000)
            # transformers on the same prompt
            prompt = composer.prompt_ids(text)
            t0 = time.perf_counter()
            hf_generate(prompt)
            rows["transformers"].append((time.perf_counter() - t0) * 1000)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    stats = {name: percentiles(ms) for name, ms in rows.items()}
    ref = stats["transformers"]["p50"]
    for name, st in stats.items():
        st["speedup_p50_vs_transformers"] = ref / st["p50"]
    print(f"\nper keystroke: {len(pairs)} keystrokes, prompt {np.mean(prompt_lens):.1f} tokens "
          f"({np.mean(computed):.2f} run per keystroke with the cache), beam {s.num_beams}, <= {s.max_new_tokens} new "
          f"tokens, {args.threads} thread(s), transformers {transformers.__version__}\n")
    print("| path | p50 ms | p95 ms | p99 ms | speedup vs transformers (p50) |\n|---|---|---|---|---|")
    for name, st in stats.items():
        print(f"| {name} | {st['p50']:.2f} | {st['p95']:.2f} | {st['p99']:.2f} | {st['speedup_p50_vs_transformers']:.2f}x |")
    result = {"keystrokes": len(pairs), "threads": args.threads, "num_beams": s.num_beams,
              "max_new_tokens": s.max_new_tokens, "prompt_tokens_mean": float(np.mean(prompt_lens)),
              "computed_tokens_mean": float(np.mean(computed)), "shown_share": shown / len(pairs),
              "beams_identical": f"{same}/{min(args.check, len(pairs))}", "model": str(model_dir),
              "transformers": transformers.__version__, "torch": torch.__version__, "stats": stats,
              "targets": {"in_process_p95_ms": TARGET_P95_MS, "speedup": TARGET_SPEEDUP},
              "met": {"p95": stats["in_process"]["p95"] <= TARGET_P95_MS,
                      "speedup": stats["in_process"]["speedup_p50_vs_transformers"] >= TARGET_SPEEDUP}}
    print(f"\nwritten: {write_result('compose', result, started)}")
    return result


if __name__ == "__main__":
    main()
