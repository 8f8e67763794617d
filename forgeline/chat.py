"""The chat format: special tokens, the chat template, the loss mask, the answer checker, chat JSONL.

Every stage that reads or writes chat data uses this module; it has one correct form.

**Special tokens** (SPECIAL_TOKENS) are reserved by tasks/tokenizer.py at ids 0..5 in this order;
<|end|> closes a turn, <|endoftext|> separates pretraining documents, <|pad|> fills batches.

**The chat template.** A conversation is a list of {"role", "content"} turns, role in
system/user/assistant. Each turn is its role's special token, the content, then <|end|>:

    <|system|>You are a helpful assistant.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>5<|end|>

`encode_chat` builds the token ids turn by turn: the role and <|end|> tokens by id, each content
with special-token strings encoded as plain text (a user who types "<|assistant|>" cannot open a
turn). It also returns the loss mask: 1 on assistant content and its closing <|end|> (the model
must learn to stop), 0 on everything else. A prompt for generation ends with <|assistant|>.

**The answer checker** `is_correct` is the ground truth of the verifiable tasks (tasks/chat_data.py):
exact match after stripping surrounding whitespace.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

PAD = "<|pad|>"
EOT = "<|endoftext|>"
END = "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, EOT, *ROLE_TOKENS.values(), END]   # ids 0..5 in this order
_TURN = re.compile(r"(<\|system\|>|<\|user\|>|<\|assistant\|>)(.*?)<\|end\|>", re.S)


def render_chat(messages: list[dict]) -> str:
    """The conversation as template text (what `tokenizer.decode` of `encode_chat` gives back)."""
    return "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages)


def parse_chat(text: str) -> list[dict]:
    """Template text back into turns; the inverse of `render_chat`."""
    role_of = {v: k for k, v in ROLE_TOKENS.items()}
    turns, pos = [], 0
    for m in _TURN.finditer(text):
        if m.start() != pos:
            raise ValueError(f"not a chat: unexpected text at {pos}: {text[pos:m.start()][:40]!r}")
        turns.append({"role": role_of[m.group(1)], "content": m.group(2)})
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"not a chat: unterminated turn at {pos}: {text[pos:][:40]!r}")
    return turns


def load_tokenizer(path: str | Path):
    """The stage tokenizer, set so that special-token strings inside content encode as text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def encode_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and the loss mask (1 = assistant content or its <|end|>).

    add_generation_prompt appends <|assistant|> so the model's continuation is the reply.
    `tok` must come from `load_tokenizer` (contents encoded with special strings as text).
    """
    ids, mask = [], []
    end = tok.token_to_id(END)
    for m in messages:
        content = tok.encode(m["content"], add_special_tokens=False).ids
        learn = int(m["role"] == "assistant")
        ids += [tok.token_to_id(ROLE_TOKENS[m["role"]]), *content, end]
        mask += [0] + [learn] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tok.token_to_id(ROLE_TOKENS["assistant"]))
        mask.append(0)
    return ids, mask


def prompt_ids(tok, row: dict) -> list[int]:
    """A chat row's conversation less its final assistant turn, ending with <|assistant|>."""
    messages = row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"]
    return encode_chat(tok, messages, add_generation_prompt=True)[0]


def encode_reply(tok, prompt: list[dict], reply: str) -> list[int]:
    """prompt turns + assistant reply + <|end|>, in the chat template."""
    return encode_chat(tok, [*prompt, {"role": "assistant", "content": reply}])[0]


def decode_reply(tok, ids: list[int]) -> tuple[str, bool]:
    """Generated ids -> (the reply up to the first <|end|>, whether an <|end|> closed it)."""
    end = tok.token_to_id(END)
    closed = end in ids
    if closed:
        ids = ids[:ids.index(end)]
    return tok.decode(ids, skip_special_tokens=True), closed


def is_correct(reply: str, answer: str) -> bool:
    """The verifiable tasks' ground truth: exact match after stripping surrounding whitespace."""
    return reply.strip() == answer.strip()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Chat data files: one JSON object a line, keys sorted, UTF-8 (byte-identical for equal rows)."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


# ----------------------------------------------------------------------------- batches of chat sequences


def encode_conversations(rows: list[dict], tok, block_size: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, loss mask) of each conversation that fits in block_size + 1 tokens; and how many did not."""
    out = []
    for row in rows:
        ids, mask = encode_chat(tok, row["messages"])
        if len(ids) <= block_size + 1:
            out.append((ids, mask))
    return out, len(rows) - len(out)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Inputs x = ids[:-1] and targets y = ids[1:] (B, T), right-padded; y is -100 wherever the
    predicted token is not an assistant token (mask 0) and on padding: the assistant-only loss."""
    import torch

    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    return x, y


def collate_sequences(seqs: list[list[int]], pad_id: int):
    """Right-padded (N, T) ids and each row's last real index (N,)."""
    import torch

    T = max(map(len, seqs))
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    return idx, torch.tensor([len(s) - 1 for s in seqs])


def encode_pairs(rows: list[dict], tok, block_size: int) -> list[tuple[list[int], list[int], dict]]:
    """(chosen ids, rejected ids, row) of each preference pair whose sequences fit the model's context."""
    out = []
    for r in rows:
        c, j = encode_reply(tok, r["prompt"], r["chosen"]), encode_reply(tok, r["prompt"], r["rejected"])
        if max(len(c), len(j)) <= block_size:
            out.append((c, j, r))
    return out
