"""Benchmark GPT training throughput on CPU: models/gpt.py against the textbook bench/reference_gpt.py.

Measures the CPU's fp32 and bf16 matmul peak (2048x2048 matmuls), then training tokens/s
(forward + backward + AdamW step) and MFU for two configs, each with our model and the reference
holding the same weights: (a) our `tiny` preset (RoPE, RMSNorm, SwiGLU) and (b) nanoGPT's baby-GPT
config (GPT-2 parts: learned positions, LayerNorm, GELU; 4 layers, 4 heads, 128 wide, block 128,
batch 16), both fp32, no torch.compile; plus our model under bf16 autocast. Variants are timed in
interleaved rounds of a few steps, so background load on the (shared) CPU hits them alike; the
fastest round is the headline (the least-disturbed measurement, as timeit does), the median is
reported beside it. Prints a markdown table and writes bench/results/gpt.json.
Target: ours >= 1.2x the reference's tokens/s.

    .venv/bin/python -m bench.bench_gpt [--steps 3] [--rounds 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.reference_gpt import ReferenceGPT
from models.gpt import GPT, GPTConfig

RESULTS = Path(__file__).resolve().parent / "results" / "gpt.json"
TARGET_SPEEDUP = 1.2
BATCH_SIZE = 16
CONFIGS = {
    "tiny": GPTConfig.from_preset("tiny"),
    # nanoGPT README "baby GPT" on CPU (shakespeare_char config: no biases, dropout 0 for speed)
    "nanogpt": GPTConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=128,
                         bias=False, pos_encoding="learned", norm="layernorm", mlp="gelu"),
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, iters: int = 10, repeats: int = 3) -> float:
    """Best-of-repeats FLOP/s of n x n @ n x n matmuls in `dtype` (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * iters / best


def train_steps(model, opt, x, y, steps: int, bf16: bool) -> float:
    """Seconds for `steps` training steps on batch (x, y)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    for _ in range(steps):
        with autocast:
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss.item()
    return time.perf_counter() - t0


def bench_config(name: str, cfg: GPTConfig, peaks: dict[str, float], warmup: int, steps: int,
                 rounds: int) -> list[dict]:
    torch.manual_seed(0)
    ours = GPT(cfg)
    variants = {}  # label -> (model, optimizer, bf16)
    for dtype in ("fp32", "bf16"):
        m = GPT(cfg)
        m.load_state_dict(ours.state_dict())
        variants[("ours", dtype)] = (m, m.configure_optimizers(0.1, 1e-3, (0.9, 0.95)), dtype == "bf16")
    ref = ReferenceGPT(cfg)
    ref.copy_weights_from(ours)
    variants[("reference", "fp32")] = (ref, torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                                              weight_decay=0.1), False)
    x = torch.randint(0, cfg.vocab_size, (BATCH_SIZE, cfg.block_size))
    y = torch.randint(0, cfg.vocab_size, (BATCH_SIZE, cfg.block_size))

    times = {key: [] for key in variants}
    for model, opt, bf16 in variants.values():
        train_steps(model, opt, x, y, warmup, bf16)
    for _ in range(rounds):
        for key, (model, opt, bf16) in variants.items():
            times[key].append(train_steps(model, opt, x, y, steps, bf16) / steps)

    tokens = BATCH_SIZE * cfg.block_size
    ref = times[("reference", "fp32")]
    rows = []
    for (impl, dtype), dts in times.items():
        best, median = min(dts), statistics.median(dts)
        rows.append({
            "config": name, "model": impl, "dtype": dtype, "params": ours.num_params(non_embedding=False),
            "s_per_step_best": best, "s_per_step_median": median, "s_per_step_rounds": dts,
            "tokens_per_s": tokens / best,
            "mfu": ours.estimate_mfu(BATCH_SIZE, best, peaks[dtype]),  # same FLOPs for both models
            "speedup_vs_reference": min(ref) / best,
            "speedup_vs_reference_median": statistics.median(ref) / median,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = [row for name, cfg in CONFIGS.items()
            for row in bench_config(name, cfg, peaks, args.warmup, args.steps, args.rounds)]
    speedups = {r["config"]: r["speedup_vs_reference"] for r in rows if r["model"] == "ours" and r["dtype"] == "fp32"}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg_1m": os.getloadavg()[0]},
        "settings": {"batch_size": BATCH_SIZE, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                     "configs": {name: vars(cfg) for name, cfg in CONFIGS.items()}},
        "peak_flops": peaks,
        "runs": rows,
        "target": {"speedup_vs_reference": TARGET_SPEEDUP},
        "meets_target": {name: s >= TARGET_SPEEDUP for name, s in speedups.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_path, RESULTS)

    print(f"matmul peak ({args.threads} threads, 2048^2): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    print("| config | model | dtype | params | ms/step best | ms/step median | tokens/s (best) | MFU (best) "
          "| vs reference fp32 (best / median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['model']} | {r['dtype']} | {r['params'] / 1e6:.2f}M "
              f"| {r['s_per_step_best'] * 1e3:.1f} | {r['s_per_step_median'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} "
              f"| {r['mfu']:.1%} | {r['speedup_vs_reference']:.2f}x / {r['speedup_vs_reference_median']:.2f}x |")


if __name__ == "__main__":
    main()
