"""Export a GPT with GPT-2's parts (learned positions, LayerNorm, tanh-GELU MLP) to the Hugging Face
GPT-2 layout: the counterpart of models/llama_export.py for models that are not RoPE + RMSNorm + SwiGLU.

The folder it writes (config.json, model.safetensors, generation_config.json) loads with
`transformers.GPT2LMHeadModel.from_pretrained`. The mapping, per layer (GPT-2's Conv1D stores
weights as (in, out): ours transposed):

    ours                        Hugging Face GPT-2
    wte / wpe                   transformer.wte / transformer.wpe   (lm_head tied: not stored)
    ln_1 / ln_2 / ln_f          transformer.h.i.ln_1 / ln_2 / transformer.ln_f
    attn.c_attn  [q | k | v]    transformer.h.i.attn.c_attn   (the same [q | k | v] column order)
    attn.c_proj                 transformer.h.i.attn.c_proj
    mlp.c_fc / c_proj           transformer.h.i.mlp.c_fc / c_proj   (activation gelu_new = tanh GELU)

GPT-2 always has biases; a model trained with bias=False exports zero biases (the same function).
Grouped-query attention and untied heads have no GPT-2 form and are refused.

    python -m models.gpt2_export data/compose_finetune exports/gpt2
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from models.gpt import GPT, GPTConfig


def check_exportable(cfg: GPTConfig) -> None:
    parts = (cfg.pos_encoding, cfg.norm, cfg.mlp, cfg.kv_heads == cfg.n_head, cfg.tie_weights)
    if parts != ("learned", "layernorm", "gelu", True, True):
        raise ValueError("GPT-2 export needs pos_encoding='learned', norm='layernorm', mlp='gelu', "
                         f"n_kv_heads = n_head and tied weights; got {parts}")


def gpt2_config(cfg: GPTConfig, eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """config.json for transformers' GPT2Config."""
    check_exportable(cfg)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "scale_attn_weights": True, "use_cache": True, "dtype": "float32",
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}


def to_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters under GPT-2 names, Linear weights transposed to Conv1D's (in, out); fp32 copies."""
    cfg = model.config
    check_exportable(cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def bias(name: str, size: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(size))

    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": bias("ln_f.bias", cfg.n_embd)}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[dst + f"{ln}.weight"] = sd[src + f"{ln}.weight"]
            out[dst + f"{ln}.bias"] = bias(src + f"{ln}.bias", cfg.n_embd)
        for ours, theirs in (("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                             ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
            w = sd[src + f"{ours}.weight"]
            out[dst + f"{theirs}.weight"] = w.t().contiguous()
            out[dst + f"{theirs}.bias"] = bias(src + f"{ours}.bias", w.size(0))
    return out


def export_gpt2(model: GPT, out_dir: str | Path, eos_token_id: int | None = None,
                pad_token_id: int | None = None) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = gpt2_config(model.config, eos_token_id, pad_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_gpt2_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    from forgeline.checkpoint import load_model_folder  # the CLI reads our model folder; the converter doesn't
    from forgeline.chat import EOT, PAD
    from models.llama_export import special_tokens

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python -m models.gpt2_export MODEL_DIR OUT_DIR")
    src, dst = Path(args[0]), Path(args[1])
    special = special_tokens(src / "tokenizer.json")
    out = export_gpt2(load_model_folder(src), dst, special.get(EOT), special.get(PAD))
    print(f"gpt2_export: {src} -> {out}")


if __name__ == "__main__":
    main()
