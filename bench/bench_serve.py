"""Benchmark the LLM service (serve/llm) over HTTP on 127.0.0.1: latency, throughput and behaviour under load.

One run: uvicorn serves the app (`serve.app:create_app`) in a child process, guards on, over a model folder;
an asyncio httpx client measures
  1. streaming at batch 1: time to first token (request sent -> first content chunk) p50/p95 and decode
     tokens/s ((completion tokens - 1) / (last chunk - first chunk)), 64 tokens (`ignore_eos`: the trained
     model's replies end after ~6 tokens, too few to time decoding);
  2. a best-of-4 reply (4 candidates of 64 tokens, `ignore_eos`, ranked by the reward model, then the response
     check), not streamed: latency p50/p95;
  3. load: 1, 4 and 16 concurrent clients, each sending a fixed number of non-streamed requests (bounded work,
     a 60 s client timeout so nothing hangs): throughput, latency p50/p95/p99 of the answered ones, answers by
     HTTP status (200, 429, 503, timeouts), and the server's RSS before and after; then 4 clients,
     every request served, for --soak-rounds rounds with the RSS after each: a plateau, or growth round after round.
The reference, measured in the same run and process tree: the same model called directly through
models/sampling.py (no HTTP, no guards, no template work) for the first token and for 64 tokens at batch 1,
and for 4 candidates of 64 tokens; the table gives served / direct ratios. Targets: TTFT p95 <= 300 ms,
best-of-4 p95 <= 2 s, and at overload only 429/503 (never a hang or a 5xx other than 503).

    flock /tmp/forgeline-heavy.lock .venv/bin/python -m bench.bench_serve --model data/rlhf [--reward data/reward]
        [--guard data/safety/guard] [--requests 30] [--per-client 6]

Without --reward or --guard (no reward or safety stage output yet) it builds stand-ins with the same cost:
a reward model of the policy's shape with random weights, and a guard folder with the real MiniLM embedder
and the real rules under a placeholder classifier; the result records which were used.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch

from bench import ROOT, machine, write_result

PROMPTS = ["What is 12 + 7?", "Reverse the word apple.", "How many letters are in the word banana?",
           "Hello, how are you today?", "What is a computer?", "Tell me about Python lists.",
           "What do you like to read?", "What is 45 + 38?", "Reverse the word window.", "Do you like music?"]
TTFT_TARGET_S, BEST_OF_TARGET_S = 0.300, 2.0


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stand_ins(model_dir: Path, reward: str | None, guard: str | None, tmp: Path) -> tuple[str, str, dict]:
    """The reward and guard folders to serve with, building timing stand-ins where none is given."""
    used = {"reward": reward or "stand-in: random weights, the policy's shape", "guard": guard or
            "stand-in: MiniLM embedder + real rules, placeholder classifier (flags nothing)"}
    if reward is None:
        from forgeline.checkpoint import save_model_folder
        from models.gpt import GPTConfig
        from models.reward_model import RewardModel

        cfg = GPTConfig(**json.loads((model_dir / "config.json").read_text()))
        torch.manual_seed(0)
        reward = str(save_model_folder(tmp / "reward", RewardModel(cfg), cfg, model_dir / "tokenizer.json"))
    if guard is None:
        from forgeline.safety import Guard

        guard = str(Guard.save(tmp / "guard", {"threshold_input": 0.5, "threshold_output": 0.5, "categories": ["harm"],
                                               "max_tokens": 128, "embedder": {"int8": False}},
                               {"w1": np.zeros((384, 1)), "b1": np.full(1, -30.0), "centroids": np.zeros((1, 384))}))
    return reward, guard, used


def direct_reference(model_dir: Path, rounds: int) -> dict:
    """models/sampling.py on the same weights, no server: first token and 64 tokens at batch 1, 4 x 64 tokens."""
    from forgeline.chat import encode_chat, load_tokenizer
    from forgeline.checkpoint import load_model_folder
    from models.sampling import GenerationConfig, generate

    model, tok = load_model_folder(model_dir), load_tokenizer(model_dir / "tokenizer.json")
    ids = [encode_chat(tok, [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": p}], add_generation_prompt=True)[0] for p in PROMPTS]
    first, eight, full, four = [], [], [], []
    for r in range(rounds):
        p = ids[r % len(ids)]
        t0 = time.perf_counter(); generate(model, [p], GenerationConfig(max_new_tokens=1, temperature=0.7, seed=r))
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); generate(model, [p], GenerationConfig(max_new_tokens=8, temperature=0.7, seed=r))
        eight.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); generate(model, [p], GenerationConfig(max_new_tokens=64, temperature=0.7, seed=r))
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate(model, [p], GenerationConfig(max_new_tokens=64, temperature=0.7, num_return_sequences=4, seed=r))
        four.append(time.perf_counter() - t0)
    return {"first_token_s_p50": pct(first, 50), "first_8_tokens_s_p50": pct(eight, 50), "tokens_per_s": 63 / (statistics.median(full) - statistics.median(first)),
            "best_of_4_s_p50": pct(four, 50), "best_of_4_s_p95": pct(four, 95)}


async def stream_once(client: httpx.AsyncClient, url: str, prompt: str, seed: int) -> dict:
    body = {"model": "forgeline-llm", "messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    tokens = usage["completion_tokens"]
    return {"ttft": (first or time.perf_counter()) - t0, "tokens": tokens,
            "tps": (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else None}


async def post_chat(client: httpx.AsyncClient, url: str, prompt: str, seed: int, **extra) -> tuple[int | str, float, dict]:
    body = {"model": "forgeline-llm", "messages": [{"role": "user", "content": prompt}], "seed": seed, **extra}
    t0 = time.perf_counter()
    try:
        resp = await client.post(f"{url}/v1/chat/completions", json=body)
    except httpx.TimeoutException:
        return "timeout", time.perf_counter() - t0, {}
    return resp.status_code, time.perf_counter() - t0, resp.json() if resp.status_code == 200 else {}


async def load_phase(url: str, clients: int, per_client: int) -> dict:
    lat, codes, tokens = [], {}, 0
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients + 2)) as client:
        async def one(c: int):
            nonlocal tokens
            for i in range(per_client):
                code, dt, out = await post_chat(client, url, PROMPTS[(c + i) % len(PROMPTS)], c * 1000 + i, max_tokens=32)
                codes[str(code)] = codes.get(str(code), 0) + 1
                if code == 200:
                    lat.append(dt)
                    tokens += out["usage"]["completion_tokens"]
                elif code in (429, 503):
                    await asyncio.sleep(0.2)     # a polite client backs off a little (Retry-After is in seconds)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * per_client, "wall_s": wall, "answered": len(lat),
            "throughput_rps": len(lat) / wall, "completion_tokens_per_s": tokens / wall,
            "latency_s_p50": pct(lat, 50), "latency_s_p95": pct(lat, 95), "latency_s_p99": pct(lat, 99), "codes": codes}


async def measure(url: str, pid: int, requests: int, per_client: int, soak_rounds: int) -> dict:
    proc = psutil.Process(pid)
    out: dict = {"rss_mb_start": proc.memory_info().rss / 2**20}
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(3):   # warm-up: first-call costs (thread pool, allocator) out of the figures
            await stream_once(client, url, PROMPTS[i], i)
        runs = [await stream_once(client, url, PROMPTS[i % len(PROMPTS)], 100 + i) for i in range(requests)]
        out["stream"] = {"n": len(runs), "ttft_s_p50": pct([r["ttft"] for r in runs], 50),
                         "ttft_s_p95": pct([r["ttft"] for r in runs], 95),
                         "tokens_per_s_p50": pct([r["tps"] for r in runs if r["tps"]], 50),
                         "completion_tokens_mean": statistics.mean(r["tokens"] for r in runs)}
        best = []
        for i in range(requests):
            code, dt, body = await post_chat(client, url, PROMPTS[i % len(PROMPTS)], 200 + i, max_tokens=64, best_of=4,
                                             temperature=1.0, trace=True, ignore_eos=True)
            assert code == 200, code
            gen = next(t for t in body["forgeline"]["trace"] if t["step"] == "generator")
            best.append((dt, statistics.mean(gen["tokens"])))
        out["best_of_4"] = {"n": len(best), "latency_s_p50": pct([b[0] for b in best], 50),
                            "latency_s_p95": pct([b[0] for b in best], 95),
                            "tokens_per_candidate_mean": statistics.mean(b[1] for b in best)}
    out["rss_mb_before_load"] = proc.memory_info().rss / 2**20
    out["load"] = []
    for clients in (1, 4, 16):
        out["load"].append(await load_phase(url, clients, per_client))
        out["load"][-1]["rss_mb_after"] = proc.memory_info().rss / 2**20
    # soak: a fully served phase (4 clients: every request generates) again and again; RSS after each round
    # tells a plateau (allocator pools, caches filled once) from a leak (growth every round)
    out["soak"] = []
    for r in range(soak_rounds):
        ph = await load_phase(url, 4, per_client * 4)
        out["soak"].append({"round": r + 1, "answered": ph["answered"], "codes": ph["codes"],
                            "rss_mb_after": proc.memory_info().rss / 2**20})
    out["rss_mb_end"] = proc.memory_info().rss / 2**20
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="data/rlhf", help="a model folder (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--reward", default=None, help="the reward stage's folder (default: a same-cost stand-in)")
    ap.add_argument("--guard", default=None, help="the safety stage's guard folder (default: a same-cost stand-in)")
    ap.add_argument("--requests", type=int, default=30, help="streamed and best-of-4 requests each")
    ap.add_argument("--per-client", type=int, default=6, help="requests per client in each load phase")
    ap.add_argument("--soak-rounds", type=int, default=8, help="rounds of 4 clients x 4 x per-client requests after the load table, RSS after each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (OMP_NUM_THREADS)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model).resolve()
    started = machine()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        reward, guard, used = stand_ins(model_dir, args.reward, args.guard, tmp)
        (tmp / "service.yaml").write_text(json.dumps({"best_of": 4}))
        port = free_port()
        env = {**os.environ, "NO_PROXY": "127.0.0.1", "OMP_NUM_THREADS": str(args.threads),
               "FORGELINE_LLM_MODEL": str(model_dir), "FORGELINE_LLM_REWARD": reward, "FORGELINE_LLM_GUARD": guard,
               "FORGELINE_LLM_CONFIG": str(tmp / "service.yaml"), "FORGELINE_LLM_LOG": "WARNING"}
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serve.app:create_app", "--host",
                                   "127.0.0.1", "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                try:
                    if httpx.get(f"{url}/v1/models", timeout=60).json()["data"]:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            served = asyncio.run(measure(url, server.pid, args.requests, args.per_client, args.soak_rounds))
            alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
        finally:
            os.kill(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    direct = direct_reference(model_dir, max(10, args.requests // 2))
    s, b = served["stream"], served["best_of_4"]
    result = {"model": str(model_dir), "used": used, "threads": args.threads, "served": served, "direct": direct,
              "server_up_after_load": alive,
              "ratios": {"ttft_p50_vs_direct_first_token": s["ttft_s_p50"] / direct["first_token_s_p50"],
                         "ttft_p50_vs_direct_first_8_tokens": s["ttft_s_p50"] / direct["first_8_tokens_s_p50"],
                         "tokens_per_s_vs_direct": s["tokens_per_s_p50"] / direct["tokens_per_s"],
                         "best_of_4_p50_vs_direct": b["latency_s_p50"] / direct["best_of_4_s_p50"]},
              "targets": {"ttft_p95_s": TTFT_TARGET_S, "ttft_met": s["ttft_s_p95"] <= TTFT_TARGET_S,
                          "best_of_4_p95_s": BEST_OF_TARGET_S, "best_of_4_met": b["latency_s_p95"] <= BEST_OF_TARGET_S,
                          "overload_only_429_503": all(set(p["codes"]) <= {"200", "429", "503"}
                                                          for p in served["load"] + served["soak"])}}
    print("| measure | served (HTTP, guards on) | direct (models/sampling.py) | ratio | target |\n|---|---|---|---|---|")
    print(f"| TTFT p50 / p95, streaming, batch 1 | {s['ttft_s_p50']*1000:.0f} / {s['ttft_s_p95']*1000:.0f} ms | "
          f"{direct['first_token_s_p50']*1000:.1f} ms (first token), {direct['first_8_tokens_s_p50']*1000:.1f} ms (first 8, "
          f"what a stream releases first) | {result['ratios']['ttft_p50_vs_direct_first_8_tokens']:.1f}x the first 8 | "
          f"p95 <= 300 ms: {'met' if result['targets']['ttft_met'] else 'MISSED'} |")
    print(f"| decode tokens/s, streaming, batch 1 | {s['tokens_per_s_p50']:.0f} | {direct['tokens_per_s']:.0f} | "
          f"{result['ratios']['tokens_per_s_vs_direct']:.2f}x | |")
    print(f"| best-of-4, max 64 tokens, p50 / p95 | {b['latency_s_p50']:.2f} / {b['latency_s_p95']:.2f} s "
          f"({b['tokens_per_candidate_mean']:.0f} tokens/candidate) | {direct['best_of_4_s_p50']:.2f} / "
          f"{direct['best_of_4_s_p95']:.2f} s (64 tokens) | {result['ratios']['best_of_4_p50_vs_direct']:.1f}x | "
          f"p95 <= 2 s: {'met' if result['targets']['best_of_4_met'] else 'MISSED'} |")
    print("\n| clients | requests | answered | req/s | tokens/s | p50 / p95 / p99 | answers by status | RSS after |\n"
          "|---|---|---|---|---|---|---|---|")
    fmt = lambda x: f"{x:.2f}" if x is not None else "-"
    for p in served["load"]:
        print(f"| {p['clients']} | {p['requests']} | {p['answered']} | {p['throughput_rps']:.2f} | "
              f"{p['completion_tokens_per_s']:.0f} | {fmt(p['latency_s_p50'])} / {fmt(p['latency_s_p95'])} / "
              f"{fmt(p['latency_s_p99'])} s | {p['codes']} | {p['rss_mb_after']:.0f} MB |")
    if served["soak"]:
        print("soak (4 clients, 96 requests a round): RSS after each round " +
              ", ".join(f"{r['rss_mb_after']:.0f}" for r in served["soak"]) + " MB; answers " +
              ", ".join(str(r["codes"]) for r in served["soak"]))
    print(f"\nserver RSS {served['rss_mb_start']:.0f} MB at start, {served['rss_mb_before_load']:.0f} before the load, "
          f"{served['rss_mb_end']:.0f} at the end; up after the load: {alive}")
    print(f"wrote {write_result('serve', result, started)}")


if __name__ == "__main__":
    main()
