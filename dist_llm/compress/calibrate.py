"""Calibration and evaluation inputs for the compression stages, from shards or raw text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dist_llm.data.documents import InputError
from dist_llm.data.manifest import open_split
from dist_llm.data.stream import eval_batches
from dist_llm.data.tokenizer import EOT


def check_source(data: str | None, split: str, texts: Sequence[str], what: str, flags: str) -> None:
    """Fail on a missing or unreadable calibration or evaluation source before a stage writes
    anything (the evaluation source is only read at the very end)."""
    if not data and not texts:
        raise InputError(f"{what} needs {flags}")
    if data:
        open_split(data, split)  # the manifest and the split: a DataError names what is wrong
    for path in texts:
        if not Path(path).is_file():
            raise InputError(f"{what} text {path} is not a file")


def check_calibration(calibration: dict) -> None:
    """`check_source` for a stage's calibration arguments (--data / --split / --text)."""
    check_source(
        calibration["data"],
        calibration["split"],
        calibration["texts"],
        "calibration",
        "--data SHARDS or --text FILES",
    )


def calibration_batches(
    tokenizer,
    data: str | None,
    split: str,
    texts: Sequence[str],
    samples: int,
    seq_len: int,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """`samples` sequences of `seq_len` tokens as [B, seq_len] id batches."""
    if data:
        spec = open_split(data, split)
        if spec.seq_len < seq_len:
            seq_len = spec.seq_len
        rows = []
        for batch in eval_batches(spec, batch_size, max_batches=-(-samples // batch_size)):
            real = batch["labels"][:, 0] != -100  # drop the padding rows of a short last batch
            rows.extend(batch["input_ids"][real, :seq_len])
        rows = rows[:samples]
    elif texts:
        ids = [tokenizer.token_to_id(EOT)]
        for path in texts:
            ids += [*tokenizer.encode(Path(path).read_text(encoding="utf-8")).ids, tokenizer.token_to_id(EOT)]
        rows = [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)][
            :samples
        ]
    else:
        raise InputError("calibration needs --data SHARDS or --text FILES")
    if not rows:
        raise InputError(f"no calibration sequence of {seq_len} tokens could be cut from the given data")
    stacked = torch.stack(rows)
    return list(stacked.split(batch_size))
