"""Export a GPT (RoPE + RMSNorm + SwiGLU, no biases needed) to the Hugging Face Llama layout, and back.

The folder it writes (config.json, model.safetensors, generation_config.json and, given our
tokenizer.json, tokenizer files) loads with `transformers.LlamaForCausalLM.from_pretrained`, and
so with the tools that read Llama checkpoints. The mapping, per layer:

    ours                        Hugging Face Llama
    wte                         model.embed_tokens        (lm_head tied: not stored)
    ln_1 / ln_2 / ln_f          input_layernorm / post_attention_layernorm / model.norm
    attn.c_attn  [q | k | v]    self_attn.q_proj, k_proj, v_proj   (q, k rows permuted, below)
    attn.c_proj                 self_attn.o_proj
    mlp.c_fc / c_up / c_proj    mlp.gate_proj / up_proj / down_proj  (silu(gate) * up)

RoPE: ours rotates adjacent feature pairs (2j, 2j+1) of each head (RoFormer, Meta's Llama code);
transformers' Llama rotates (j, j + D/2) (`rotate_half`). Both use frequency theta^(-2j/D) for
pair j, so reordering each head's q and k output rows as [0, 2, 4, .., D-2, 1, 3, .., D-1]
gives the same rotation, and the same q.k (both get the same permutation). v is untouched.

    python -m models.llama_export data/pretrain exports/llama   # our model folder -> Llama folder
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from forgeline.chat import EOT, PAD
from models.gpt import GPT, GPTConfig

EOS_NAMES = ("<|endoftext|>", "<|end|>")  # tokens that end a document / an assistant turn


def _rope_perm(head_dim: int) -> torch.Tensor:
    """Feature order that turns adjacent RoPE pairs into rotate-half pairs, per head."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _permute_heads(w: torch.Tensor, n_heads: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the output rows of w (n_heads * D, ...) within each head by perm (D,)."""
    return w.unflatten(0, (n_heads, -1))[:, perm].flatten(0, 1).contiguous()


def check_exportable(cfg: GPTConfig) -> None:
    if (cfg.pos_encoding, cfg.norm, cfg.mlp) != ("rope", "rmsnorm", "swiglu"):
        raise ValueError("Llama export needs pos_encoding='rope', norm='rmsnorm', mlp='swiglu'; got "
                         f"{cfg.pos_encoding!r}, {cfg.norm!r}, {cfg.mlp!r}")


def llama_config(cfg: GPTConfig, special: dict[str, int] | None = None) -> dict:
    """config.json for transformers' LlamaConfig; `special`: token name -> id (for bos/eos/pad)."""
    check_exportable(cfg)
    special = special or {}
    eos = [special[n] for n in EOS_NAMES if n in special]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": 1e-5,  # models.gpt.make_norm's eps
        # transformers >= 5 reads rope_parameters; older readers (and llama.cpp, vLLM) read rope_theta
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_weights, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
        "bos_token_id": special.get("<|endoftext|>"), "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": special.get("<|pad|>"),
    }


def to_llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters under Llama names, q/k rows permuted for rotate-half RoPE; fp32 copies."""
    cfg = model.config
    check_exportable(cfg)
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    perm = _rope_perm(D)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ln_2.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[src + f"attn.c_attn.{kind}"].split([H * D, Hkv * D, Hkv * D], dim=0)
            out[dst + f"self_attn.q_proj.{kind}"] = _permute_heads(q, H, perm)
            out[dst + f"self_attn.k_proj.{kind}"] = _permute_heads(k, Hkv, perm)
            out[dst + f"self_attn.v_proj.{kind}"] = v.contiguous()
            out[dst + f"self_attn.o_proj.{kind}"] = sd[src + f"attn.c_proj.{kind}"]
            out[dst + f"mlp.gate_proj.{kind}"] = sd[src + f"mlp.c_fc.{kind}"]
            out[dst + f"mlp.up_proj.{kind}"] = sd[src + f"mlp.c_up.{kind}"]
            out[dst + f"mlp.down_proj.{kind}"] = sd[src + f"mlp.c_proj.{kind}"]
    return out


def from_llama_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> GPT:
    """The inverse of `to_llama_state_dict`: a GPT with these Llama-named weights."""
    check_exportable(cfg)
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    inv = torch.argsort(_rope_perm(D))
    ours = {"wte.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"],
            "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(cfg.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        ours[dst + "ln_1.weight"] = sd[src + "input_layernorm.weight"]
        ours[dst + "ln_2.weight"] = sd[src + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            ours[dst + f"attn.c_attn.{kind}"] = torch.cat((
                _permute_heads(sd[src + f"self_attn.q_proj.{kind}"], H, inv),
                _permute_heads(sd[src + f"self_attn.k_proj.{kind}"], Hkv, inv),
                sd[src + f"self_attn.v_proj.{kind}"]))
            ours[dst + f"attn.c_proj.{kind}"] = sd[src + f"self_attn.o_proj.{kind}"]
            ours[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.gate_proj.{kind}"]
            ours[dst + f"mlp.c_up.{kind}"] = sd[src + f"mlp.up_proj.{kind}"]
            ours[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.down_proj.{kind}"]
    model = GPT(cfg)
    model.load_state_dict(ours, strict=True)
    return model.eval()


def special_tokens(tokenizer_file: str | Path) -> dict[str, int]:
    """{content: id} of the added (special) tokens in a tokenizers tokenizer.json."""
    data = json.loads(Path(tokenizer_file).read_text())
    return {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}


def export_llama(model: GPT, out_dir: str | Path, tokenizer_file: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face Llama folder; with our tokenizer.json, tokenizer files too."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = special_tokens(tokenizer_file) if tokenizer_file else {}
    config = llama_config(model.config, special)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_llama_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer_file:
        shutil.copy2(tokenizer_file, out / "tokenizer.json")
        named = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD}
        named = {k: v for k, v in named.items() if v in special}
        (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2))
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
            "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
            **named}, indent=2))
    return out


def import_llama(path: str | Path) -> GPT:
    """A Llama folder written by `export_llama` back into a GPT."""
    from safetensors.torch import load_file

    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    rope = c.get("rope_parameters") or {}
    cfg = GPTConfig(vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
                    n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                    n_kv_heads=c["num_key_value_heads"], n_embd=c["hidden_size"],
                    bias=c.get("attention_bias", False), tie_weights=c.get("tie_word_embeddings", True),
                    rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    if cfg.mlp_hidden != c["intermediate_size"] or cfg.head_dim != c.get("head_dim", cfg.head_dim):
        raise ValueError(f"{path}: intermediate_size/head_dim do not follow GPTConfig's rules")
    return from_llama_state_dict(load_file(str(path / "model.safetensors")), cfg)


def main(argv: list[str] | None = None) -> None:
    from forgeline.checkpoint import load_model_folder  # the CLI reads our model folder; the converters don't

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python -m models.llama_export MODEL_DIR OUT_DIR")
    src, dst = Path(args[0]), Path(args[1])
    tok = src / "tokenizer.json"
    out = export_llama(load_model_folder(src), dst, tok if tok.exists() else None)
    print(f"llama_export: {src} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


if __name__ == "__main__":
    main()
