"""models/gpt.py: causality, KV-cache decoding, training, tying, GQA, presets, positions, generate."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

import models.gpt
from bench.reference_gpt import NanoGPT, load_forgeline_weights, nanogpt_config
from models.gpt import GPT, PRESETS, GPTConfig, KVCache

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "raw" / "austen" / "persuasion.txt.gz"  # the shipped sample, in git
POS = ["rope", "sincos", "learned"]


def small(pos_encoding="rope", **kw) -> GPTConfig:
    kw = {"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32,
          "pos_encoding": pos_encoding, **kw}
    return GPTConfig(**kw)


def model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


# a spread of the other options, so each module variant meets the cache and causality checks
VARIANTS = [dict(n_kv_heads=None), dict(n_kv_heads=2),
            dict(n_kv_heads=1, norm="layernorm", mlp="gelu", bias=True, tie_weights=False),
            dict(n_kv_heads=2, mlp="relu", norm="layernorm")]


def test_models_package_is_this_repo():
    assert Path(models.gpt.__file__).resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_future_tokens_never_change_past_logits(pos, variant):
    m = model(small(pos, **variant))
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 64
        a, _ = m(idx)
        b, _ = m(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
        assert not torch.allclose(a[:, t], b[:, t])  # and the changed token itself does matter


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("chunks", [[1] * 24, [5, 1, 7, 1, 10], [24]], ids=["by-token", "chunked", "one-pass"])
def test_kv_cache_decoding_matches_full_recompute(pos, variant, chunks):
    m = model(small(pos, **variant))
    idx = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(2))
    full, _ = m(idx)
    cache, pieces, start = KVCache(m.config.n_layer, max_len=24), [], 0
    for n in chunks:
        logits, _ = m(idx[:, start:start + n], kv_cache=cache)
        pieces.append(logits)
        start += n
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_overflow_raises():
    m = model(small())
    cache = KVCache(m.config.n_layer, max_len=8)
    m(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 8"):
        m(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


@pytest.fixture(scope="module")
def austen_bytes() -> torch.Tensor:
    """32 KB of Persuasion as byte tokens (vocab 256), past the Gutenberg header."""
    with gzip.open(CORPUS) as f:
        text = f.read()[20_000:52_768]
    return torch.tensor(list(text), dtype=torch.long)


@pytest.mark.parametrize("pos", POS)
def test_each_position_encoding_trains(pos, austen_bytes):
    data, T = austen_bytes, 64
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=256, block_size=T, n_layer=2, n_head=4, n_embd=64, pos_encoding=pos))
    opt = m.configure_optimizers(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        ix = torch.randint(0, len(data) - T - 1, (16,), generator=gen)
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + T + 1] for i in ix])
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the best a model that ignores context can do is the byte distribution's entropy (nats)
    p = torch.bincount(data, minlength=256).float() / len(data)
    unigram = -(p[p > 0] * p[p > 0].log()).sum().item()
    final = sum(losses[-10:]) / 10
    assert losses[0] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.2)
    assert final < unigram - 0.25, (final, unigram)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_chunked_loss_matches_cross_entropy_on_full_logits(tie_weights, monkeypatch):
    monkeypatch.setattr(models.gpt, "LOSS_CHUNK", 7)  # several chunks and a ragged last one
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    targets[0, :10] = -100  # e.g. an SFT prompt: no loss there
    ours, full = model(small(tie_weights=tie_weights)), model(small(tie_weights=tie_weights))
    logits, _ = full(idx)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected.backward()
    none, loss = ours(idx, targets)
    loss.backward()
    assert none is None
    torch.testing.assert_close(loss, expected)
    for (name, a), b in zip(ours.named_parameters(), full.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    with torch.no_grad():  # evaluation takes the gradient-free path
        torch.testing.assert_close(ours(idx, targets)[1], expected)


def test_weight_tying_ties():
    m = GPT(small())
    assert m.lm_head.weight is m.wte.weight
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))  # tied: once
    _, loss = m(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()
    opt.step()
    assert torch.equal(m.lm_head.weight, m.wte.weight)
    untied = GPT(small(tie_weights=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params(non_embedding=False) - m.num_params(non_embedding=False) == 64 * 32


def test_gqa_shrinks_kv_projections():
    mha, gqa = GPT(small(n_kv_heads=None)), GPT(small(n_kv_heads=1))
    D, C, L = 8, 32, 2  # head_dim, n_embd, n_layer
    assert gqa.blocks[0].attn.c_attn.weight.shape == ((4 + 2 * 1) * D, C)
    assert mha.num_params() - gqa.num_params() == L * 2 * (4 - 1) * D * C  # k and v, 3 heads fewer


def test_optimizer_decays_only_matrices():
    m = GPT(small(bias=True, norm="layernorm"))
    decay, no_decay = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95)).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["params"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_construct(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = GPT(GPTConfig.from_preset(name))
    assert m.num_params() > 0


def test_gpt2_preset_has_gpt2_parameter_count():
    # GPT-2 small (HF GPT2LMHeadModel, vocab 50257): 124,439,808 parameters
    with torch.device("meta"):
        m = GPT(GPTConfig.from_preset("gpt2-124m", vocab_size=50257))
    assert m.num_params(non_embedding=False) == 124_439_808
    with pytest.raises(TypeError):
        GPTConfig.from_preset("tiny", n_layers=3)  # a typo is an error, not a silent default


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="n_kv_heads"):
        small(n_kv_heads=3)
    with pytest.raises(ValueError, match="pos_encoding"):
        small("alibi")


def test_learned_positions_stop_at_block_size():
    m = model(small("learned"))
    m(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache(2, max_len=40)
    m(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        m.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=3)


@pytest.mark.parametrize("pos", ["rope", "sincos"])
def test_rope_and_sincos_run_past_block_size(pos):
    m = model(small(pos))
    idx = torch.randint(0, 64, (2, 64))  # 2 x block_size
    logits, _ = m(idx)
    assert logits.shape == (2, 64, 64) and torch.isfinite(logits).all()
    torch.testing.assert_close(m(idx[:, :32])[0], logits[:, :32])  # still causal out there
    assert m.generate(idx[:, :40], max_new_tokens=30, top_k=1).shape == (2, 70)


@pytest.mark.parametrize("pos", POS)
def test_greedy_generate_is_argmax_decoding(pos):
    m = model(small(pos, n_kv_heads=2))
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = prompt
    for _ in range(20):  # no cache: recompute everything for each new token
        logits, _ = m(expected)
        expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    torch.manual_seed(0)
    a = m.generate(prompt, max_new_tokens=20, top_k=1)
    torch.manual_seed(1)
    b = m.generate(prompt, max_new_tokens=20, top_k=1)
    c = m.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert torch.equal(a, expected) and torch.equal(b, expected) and torch.equal(c, expected)


def test_generate_samples_within_top_k():
    m = model(small())
    prompt = torch.zeros(4, 1, dtype=torch.long)
    out = m.generate(prompt, max_new_tokens=1, temperature=1.0, top_k=3)
    allowed = m(prompt)[0][:, -1].topk(3).indices
    assert (allowed == out[:, 1:]).any(dim=1).all()


def test_gradient_checkpointing_gives_same_gradients():
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    grads = []
    for ckpt in (False, True):
        m = model(small(dropout=0.1)).train()
        m.gradient_checkpointing = ckpt
        torch.manual_seed(5)
        m(idx, targets)[1].backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_reference_model_computes_the_same_function(bias):
    """bench/reference_gpt.py (nanoGPT's model) and ours at nanoGPT's architecture must be the same
    function, or the benchmark compares nothing. nanoGPT's GELU is the exact one and ours GPT-2's
    tanh approximation: the reference gets ours here, so any other difference shows."""
    cfg = small("learned", norm="layernorm", mlp="gelu", bias=bias)
    ours = model(cfg)
    ref = load_forgeline_weights(NanoGPT(nanogpt_config(cfg)), ours).eval()
    for block in ref.transformer.h:
        block.mlp.gelu = torch.nn.GELU(approximate="tanh")
    assert sum(p.numel() for p in ref.parameters()) == ours.num_params(non_embedding=False)
    idx, targets = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    (a, _), (_, la) = ours(idx), ours(idx, targets)
    b, lb = ref(idx, targets)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[:, -1:], ref(idx)[0], rtol=1e-4, atol=1e-5)  # no targets: last position only
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    theirs = dict(ref.named_parameters())  # the tied matrix is listed once: wte in both
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs["transformer." + name.replace("blocks.", "h.")].grad,
                                   rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not nanoGPT"):
        nanogpt_config(small("rope"))



def test_attention_with_dropout_is_causal_sdpa_when_nothing_is_dropped():
    """The training path for dropout > 0 (models.gpt.attention_with_dropout) must be SDPA's causal
    attention with the dropout mask applied: at p = 0 the mask keeps everything."""
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = models.gpt.attention_with_dropout(q, k, v, 0.0)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, w)


def test_dropout_drops_p_keeps_the_mean_and_follows_the_seed():
    drop = models.gpt.Dropout(0.2).train()
    x = torch.ones(256, 1024)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop(x))                       # torch's generator drives the mask
    assert not torch.equal(a, drop(x))
    assert abs((a == 0).float().mean().item() - 0.2) < 0.005
    assert abs(a.mean().item() - 1.0) < 0.01             # kept elements scaled by 1 / (1 - p)
    for lane in (a == 0).float().view(-1, 4).mean(0):    # each 16-bit lane of a 64-bit draw is fair
        assert abs(lane.item() - 0.2) < 0.01
    assert torch.equal(drop.eval()(x), x)


def test_attention_with_dropout_in_query_blocks_is_causal_sdpa(monkeypatch):
    """Query blocks see only the keys up to their last row: blocks of 4 over 18 positions (a ragged
    last block) must still give SDPA's causal attention and its gradients."""
    monkeypatch.setattr(models.gpt, "ATTN_QUERY_BLOCK", 4)
    q, k, v = (torch.randn(2, 3, 18, 8, requires_grad=True) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = models.gpt.attention_with_dropout(q, k, v, 0.0)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got.square().sum(), (q, k, v)),
                    torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, w)
