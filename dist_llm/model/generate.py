"""Sampling with a KV cache: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

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
    stop_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue `prompt`; temperature 0 is greedy. Returns only the new tokens."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    limit = model.config.max_seq_len
    prompt = prompt[-(limit - 1) :]  # keep the most recent context
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
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
        if token == stop_id:
            break
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
        step_input = tokens[:, -1:] if use_cache else tokens
    return new


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
