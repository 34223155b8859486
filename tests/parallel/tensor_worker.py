"""Vocabulary-parallel pieces on 2 ranks against their single-process counterparts.

torchrun --nproc_per_node 2 tests/parallel/tensor_worker.py OUT.pt
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_llm.distributed import finish_process, init_world
from dist_llm.parallel.tensor import (
    TensorParallel,
    VocabParallelEmbedding,
    VocabParallelOutput,
    vocab_parallel_cross_entropy,
)

VOCAB, DIM, TOKENS = 251, 16, 40  # 251 is odd: the vocabulary is padded to 252


def main() -> None:
    out = sys.argv[1]
    world = init_world()
    tp = TensorParallel(rank=world.rank, size=world.size, group=dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    embedding, head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB, bias=False)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(VOCAB, DIM, generator=g))
        head.weight.copy_(torch.randn(VOCAB, DIM, generator=g))
    ids = torch.randint(0, VOCAB, (2, TOKENS // 2), generator=g)
    labels = torch.randint(0, VOCAB, (2, TOKENS // 2), generator=g)
    labels[0, :3] = -100  # ignored positions
    labels[1, -1] = VOCAB - 1  # the last real row, next to the padding

    h = embedding(ids)
    logits = head(h)
    ref_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_loss.backward()

    p_embedding, p_head = VocabParallelEmbedding(embedding, tp), VocabParallelOutput(head, tp)
    p_h = p_embedding(ids)
    p_logits = p_head(p_h)
    loss = vocab_parallel_cross_entropy(p_logits, labels, tp)
    loss.backward()
    shards = [torch.empty_like(p_logits) for _ in range(tp.size)]
    dist.all_gather(shards, p_logits.detach().contiguous())
    grads = [torch.empty_like(p_head.weight.grad) for _ in range(tp.size)]
    dist.all_gather(grads, p_head.weight.grad.contiguous())
    summed = vocab_parallel_cross_entropy(p_logits.detach(), labels, tp, "sum").item()  # a collective
    if world.rank == 0:
        torch.save(
            {
                "embedding": (p_h - h).abs().max().item(),
                "logits": (torch.cat(shards, -1)[..., :VOCAB] - logits).abs().max().item(),
                "padding_is_minus_inf": bool(torch.isneginf(torch.cat(shards, -1)[..., VOCAB:]).all()),
                "loss": abs(loss.item() - ref_loss.item()),
                "sum": abs(
                    summed
                    - F.cross_entropy(
                        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
                    ).item()
                ),
                "head_grad": (torch.cat(grads)[:VOCAB] - head.weight.grad).abs().max().item(),
            },
            out,
        )
    finish_process()


if __name__ == "__main__":
    main()
