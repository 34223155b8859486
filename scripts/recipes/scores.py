"""Held-out scores of the fine-tuning recipe's checkpoints, in one process (docs/finetuning.md):

    python scripts/recipes/scores.py --reference work/recipe/sft/merged \
        --held-shards work/recipe/shards/held --pairs work/recipe/data/pairs_held.jsonl \
        --prompts "Hello" "What is a computer?" -- work/recipe/base work/recipe/sft/merged ...

For each checkpoint (weights-only or a run's, not a LoRA one: merge it first):
  assistant_loss, assistant_ppl  `dist-llm eval`'s loss on the held-out chat shards (split train
                                 of a folder sharded with --val-fraction 0), i.e. on the tokens
                                 of the assistant turns only: the loader applies the loss mask
  logp_accuracy                  share of held-out pairs whose chosen reply has the higher summed
                                 log-probability than the rejected one
  dpo_margin, dpo_accuracy       mean of beta * ([log pi - log ref](chosen) - [...](rejected))
                                 over the held-out pairs, and the share above 0, against
                                 --reference (DPO's implicit reward margin; 0 for the reference)
  replies                        greedy `generate --chat` replies to --prompts (40 tokens at most)
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from dist_llm.checkpoint import load_model
from dist_llm.data.chat import ChatEncoder
from dist_llm.data.pairs import pair_batch, read_pairs
from dist_llm.eval.perplexity import run_eval
from dist_llm.model.generate import generate
from dist_llm.train.dpo import sequence_logps


@torch.no_grad()
def pair_logps(model, batch: dict, rows: int = 16) -> torch.Tensor:
    """Summed response log-probabilities of every row of a pair batch, `rows` at a time."""
    out = [
        sequence_logps(model(batch["input_ids"][i : i + rows]), batch["labels"][i : i + rows])
        for i in range(0, len(batch["input_ids"]), rows)
    ]
    return torch.cat(out)


def pair_scores(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> dict:
    """Chosen rows first, then rejected (pair_batch's order)."""
    half = len(logps) // 2
    margin = beta * ((logps - ref_logps)[:half] - (logps - ref_logps)[half:])
    return {
        "logp_accuracy": (logps[:half] > logps[half:]).float().mean().item(),
        "dpo_margin": margin.mean().item(),
        "dpo_accuracy": (margin > 0).float().mean().item(),
    }


def score(
    checkpoints: list[str],
    reference: str,
    held_shards: str,
    pairs_file: str,
    prompts: list[str],
    seq_len: int = 128,
    beta: float = 0.1,
    max_new_tokens: int = 40,
    max_pairs: int = 0,
) -> dict:
    pairs = read_pairs(pairs_file, reference, seq_len)
    count = min(len(pairs), max_pairs) if max_pairs else len(pairs)
    batch = pair_batch(pairs, torch.arange(count).numpy())
    ref_model, _, _ = load_model(reference, "cpu")
    ref_logps = pair_logps(ref_model, batch)
    del ref_model
    results = {}
    for ckpt in checkpoints:
        row = {}
        if held_shards:
            ev = run_eval(ckpt, data=held_shards, split="train", device="cpu")
            row["assistant_loss"] = ev["loss"]
            row["assistant_ppl"] = math.exp(ev["loss"])
            row["assistant_tokens"] = ev["tokens"]
        model, _, tokenizer = load_model(ckpt, "cpu")
        row.update(pair_scores(pair_logps(model, batch), ref_logps, beta))
        chat = ChatEncoder(ckpt)
        row["replies"] = {
            p: tokenizer.decode(generate(model, chat.prompt_ids(p), max_new_tokens, stop_ids=chat.stop_ids()))
            for p in prompts
        }
        results[ckpt] = row
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="the DPO reference checkpoint")
    parser.add_argument("--held-shards", default="", help="held-out chat shards (split train)")
    parser.add_argument("--pairs", required=True, help="held-out pairs JSONL")
    parser.add_argument("--prompts", nargs="*", default=[])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-pairs", type=int, default=0, help="score the first N pairs (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    out = score(
        args.checkpoints,
        args.reference,
        args.held_shards,
        args.pairs,
        args.prompts,
        args.seq_len,
        args.beta,
        args.max_new_tokens,
        args.max_pairs,
    )
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
