"""Benchmark decoding on CPU: models/sampling.py against transformers' `generate` on the same weights.

One run, one process: a random GPT (`tiny` preset: RoPE, RMSNorm, SwiGLU) is exported with
models/llama_export.py and loaded by transformers.LlamaForCausalLM (fp32, sdpa attention). For
batch 1 and batch 8 (prompts of PROMPT_LEN tokens, no stop tokens, so every run makes the same
number of tokens), it times
  - greedy decoding with a KV cache: generated tokens/s (prefill included), and
  - beam search, 4 beams, length_penalty 1: latency of one call,
checking first that both sides produce identical tokens. Variants are timed in interleaved rounds,
so background load on the shared CPU hits them alike; the fastest round is the headline (the
least-disturbed measurement, as timeit does), the median is reported beside it. Prints a markdown
table and writes bench/results/decode.json. Target: ours >= 1.0x transformers on every row.

    .venv/bin/python -m bench.bench_decode [--rounds 10] [--threads 1] [--preset tiny]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import asdict

import torch

from bench import machine, write_result
from models.gpt import GPT, GPTConfig
from models.llama_export import export_llama
from models.sampling import GenerationConfig, beam_search, generate

TARGET_SPEEDUP = 1.0
PROMPT_LEN = 32
GREEDY_NEW = 96    # tokens generated per greedy call (prompt + new = block_size 128)
BEAM_NEW = 32      # tokens per beam search call
NUM_BEAMS = 4


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = machine()

    import transformers

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset)
    ours = GPT(cfg).eval()
    folder = export_llama(ours, tempfile.mkdtemp(prefix="bench-decode-"))
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()

    rows = []
    for B in args.batches:
        prompts = torch.randint(6, cfg.vocab_size, (B, PROMPT_LEN), generator=torch.Generator().manual_seed(B))
        plist = prompts.tolist()
        greedy_cfg = GenerationConfig(max_new_tokens=GREEDY_NEW, temperature=0)
        beam_cfg = GenerationConfig(max_new_tokens=BEAM_NEW, num_beams=NUM_BEAMS)
        hf_greedy = dict(max_new_tokens=GREEDY_NEW, min_new_tokens=GREEDY_NEW, do_sample=False, num_beams=1,
                         pad_token_id=0)
        hf_beam = dict(max_new_tokens=BEAM_NEW, min_new_tokens=BEAM_NEW, do_sample=False, num_beams=NUM_BEAMS,
                       length_penalty=1.0, early_stopping=False, pad_token_id=0)
        cases = {
            "greedy": (lambda: generate(ours, plist, greedy_cfg),
                       lambda: hf.generate(prompts, **hf_greedy)),
            f"beam-{NUM_BEAMS}": (lambda: beam_search(ours, plist, beam_cfg),
                                  lambda: hf.generate(prompts, **hf_beam)),
        }
        # same tokens on both sides before any timing
        with torch.no_grad():
            assert cases["greedy"][0]() == cases["greedy"][1]()[:, PROMPT_LEN:].tolist(), "greedy outputs differ"
            assert [h[0].tokens for h in cases[f"beam-{NUM_BEAMS}"][0]()] == \
                cases[f"beam-{NUM_BEAMS}"][1]()[:, PROMPT_LEN:].tolist(), "beam outputs differ"
        for name, (run_ours, run_hf) in cases.items():
            times = {"ours": [], "transformers": []}
            with torch.no_grad():
                for _ in range(args.rounds):  # interleaved: ours, theirs, ours, theirs, ...
                    times["ours"].append(timed(run_ours))
                    times["transformers"].append(timed(run_hf))
            new = GREEDY_NEW if name == "greedy" else BEAM_NEW
            best = {k: min(v) for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "case": name, "batch": B, "new_tokens": new,
                "ours_s": best["ours"], "transformers_s": best["transformers"],
                "ours_median_s": med["ours"], "transformers_median_s": med["transformers"],
                "ours_tokens_per_s": B * new / best["ours"], "transformers_tokens_per_s": B * new / best["transformers"],
                "speedup": best["transformers"] / best["ours"], "speedup_median": med["transformers"] / med["ours"],
            })

    result = {
        "threads": torch.get_num_threads(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {"preset": args.preset, "config": asdict(cfg), "prompt_len": PROMPT_LEN,
                     "greedy_new_tokens": GREEDY_NEW, "beam_new_tokens": BEAM_NEW, "num_beams": NUM_BEAMS,
                     "rounds": args.rounds, "hf_attention": "sdpa", "dtype": "float32"},
        "target_speedup": TARGET_SPEEDUP,
        "rows": rows,
        "meets_target": all(r["speedup"] >= TARGET_SPEEDUP for r in rows),
    }
    print(f"| case | batch | ours | transformers | speedup (best / median) |\n|---|---|---|---|---|")
    for r in rows:
        unit = (f"{r['ours_tokens_per_s']:,.0f} tok/s", f"{r['transformers_tokens_per_s']:,.0f} tok/s") \
            if r["case"] == "greedy" else (f"{r['ours_s'] * 1e3:,.0f} ms", f"{r['transformers_s'] * 1e3:,.0f} ms")
        print(f"| {r['case']} | {r['batch']} | {unit[0]} | {unit[1]} | {r['speedup']:.2f}x / {r['speedup_median']:.2f}x |")
    write_result("decode", result, started)
    return result


if __name__ == "__main__":
    main()
