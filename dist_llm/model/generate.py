"""Sampling with a KV cache: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from dist_llm.model.llama import KVCache, Llama


@torch.no_grad()
def generate(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Collection[int] = (),
    use_cache: bool = True,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Continue `prompt`; temperature 0 is greedy. Returns only the new tokens, ending with the
    first of `stop_ids` sampled (end of text, end of a chat turn) if one is, or with the first
    token after which `stop(new tokens)` is true (a stop string that spans several tokens).

    Prompt and continuation must fit the model's context (`fit_context` shortens them visibly);
    nothing is cut here, so that no caller gets less than it asked for without knowing."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    limit = model.config.max_seq_len
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(
            f"prompt {len(prompt)} + {max_new_tokens} new tokens exceed the context of {limit} "
            "(model.max_seq_len); shorten them with fit_context"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else seed)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, dtype, device) if use_cache else None
    tokens = torch.tensor([prompt], device=device)
    new: list[int] = []
    step_input = tokens
    for _ in range(max_new_tokens):
        logits = model(step_input, cache)[0, -1].float()
        token = _sample(logits, temperature, top_k, top_p, generator)
        new.append(token)
        if token in stop_ids or (stop is not None and stop(new)):
            break
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
        step_input = tokens[:, -1:] if use_cache else tokens
    return new


def fit_context(
    prompt: list[int], max_new_tokens: int, limit: int, truncate_prompt: bool
) -> tuple[list[int], int, list[str]]:
    """(prompt, new tokens) that fit a context of `limit`, and a note for each thing shortened.

    A prompt that leaves no room is an error unless `truncate_prompt` (then its most recent
    tokens are kept); new tokens beyond the context are capped, and the note says so."""
    notes = []
    if len(prompt) >= limit:
        if not truncate_prompt:
            raise ValueError(
                f"the prompt is {len(prompt)} tokens and the model's context (model.max_seq_len) is "
                f"{limit}: shorten it, or pass --truncate-prompt to keep its last {limit - 1} tokens"
            )
        notes.append(f"prompt truncated: kept its last {limit - 1} of {len(prompt)} tokens")
        prompt = prompt[-(limit - 1) :]
    room = limit - len(prompt)
    if max_new_tokens > room:
        notes.append(
            f"--max-new-tokens {max_new_tokens} capped to {room}: the context holds {limit} tokens "
            f"(model.max_seq_len) and the prompt uses {len(prompt)}"
        )
        max_new_tokens = room
    return prompt, max_new_tokens, notes


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
