"""Preference pairs for DPO: JSONL of {prompt, chosen, rejected}, tokenized, with a loss mask on
the responses, and a resumable loader of batches that put each pair's two rows side by side.

A record is either text (`prompt`, `chosen`, `rejected` strings: tokenized as fine-tuning
prompt/response pairs are by `data shard`: prompt tokens, response tokens, end-of-text, only
the response and its end-of-text scored) or a conversation (`prompt` a list of messages
[{role, content}], `chosen` and `rejected` the assistant turn's content: rendered with the
tokenizer's chat template by data/chat.py, only the assistant turn scored). A pair longer than
the row is cut at the end of the row (its responses lose their tails; counted in `truncated`).

A batch of B pairs is input_ids/labels [2B, seq_len]: rows 0..B-1 the chosen responses, rows
B..2B-1 the rejected ones, in the same order; labels are -100 outside the responses and on
the padding after them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from dist_llm.data.chat import ChatEncoder, ChatError
from dist_llm.data.stream import IGNORE_INDEX
from dist_llm.data.tokenizer import EOT, PAD, load_tokenizer
from dist_llm.errors import InputError

FIELDS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass
class Pairs:
    """Token rows of length seq_len + 1 ([N, 2, L]: chosen, rejected) and their loss masks."""

    tokens: np.ndarray
    mask: np.ndarray
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


def read_pairs(path: str | Path, tokenizer_dir: str | Path, seq_len: int) -> Pairs:
    """Every record of a pairs JSONL file, tokenized; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"dpo.data: {path} does not exist; point it at a JSONL file of prompt/chosen/rejected"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    chat: ChatEncoder | None = None
    eot, pad = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
    pad = pad if pad is not None else eot
    rows, masks, truncated = [], [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: a record must be an object with {', '.join(FIELDS)}")
        for field in FIELDS:
            if field not in record:
                raise InputError(f"{where}: missing field '{field}' (each line needs {', '.join(FIELDS)})")
        for field in ("chosen", "rejected"):
            if not isinstance(record[field], str) or not record[field].strip():
                raise InputError(f"{where}: field '{field}' must be a non-empty string")
        prompt = record["prompt"]
        pair = []
        for field in ("chosen", "rejected"):
            if isinstance(prompt, str):
                head = tokenizer.encode(prompt).ids if prompt else []
                body = [*tokenizer.encode(record[field]).ids, eot]
                ids, mask = head + body, [0] * len(head) + [1] * len(body)
            elif isinstance(prompt, list):
                chat = chat or ChatEncoder(tokenizer_dir)
                try:
                    messages = [(m["role"], m["content"]) for m in prompt] + [("assistant", record[field])]
                    ids, mask = chat.encode_chat(messages)
                except (KeyError, TypeError):
                    raise InputError(
                        f"{where}: field 'prompt' must be a string or a list of {{role, content}} messages"
                    ) from None
                except ChatError as exc:
                    raise InputError(f"{where}: {exc}") from None
            else:
                raise InputError(
                    f"{where}: field 'prompt' must be a string or a list of {{role, content}} messages"
                )
            pair.append((ids, mask))
        row = np.full((2, seq_len + 1), pad, dtype=np.int64)
        row_mask = np.zeros((2, seq_len + 1), dtype=bool)
        for k, (ids, mask) in enumerate(pair):
            if len(ids) > seq_len + 1:
                truncated += 1
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            if not any(mask[1:]):
                raise InputError(
                    f"{where}: the prompt fills the whole row (data.seq_len={seq_len} tokens): "
                    f"no token of '{FIELDS[k + 1]}' is left to score; raise data.seq_len or shorten it"
                )
            row[k, : len(ids)], row_mask[k, : len(ids)] = ids, mask
        rows.append(row)
        masks.append(row_mask)
    if not rows:
        raise InputError(f"dpo.data: {path} holds no records")
    return Pairs(np.stack(rows), np.stack(masks), truncated)


def pair_batch(pairs: Pairs, index: np.ndarray) -> dict:
    """The batch of the pairs at `index`: chosen rows first, then rejected ones."""
    tokens = torch.from_numpy(np.concatenate([pairs.tokens[index, 0], pairs.tokens[index, 1]]))
    mask = torch.from_numpy(np.concatenate([pairs.mask[index, 0], pairs.mask[index, 1]]))
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)}


class PairLoader:
    """Endless batches of `batch_size` pairs for one data-parallel rank: each epoch a seeded
    permutation, split over the ranks; its state is (epoch, batches taken in it)."""

    rows_per_sample = 2  # a chosen and a rejected row (the run's token counts)

    def __init__(self, pairs: Pairs, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        self.per_epoch = len(pairs) // (batch_size * dp_size)
        if self.per_epoch == 0:
            raise InputError(
                f"dpo.data holds {len(pairs)} pairs, fewer than one step needs "
                f"(train.micro_batch_size={batch_size} x {dp_size} data-parallel ranks)"
            )
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.taken = 0, 0

    def __iter__(self):
        while True:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.pairs))
            while self.taken < self.per_epoch:
                start = (self.taken * self.dp_size + self.dp_rank) * self.batch_size
                self.taken += 1
                yield pair_batch(self.pairs, order[start : start + self.batch_size])
            self.epoch, self.taken = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])
