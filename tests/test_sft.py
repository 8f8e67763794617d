"""SFT: only assistant tokens carry loss, the loop resumes exactly, and accuracy rises on a tiny task.

`make_world` builds a tiny, deterministic alignment world the RLHF tests share: the chat_data
stage restricted to the `count` and `reverse` tasks, a ~300-token byte-level BPE, and a
random-init 2-layer GPT as the "pretrained" base model folder.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_model

from forgeline.chat import collate, encode_chat, load_tokenizer, read_jsonl, render_chat, write_jsonl
from forgeline.checkpoint import latest_checkpoint, load_model_folder
from models.gpt import GPT, GPTConfig
from tasks.chat_data import ChatDataConfig, chat_data
from tasks.sft import SFTConfig, assistant_loss, batch_indices, sft
from tasks.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("count", "reverse")


def make_world(root: Path) -> dict[str, Path]:
    """data/ (chat data of two tasks), base/ (tokenizer + random-init GPT) under `root`."""
    data, base = root / "data", root / "base"
    cfg = ChatDataConfig(pydocs=str(ROOT / "data/raw/pydocs/pydocs_head.txt.gz"),
                         words=str(ROOT / "data/raw/austen/persuasion.txt.gz"), out_dir=str(data),
                         system_prompt="Be brief.", train_per_task=600, val_per_task=40, min_word=3, max_word=4,
                         pref_pairs={"wrong_answer": 1, "off_topic": 1, "truncated": 1})
    chat_data(cfg)
    for name in ("sft_train", "sft_val"):
        write_jsonl(data / f"{name}.jsonl", [r for r in read_jsonl(data / f"{name}.jsonl") if r["source"] in TASKS])
    for name in ("pref_train", "pref_val"):
        write_jsonl(data / f"{name}.jsonl", [r for r in read_jsonl(data / f"{name}.jsonl") if r["task"] in TASKS])
    base.mkdir()
    texts = [render_chat(r["messages"]) for r in read_jsonl(data / "sft_train.jsonl")]
    train_bpe(texts, vocab_size=300, min_frequency=1).save(str(base / "tokenizer.json"))
    torch.manual_seed(0)
    model_cfg = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32)
    save_model(GPT(model_cfg), str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps(asdict(model_cfg)))
    return {"data": data, "base": base}


def tiny_sft(world: dict, tmp: Path, **kw) -> SFTConfig:
    base = dict(base_dir=str(world["base"]), data_dir=str(world["data"]), out_dir=str(tmp / "sft"),
                ckpt_dir=str(tmp / "ckpt"), batch_size=32, max_steps=300, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                eval_interval=100, ckpt_interval=100, log_interval=50, max_new_tokens=10, seed=0)
    base.update(kw)
    return SFTConfig(**base)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def test_non_assistant_tokens_carry_zero_weight(world):
    tok = load_tokenizer(world["base"] / "tokenizer.json")
    rows = read_jsonl(world["data"] / "sft_train.jsonl")[:4]
    examples = [encode_chat(tok, r["messages"]) for r in rows]
    x, y = collate(examples, pad_id=0)
    # targets are the next token where that token is assistant content or its <|end|>, else -100
    for (ids, mask), xi, yi in zip(examples, x, y):
        n = len(ids) - 1
        assert xi[:n].tolist() == ids[:-1]
        assert yi[:n].tolist() == [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        assert (yi[n:] == -100).all()
    # the gradient of the loss reaches only the logits that predict assistant tokens
    model = load_model_folder(world["base"])
    logits, _ = model(x)
    logits.retain_grad()
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    row_grad = logits.grad.abs().sum(-1)
    assert (row_grad[y == -100] == 0).all() and (row_grad[y != -100] > 0).all()
    # assistant_loss (LM head on assistant positions only) is the model's masked loss
    torch.testing.assert_close(assistant_loss(model, x, y), model(x, y)[1])


def test_batches_are_a_function_of_step_and_cover_each_epoch():
    first_epoch = [i for s in range(5) for i in batch_indices(20, 4, seed=3, step=s)]
    assert sorted(first_epoch) == list(range(20))
    assert batch_indices(20, 4, 3, 7) == batch_indices(20, 4, 3, 7) != batch_indices(20, 4, 4, 7)


def test_sft_beats_the_base_model(world, tmp_path):
    metrics = sft(tiny_sft(world, tmp_path))
    assert metrics["base_task_accuracy"] < 0.1
    assert metrics["task_accuracy"] > metrics["base_task_accuracy"] + 0.3, metrics
    assert metrics["val_loss"] < metrics["base_val_loss"] - 2.0
    out = tmp_path / "sft"
    assert load_model_folder(out).config.n_layer == 2 and (out / "tokenizer.json").exists()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 300


def test_exact_resume_after_crash(world, tmp_path):
    full = tiny_sft(world, tmp_path / "full", max_steps=8, ckpt_interval=3, eval_interval=4, log_interval=1)
    sft(full)
    crashed = replace(full, out_dir=str(tmp_path / "crash" / "sft"), ckpt_dir=str(tmp_path / "crash" / "ckpt"))

    def crash(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sft(crashed, log=crash)
    assert latest_checkpoint(crashed.checkpoint_root()).name == "step_00000003"
    sft(crashed)
    a, b = load_file(Path(full.out_dir) / "model.safetensors"), load_file(Path(crashed.out_dir) / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((Path(full.out_dir) / "history.json").read_text())
    hb = json.loads((Path(crashed.out_dir) / "history.json").read_text())
    assert ha == hb
