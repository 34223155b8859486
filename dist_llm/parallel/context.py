"""Context parallelism (DeepSpeed Ulysses, Jacobs et al. 2023): each training sequence split
over `parallel.context` ranks, which hold replicated weights.

Every rank runs the model on its contiguous chunk of positions (`context_chunk`); rotary
positions are the chunk's global ones (`offset`). Everything but attention is per position, so
only attention needs the rest of the sequence: before it, an all-to-all trades positions for
heads (each rank then holds the whole sequence for 1/cp of its heads, and runs the unchanged
attention kernel with the full sequence's document mask); after it, the inverse all-to-all
trades them back. Four all-to-alls of [B, T/cp, H*D] per layer forward (q, k, v, output), four
backward; grouped-query heads stay with their queries because both split into cp contiguous
groups. With fewer key/value heads than ranks each is copied to the cp / KV ranks its queries
go to (DeepSpeed's `UlyssesSPAttentionHF` replicates them the same way), so it serves up to as many
ranks as query heads; ring attention, which would go further, is not written.

DeepSpeed's `deepspeed.sequence.layer.DistributedAttention` does the same around a local
attention that takes [B, T, H, D] (or [T, B, H, D]) and extra positional arguments; our kernel
takes [B, H, T, D] plus a mask, so the two all-to-alls are written here rather than
transposing twice around DeepSpeed's. DeepSpeed still does the rest: it reads the context group
from the mpu (topology.ContextGrid) and sums gradients over it.

The loss of a sequence is spread over its context ranks: each rank's loss is its tokens' summed
cross-entropy over the label count of the whole group (`context_loss`), so the gradients
DeepSpeed sums over the group are exactly those of the whole sequence, however unevenly the
-100 labels fall.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dist_llm.model.attention import attend
from dist_llm.model.llama import Attention


@dataclass
class ContextParallel:
    """This rank's place in its context-parallel group (size 1: no context parallelism)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


# ---------------------------------------------------------------- Ulysses all-to-all


def _all_to_all(x: torch.Tensor, cp: ContextParallel, split: int, join: int) -> torch.Tensor:
    """Cut `x` into cp blocks along dim `split`, send block j to rank j, and join the blocks
    received (in rank order) along dim `join`."""
    blocks = torch.stack(x.chunk(cp.size, dim=split)).contiguous()
    out = torch.empty_like(blocks)
    dist.all_to_all_single(out, blocks, group=cp.group)
    return torch.cat(out.unbind(0), dim=join)


class _HeadsForPositions(torch.autograd.Function):
    """[B, H, T/cp, D] -> [B, H/cp, T, D]: this rank's heads over the whole sequence."""

    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        return _all_to_all(x, cp, split=1, join=2)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.cp, split=2, join=1), None


class _PositionsForHeads(torch.autograd.Function):
    """[B, H/cp, T, D] -> [B, H, T/cp, D]: back to every head of this rank's positions."""

    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        return _all_to_all(x, cp, split=2, join=1)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.cp, split=1, join=2), None


def _one_per_rank(kv: torch.Tensor, ranks: int) -> torch.Tensor:
    """Key/value heads [B, KV, T/cp, D], each copied to the ranks its query heads go to when
    there are fewer than context ranks (KV divides cp): copy j of head i lands on rank
    i * cp / KV + j, which receives queries of head i only. Backward sums the copies' gradients."""
    heads = kv.shape[1]
    return kv if heads % ranks == 0 else kv.repeat_interleave(ranks // heads, dim=1)


class UlyssesAttention:
    """The attention kernel of one `Attention` module, over the whole sequence of its share of
    the heads. A plain callable, not a module: it holds no parameters."""

    def __init__(self, cp: ContextParallel):
        self.cp = cp

    def __call__(self, q, k, v, mask):
        k, v = (_one_per_rank(t, self.cp.size) for t in (k, v))
        q, k, v = (_HeadsForPositions.apply(t, self.cp) for t in (q, k, v))
        return _PositionsForHeads.apply(attend(q, k, v, mask), self.cp)


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> nn.Module:
    """Route every attention module's kernel through Ulysses' all-to-alls (names unchanged)."""
    if cp.size > 1:
        for module in model.modules():
            if isinstance(module, Attention):
                module.kernel = UlyssesAttention(cp)
    return model


# ---------------------------------------------------------------- the batch and the loss


def context_chunk(batch: dict, cp: ContextParallel) -> dict:
    """This rank's contiguous positions of every row: input_ids and labels cut; document_ids
    kept whole (the mask after the all-to-all spans the whole sequence); `offset`, the chunk's
    first position (its rotary positions)."""
    if cp.size == 1:
        return batch
    seq = batch["input_ids"].shape[1]
    length = seq // cp.size
    start = cp.rank * length
    chunk = {k: v[:, start : start + length] for k, v in batch.items() if k != "document_ids"}
    if "document_ids" in batch:
        chunk["document_ids"] = batch["document_ids"]
    return {**chunk, "offset": start}


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of the model's forward a (chunked) batch holds, besides input_ids."""
    inputs = {"document_ids": batch.get("document_ids")}
    if "offset" in batch:
        inputs["offset"] = batch["offset"]
    return inputs


def context_loss(summed, cp: ContextParallel):
    """A loss over the group's tokens from a summed one: this rank's sum over the whole group's
    label count (the ranks' losses add up to the sequence's mean)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        count = (labels != -100).sum().to(torch.float32)
        dist.all_reduce(count, group=cp.group)
        return summed(logits, labels) / count.clamp(min=1)

    return loss
