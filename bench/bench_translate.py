"""Translation throughput: sentences/s at batch 1 and batched, greedy and beam search, with the decoder's
KV cache against recomputing the whole decoder over the prefix at every step, in the same run.

The model is the pipeline's (data/mt_train); the sentences are the first `--sentences` English
sources of the held-out split (en->fr). Both decoders are checked to give the same translations
before timing; rounds alternate between them (cache, no cache, cache, ...) so load drifts hit both.

    flock /tmp/forgeline-heavy.lock .venv/bin/python -m bench.bench_translate [--sentences 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_model

from bench import machine, write_result
from forgeline.chat import load_tokenizer
from models.seq2seq import Seq2Seq, Seq2SeqConfig, translate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="data/mt_train")
    ap.add_argument("--pairs", default="data/mt_data/pairs.parquet")
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = machine()

    folder = Path(args.model)
    model = Seq2Seq(Seq2SeqConfig(**json.loads((folder / "config.json").read_text())))
    load_model(model, str(folder / "model.safetensors"))
    model.eval()
    tok = load_tokenizer(folder / "tokenizer.json")
    pairs = pd.read_parquet(args.pairs)
    src = pairs[(pairs["split"] == "test") & (pairs["tgt_lang"] == "fr")]["src"].tolist()[:args.sentences]

    cases = [("greedy", 1, 1), ("greedy", 1, args.batch), ("beam", args.beam, 1), ("beam", args.beam, args.batch)]
    rows = []
    for mode, width, batch in cases:
        # the same translations either way, or the timing compares different work
        outs = {c: translate(model, tok, src, "fr", width, 0.6, batch, use_cache=c)[0] for c in (True, False)}
        assert outs[True] == outs[False], f"{mode} batch {batch}: cache and no-cache decoders disagree"
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for cache in (True, False):
                t0 = time.perf_counter()
                translate(model, tok, src, "fr", width, 0.6, batch, use_cache=cache)
                times[cache].append(time.perf_counter() - t0)
        best = {c: len(src) / min(t) for c, t in times.items()}
        median = {c: len(src) / statistics.median(t) for c, t in times.items()}
        rows.append({"decoding": mode if width == 1 else f"beam-{width}", "batch": batch,
                     "kv_cache_sent_per_s": round(best[True], 2), "recompute_sent_per_s": round(best[False], 2),
                     "speedup_best": round(best[True] / best[False], 2),
                     "speedup_median": round(median[True] / median[False], 2)})
    print(f"{len(src)} en->fr sentences, {args.threads} thread(s), best of {args.rounds} rounds\n")
    print("| decoding | batch | KV cache (sent/s) | recompute (sent/s) | speedup best / median |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['decoding']} | {r['batch']} | {r['kv_cache_sent_per_s']} | {r['recompute_sent_per_s']} | "
              f"{r['speedup_best']}x / {r['speedup_median']}x |")
    out = write_result("translate", {"model": str(folder), "sentences": len(src), "threads": args.threads,
                                     "rounds": args.rounds, "params": model.num_params(), "rows": rows}, started)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
