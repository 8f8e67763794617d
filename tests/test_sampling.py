"""models/sampling.py: the properties each decoding method promises, on tiny random GPTs."""
from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import models.sampling
from models.gpt import GPT, GPTConfig
from models.sampling import (GenerationConfig, apply_repetition_penalty, beam_search, generate, sample_rows,
                             top_k_filter, top_p_filter)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 11, 3, 7, 8, 9], [4], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


def tiny(seed: int = 0, vocab_size: int = 64, **kw) -> GPT:
    """A random GPT with weights wide enough (std 0.3) that its next-token distributions are peaked
    and varied, not the near-uniform ones of std-0.02 init."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"vocab_size": vocab_size, "block_size": 32, "n_layer": 2, "n_head": 4,
                       "n_kv_heads": 2, "n_embd": 32, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny()


def next_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0][0, -1].float()


def test_sampling_module_is_this_repo():
    assert Path(models.sampling.__file__).resolve().is_relative_to(ROOT)


# ----------------------------------------------------------------------------- filters


def test_top_k_never_samples_outside_the_k_most_likely(model):
    prompt, k = PROMPTS[0], 5
    allowed = set(torch.topk(next_logits(model, prompt), k).indices.tolist())
    cfg = GenerationConfig(max_new_tokens=1, temperature=1.5, top_k=k, num_return_sequences=2000, seed=0)
    drawn = {t[0] for t in generate(model, [prompt], cfg)}
    assert drawn <= allowed
    assert len(drawn) == k  # at temperature 1.5 all five turn up in 2000 draws


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p):
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(3)) * 2
    kept = top_p_filter(logits, p) > float("-inf")
    probs = logits.softmax(-1)
    for row in range(16):
        # brute force: add tokens most likely first until the mass reaches p
        order = probs[row].argsort(descending=True)
        mass, want = 0.0, set()
        for tok in order.tolist():
            want.add(tok)
            mass += probs[row, tok].item()
            if mass >= p:
                break
        assert set(kept[row].nonzero().flatten().tolist()) == want


def test_top_p_samples_only_from_the_nucleus(model):
    prompt, p = PROMPTS[2], 0.6
    probs = next_logits(model, prompt).softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[:int((probs[order].cumsum(0) < p).sum()) + 1].tolist())
    cfg = GenerationConfig(max_new_tokens=1, top_p=p, num_return_sequences=1000, seed=1)
    drawn = {t[0] for t in generate(model, [prompt], cfg)}
    assert drawn <= nucleus and len(nucleus) > 1


def test_top_k_filter_keeps_ties_and_k_zero_is_off():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0]])
    assert (top_k_filter(logits, 2) > float("-inf")).tolist() == [[False, True, True, False, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_sample_rows_draws_each_token_at_its_probability():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    n = 40000
    drawn = sample_rows(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, 3)
    freq = torch.stack([torch.bincount(drawn[:, i], minlength=5) for i in range(3)]).float() / n
    assert (freq[probs == 0] == 0).all()                 # a zero-probability token is never drawn
    assert torch.allclose(freq, probs, atol=0.01)        # 4 standard errors at p = 0.5


@pytest.mark.parametrize("seed", range(2))
def test_temperature_to_zero_equals_greedy(model, seed):
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0))
    cold = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=1e-5, seed=seed))
    assert cold == greedy


def test_repetition_penalty_lowers_repeated_token_probability(model):
    prompt = PROMPTS[0]
    logits = next_logits(model, prompt)[None]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[0, prompt] = True
    base = logits.softmax(-1)[0]
    for penalty in (1.2, 2.0):
        after = apply_repetition_penalty(logits, seen, penalty).softmax(-1)[0]
        assert (after[prompt] < base[prompt]).all()
        unseen = ~seen[0]
        assert (after[unseen] > base[unseen]).all()  # the mass goes to the other tokens
    # through generate: greedy never repeats a prompt token when the penalty is huge
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=8, temperature=0, repetition_penalty=1e6))[0]
    assert not set(out) & set(prompt) and len(set(out)) == len(out)


# ----------------------------------------------------------------------------- greedy, cache, stops, seeds


def test_kv_cache_greedy_matches_full_recompute(model):
    prompt = PROMPTS[0]
    seq = list(prompt)
    for _ in range(10):  # no cache: rerun the whole sequence for every token
        seq.append(int(next_logits(model, seq).argmax()))
    assert generate(model, [prompt], GenerationConfig(max_new_tokens=10, temperature=0))[0] == seq[len(prompt):]


def test_stop_tokens_end_a_row_and_are_kept(model):
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0))
    stop = greedy[0][4]
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0, stop_tokens=(stop,)))
    for full, cut in zip(greedy, out):
        n = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:n]
    assert len(out[0]) == 5


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model):
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=7)
    state = torch.get_rng_state()
    a = generate(model, PROMPTS, cfg)
    assert torch.equal(state, torch.get_rng_state())
    assert generate(model, PROMPTS, cfg) == a
    other = replace(cfg, seed=8)
    assert generate(model, PROMPTS, other) != a


def test_num_return_sequences_are_prompt_major(model):
    out = generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=4, num_return_sequences=3, seed=0))
    assert len(out) == 6
    greedy = generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=4, temperature=0, num_return_sequences=3))
    assert greedy[0] == greedy[1] == greedy[2] and greedy[3] == greedy[4] == greedy[5]


def test_bad_settings_fail_early():
    for bad in (dict(top_p=0), dict(temperature=-1), dict(num_beams=2, num_return_sequences=3),
                dict(early_stopping="sometimes"), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


# ----------------------------------------------------------------------------- batches of different lengths


@pytest.mark.parametrize("kw", [{}, dict(pos_encoding="learned", norm="layernorm", mlp="gelu"),
                                dict(pos_encoding="sincos", n_kv_heads=None)], ids=["rope", "learned", "sincos"])
def test_batched_and_unbatched_generation_agree(kw):
    m = tiny(seed=1, **kw)
    cfg = GenerationConfig(max_new_tokens=10, temperature=0)
    assert generate(m, PROMPTS, cfg) == [generate(m, [p], cfg)[0] for p in PROMPTS]
    beams = GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.7)
    batched = beam_search(m, PROMPTS, beams)
    alone = [beam_search(m, [p], beams)[0] for p in PROMPTS]
    assert [[h.tokens for h in hs] for hs in batched] == [[h.tokens for h in hs] for hs in alone]
    for hs, gs in zip(batched, alone):
        for h, g in zip(hs, gs):
            assert h.score == pytest.approx(g.score, abs=1e-4)


def test_padded_forward_logits_match_each_row_alone(model):
    from models.sampling import _Batch

    batch = _Batch(model, PROMPTS, max_new_tokens=2, pad=0)
    assert batch.ragged
    logits = batch.forward(batch.prompt)
    for row, p in enumerate(PROMPTS):
        torch.testing.assert_close(logits[row], next_logits(model, p), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- beam search


def test_beam_width_one_equals_greedy(model):
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, temperature=0))
    stop = greedy[1][3]
    for stops in ((), (stop,)):
        g = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, temperature=0, stop_tokens=stops))
        b = beam_search(model, PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=1, stop_tokens=stops))
        assert [hs[0].tokens for hs in b] == g


def brute_force(model, prompt: list[int], n_new: int, stop: int, length_penalty: float):
    """Every sequence of up to n_new tokens (ending at the first `stop`, or at n_new), scored as
    beam search scores them: sum of log-probabilities / length ** length_penalty; best first."""
    V = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n_new)))
    idx = torch.cat((torch.tensor(prompt).expand(len(seqs), -1), seqs), dim=1)
    with torch.no_grad():
        logp = model(idx)[0][:, len(prompt) - 1:-1].log_softmax(-1)
    token_logp = logp.gather(-1, seqs[..., None])[..., 0]
    scored = {}
    for seq, lps in zip(seqs.tolist(), token_logp.tolist()):
        n = seq.index(stop) + 1 if stop in seq else n_new
        scored[tuple(seq[:n])] = sum(lps[:n]) / n ** length_penalty
    return sorted(scored.items(), key=lambda kv: -kv[1])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_highest_scoring_sequence(length_penalty):
    # vocab 5, 4 new tokens: 625 sequences to enumerate. A beam as wide as every prefix (125)
    # with early_stopping="never" keeps every candidate, so its n-best is the exact n-best.
    m = tiny(seed=2, vocab_size=5, n_layer=1)
    prompt, stop, n_new = [1, 2, 3], 4, 4
    exact = brute_force(m, prompt, n_new, stop, length_penalty)
    cfg = GenerationConfig(max_new_tokens=n_new, num_beams=125, num_return_sequences=3, stop_tokens=(stop,),
                           length_penalty=length_penalty, early_stopping="never")
    found = beam_search(m, [prompt], cfg)[0]
    assert [tuple(h.tokens) for h in found] == [seq for seq, _ in exact[:3]]
    assert [h.score for h in found] == pytest.approx([s for _, s in exact[:3]], abs=1e-5)
    # and a narrow beam does no worse than greedy, scored the same way
    greedy = tuple(generate(m, [prompt], GenerationConfig(max_new_tokens=n_new, temperature=0, stop_tokens=(stop,)))[0])
    narrow = beam_search(m, [prompt], replace(cfg, num_beams=3))[0][0]
    assert narrow.score >= dict(exact)[greedy] - 1e-6


def test_early_stopping_true_returns_as_soon_as_beams_finish(model):
    greedy = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=12, temperature=0))[0]
    cfg = GenerationConfig(max_new_tokens=12, num_beams=2, num_return_sequences=2, stop_tokens=tuple(greedy[1:4]),
                           early_stopping=True)
    hyps = beam_search(model, [PROMPTS[0]], cfg)[0]
    assert all(h.tokens[-1] in cfg.stop_tokens for h in hyps)
    assert hyps[0].score >= hyps[1].score


# ----------------------------------------------------------------------------- penalties and the step hook


def test_presence_penalty_stops_greedy_repeating_a_token(model):
    plain = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=12, temperature=0))[0]
    assert len(set(plain)) < len(plain)  # the random model repeats itself greedily
    penalised = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=12, temperature=0, presence_penalty=2.0,
                                                               frequency_penalty=2.0))[0]
    assert len(set(penalised)) > len(set(plain))


def test_frequency_and_presence_penalties_subtract_counts():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    from models.sampling import apply_frequency_presence
    assert apply_frequency_presence(logits, counts, 0.5, 1.0).tolist() == [[0.0, -1.5, -2.5, 0.0]]
    with pytest.raises(ValueError, match="frequency_penalty"):
        GenerationConfig(frequency_penalty=2.5)


def test_on_step_sees_raw_logits_and_ends_rows(model):
    cfg = GenerationConfig(max_new_tokens=10, temperature=0)   # greedy: rows independent of each other
    full = generate(model, PROMPTS[:3], cfg)
    seen: list[tuple[list[int], list[int]]] = []

    def hook(rows, tokens, logits):
        assert logits.shape == (len(rows), model.config.vocab_size)
        seen.append((rows.tolist(), tokens.tolist()))
        return [1] if len(seen) == 4 else None      # row 1 ends after its 4th token

    cut = generate(model, PROMPTS[:3], cfg, on_step=hook)
    assert cut[0] == full[0] and cut[2] == full[2] and cut[1] == full[1][:4]
    assert [r for r, _ in seen][4] == [0, 2]        # the ended row left the batch
    assert [tok[0] for _, tok in seen] == full[0]   # the hook saw every token as it was drawn
