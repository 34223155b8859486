"""`dist-llm eval`: loss, perplexity and bits per byte of a checkpoint on shards or raw text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_llm.checkpoint import load_model
from dist_llm.data.documents import InputError
from dist_llm.data.manifest import open_split
from dist_llm.data.stream import eval_batches
from dist_llm.data.tokenizer import EOT


@torch.no_grad()
def run_eval(
    checkpoint: str | Path,
    data: str | None = None,
    split: str = "val",
    texts: Sequence[str] = (),
    batch_size: int = 8,
    max_batches: int = 0,
    window: int = 0,
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
) -> dict:
    texts = [(path, read_text(path)) for path in texts]  # every file checked before the model loads
    model, config, tokenizer = load_model(checkpoint, device)
    if tokenizer is None:
        raise InputError(
            f"{checkpoint} has no tokenizer.json; eval needs the tokenizer the model was trained with"
        )
    nll = tokens = byte_count = 0
    if data:
        token_bytes = _token_bytes(tokenizer)
        for batch in eval_batches(open_split(data, split), batch_size, max_batches=max_batches):
            labels = batch["labels"].to(device)
            nll += F.cross_entropy(
                model(batch["input_ids"].to(device), document_ids=batch["document_ids"].to(device))
                .float()
                .flatten(0, 1),
                labels.flatten(),
                ignore_index=-100,
                reduction="sum",
            ).item()
            scored = labels[labels != -100]
            tokens += scored.numel()
            byte_count += int(token_bytes[scored.cpu()].sum())
    for _, text in texts:
        n, t = _score_text(
            model, tokenizer, text, min(window or config.data.seq_len, config.model.max_seq_len)
        )
        nll, tokens, byte_count = nll + n, tokens + t, byte_count + len(text.encode("utf-8"))
    if not tokens:
        raise InputError(
            "nothing to score: pass --data with a non-empty split, or --text with non-empty files"
        )
    loss = nll / tokens
    return {
        "tokens": tokens,
        "nll_sum": nll,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll / math.log(2) / byte_count if byte_count else None,
    }


def read_text(path: str | Path) -> str:
    """A text file to score, or an InputError that names it: missing, a folder, not UTF-8, or
    nothing but whitespace (which would score zero tokens of text without a word)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--text {path}: no such file")
    if path.is_dir():
        raise InputError(f"--text {path} is a folder: pass its files (e.g. {path}/*.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"--text {path}: not UTF-8 at byte {exc.start}; convert it (e.g. iconv -t utf-8)"
        ) from None
    if not text.strip():
        raise InputError(f"--text {path} holds no text (empty or only whitespace): nothing to score")
    return text


def _score_text(model, tokenizer, text: str, window: int) -> tuple[float, int]:
    """Sliding window with half-window stride: every token is scored once, each with at least
    half a window of context (except at the start). The text starts after an end-of-text
    token, as documents do in training."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.token_to_id(EOT), *tokenizer.encode(text).ids], device=device)
    stride = max(1, window // 2)
    nll, scored_until = 0.0, 1  # ids[0] is context only
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids) - 1)
        logits = model(ids[begin:end].unsqueeze(0))[0].float()
        targets = ids[begin + 1 : end + 1]
        new = slice(scored_until - begin - 1, None)
        nll += F.cross_entropy(logits[new], targets[new], reduction="sum").item()
        scored_until = end + 1
        if end == len(ids) - 1:
            break
    return nll, len(ids) - 1


def _token_bytes(tokenizer) -> torch.Tensor:
    """UTF-8 bytes of each token. Byte-level BPE writes every byte as one symbol, so a token's
    byte count is the length of its string; special tokens stand for no text."""
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    sizes = torch.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=torch.int64)
    for token, i in vocab.items():
        sizes[i] = len(token)
    for special in tokenizer.get_added_tokens_decoder() or {}:
        sizes[special] = 0
    return sizes
