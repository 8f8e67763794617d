"""models/llama_export.py: a GPT exported to the Llama layout loads in transformers and computes the same
logits; greedy and beam outputs of models/sampling.py equal transformers' `generate` on those weights."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.llama_export import export_llama, import_llama, llama_config, to_llama_state_dict
from models.sampling import GenerationConfig, beam_search, generate

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "gqa-tied": dict(n_kv_heads=2, rope_theta=5000.0),
    "mha-untied-bias": dict(n_kv_heads=None, tie_weights=False, bias=True),
}


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():  # wide weights: peaked, varied next-token distributions
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.uniform_(0.5, 1.5)  # norm gains: not all ones, so a swapped norm would show
    return model


def load_hf(folder: Path, attn: str = "eager"):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for name, kw in VARIANTS.items():
        model = tiny(**kw)
        folder = export_llama(model, tmp_path_factory.mktemp(name))
        out[name] = (model, folder, load_hf(folder))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_transformers(exported, variant, attn):
    model, folder, _ = exported[variant]
    hf = load_hf(folder, attn)
    idx = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def hf_new_tokens(out: torch.Tensor, prompt_len: int, stops: tuple[int, ...]) -> list[list[int]]:
    """transformers pads finished rows: cut each row after its first stop token."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_equals_transformers_generate(exported, variant):
    model, _, hf = exported[variant]
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(6, 64, (4, 7), generator=gen)
    greedy = generate(model, prompts.tolist(), GenerationConfig(max_new_tokens=16, temperature=0))
    for stops in ((), (greedy[0][5], greedy[2][3])):
        cfg = GenerationConfig(max_new_tokens=16, temperature=0, stop_tokens=stops)
        ours = generate(model, prompts.tolist(), cfg)
        theirs = hf.generate(prompts, max_new_tokens=16, do_sample=False, num_beams=1, pad_token_id=0,
                             eos_token_id=list(stops) or None)
        assert ours == hf_new_tokens(theirs, 7, stops)


def test_ragged_greedy_equals_transformers_left_padded(exported):
    model, _, hf = exported["gqa-tied"]
    prompts = [[5, 9, 11, 3, 7, 8, 9], [4], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=12, temperature=0))
    assert ours == theirs[:, width:].tolist()


FAST = dict(seeds=[0], stops=["three"], length_penalties=[1.0, 0.0, 2.0])
FULL = dict(seeds=[0, 1, 2], stops=["one", "three"], length_penalties=[1.0, 0.0, 2.0, -0.5])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("grid", [FAST, pytest.param(FULL, marks=pytest.mark.slow)], ids=["fast", "full"])
def test_beam_search_equals_transformers_generate(exported, variant, grid):
    model, _, hf = exported[variant]
    stopped_early = 0
    for seed in grid["seeds"]:
        prompt = torch.randint(6, 64, (1, 6), generator=torch.Generator().manual_seed(seed))
        greedy = generate(model, prompt.tolist(), GenerationConfig(max_new_tokens=10, temperature=0))[0]
        # stop tokens taken from the greedy path, so beams finish at different lengths and the
        # length penalty and early stopping rules decide which finished beams win
        stop_sets = {"one": (greedy[2],), "three": tuple(greedy[1:4])}
        for stops, lp, early in itertools.product([stop_sets[s] for s in grid["stops"]], grid["length_penalties"],
                                                  [False, True, "never"]):
            cfg = GenerationConfig(max_new_tokens=10, num_beams=4, num_return_sequences=3, length_penalty=lp,
                                   early_stopping=early, stop_tokens=stops)
            ours = beam_search(model, prompt.tolist(), cfg)[0]
            theirs = hf.generate(prompt, max_new_tokens=10, num_beams=4, num_return_sequences=3, do_sample=False,
                                 length_penalty=lp, early_stopping=early, eos_token_id=list(stops), pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
            assert [h.tokens for h in ours] == hf_new_tokens(theirs.sequences, 6, stops), (seed, stops, lp, early)
            assert [h.score for h in ours] == pytest.approx(theirs.sequences_scores.tolist(), abs=1e-4)
            stopped_early += sum(len(h.tokens) < 10 for h in ours)
    assert stopped_early > 0  # the stop tokens did end beams before max_new_tokens


def test_round_trip_and_state_dict_names(exported):
    model, folder, _ = exported["mha-untied-bias"]
    back = import_llama(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    sd = to_llama_state_dict(exported["gqa-tied"][0])
    assert "lm_head.weight" not in sd  # tied: transformers ties it back to embed_tokens
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)


def test_tokenizer_files_load_in_transformers(tmp_path):
    from tasks.tokenizer import train_bpe

    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
             "must be in want of a wife."] * 20
    tok = train_bpe(texts, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = tiny(vocab_size=tok.get_vocab_size())
    folder = export_llama(model, tmp_path / "llama", tmp_path / "tokenizer.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "a single man in want of a wife"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.pad_token_id == tok.token_to_id("<|pad|>") == 0
    assert hf_tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.eos_token_id == [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|end|>")]


def test_only_the_llama_architecture_exports():
    for kw in (dict(pos_encoding="learned"), dict(norm="layernorm"), dict(mlp="gelu")):
        with pytest.raises(ValueError, match="Llama export"):
            llama_config(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, **kw))
