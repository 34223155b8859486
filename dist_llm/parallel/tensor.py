"""Megatron-style tensor parallelism, applied to the plain model by a plan table.

Each rank of a tensor-parallel group holds a slice of every large matrix (which matrix is which
is the table of parameter roles, `model/roles.py`):

- column-parallel (wq, wk, wv, w1, w3): output rows split; the input is replicated, so its
  gradient is summed over the group in the backward pass (`_CopyToGroup`);
- row-parallel (wo, w2): input columns split; the partial outputs are summed in the forward
  pass (`_SumOverGroup`), whose gradient is already replicated;
- vocabulary-parallel embedding and output: rows of the (padded) vocabulary split; logits stay
  split, and `vocab_parallel_cross_entropy` computes the loss without gathering them.

Attention heads split with wq/wk/wv rows (heads are contiguous rows), so each rank runs the
unchanged attention code on n_heads/tp query and n_kv_heads/tp key/value heads; the two
collectives per block are the sums after wo and w2. Norm weights are replicated and receive
identical gradients on every rank.

Sequence parallelism (Korthikanti et al. 2022) splits the norm regions, and the residual stream
between them, along the sequence: each all-reduce becomes a reduce-scatter (after wo, w2 and the
embedding) plus an all-gather (before wq/wk/wv, w1/w3 and the head), the same traffic, while the
activations outside attention and MLP shrink by the TP size. Norm weights then see only their
rank's positions, so their gradients are summed over the group (a hook on each).

Split parameters carry `tp_dim` (the dimension that is split, for loading and gathering) and
`model_parallel = True` (so DeepSpeed counts them once per shard in gradient norms).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_llm.model.roles import (
    COLUMN,
    EMBEDDING,
    HEAD,
    NORM,
    ROLES,
    ROW,
    SPLIT_DIM,
    pad_vocab,
    padded_vocab,
    role_of,
    tie_module,
)


@dataclass
class TensorParallel:
    """This rank's place in its tensor-parallel group. `group` is bound once the process
    groups exist (DeepSpeed's pipeline builds its layers before it builds its groups)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False


# ---------------------------------------------------------------- collectives with gradients


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.tp.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        x = x.contiguous()
        dist.all_reduce(x, group=tp.group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _gather_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=1)


def _scatter_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum over the group and keep this rank's block of positions (dim 1)."""
    parts = [p.contiguous() for p in x.chunk(tp.size, dim=1)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=tp.group)
    return out


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _gather_sequence(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_sequence(grad, ctx.tp), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _scatter_sequence(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _gather_sequence(grad, ctx.tp), None


def copy_to_group(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Into a tensor-parallel region: the full input on every rank."""
    if tp.size == 1:
        return x
    return _GatherSequence.apply(x, tp) if tp.sequence_parallel else _CopyToGroup.apply(x, tp)


def sum_over_group(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Out of a tensor-parallel region: partial results summed (and, with sequence
    parallelism, only this rank's positions kept)."""
    if tp.size == 1:
        return x
    return _ScatterSequence.apply(x, tp) if tp.sequence_parallel else _SumOverGroup.apply(x, tp)


# ---------------------------------------------------------------- layers


def _shard_parameter(weight: torch.Tensor, dim: int, tp: TensorParallel, padded: int | None = None):
    """This rank's slice of `weight` along `dim` (padded with zero rows to `padded` first)."""
    if padded is not None:
        weight = pad_vocab(weight, dim, padded)
    shard = nn.Parameter(weight.chunk(tp.size, dim=dim)[tp.rank].clone())
    shard.tp_dim = dim
    shard.model_parallel = True
    return shard


class ColumnParallelLinear(nn.Module):
    def __init__(self, dense: nn.Linear, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = _shard_parameter(dense.weight.detach(), SPLIT_DIM[COLUMN], tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(x, self.tp), self.weight)


class RowParallelLinear(nn.Module):
    def __init__(self, dense: nn.Linear, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = _shard_parameter(dense.weight.detach(), SPLIT_DIM[ROW], tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_over_group(F.linear(x, self.weight), self.tp)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, dense: nn.Embedding, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.vocab_size = dense.num_embeddings
        padded = padded_vocab(self.vocab_size, tp.size)
        self.weight = _shard_parameter(dense.weight.detach(), SPLIT_DIM[EMBEDDING], tp, padded)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.shape[0]
        local = ids - self.tp.rank * rows
        outside = (local < 0) | (local >= rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return sum_over_group(h.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


class VocabParallelOutput(nn.Module):
    """Logits for this rank's slice of the vocabulary; padding rows get -inf so that they
    never win an argmax and carry no probability."""

    def __init__(self, dense: nn.Linear, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.vocab_size = dense.out_features
        padded = padded_vocab(self.vocab_size, tp.size)
        self.weight = _shard_parameter(dense.weight.detach(), SPLIT_DIM[HEAD], tp, padded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vocab_logits(x, self.weight, self.tp, self.vocab_size)


def vocab_logits(x: torch.Tensor, weight: torch.Tensor, tp: TensorParallel, vocab_size: int) -> torch.Tensor:
    logits = F.linear(copy_to_group(x, tp), weight)
    valid = vocab_size - tp.rank * weight.shape[0]
    if valid < weight.shape[0]:
        logits = logits.clone()
        logits[..., max(valid, 0) :] = float("-inf")
    return logits


# ---------------------------------------------------------------- the plan

# The parallel style of each kind of parameter in model/roles.py; norms stay replicated.
STYLES: dict[str, type[nn.Module]] = {
    COLUMN: ColumnParallelLinear,
    ROW: RowParallelLinear,
    EMBEDDING: VocabParallelEmbedding,
    HEAD: VocabParallelOutput,
}

# Module path (fnmatch pattern over the plain model's names) -> parallel style, from the roles:
# {"tok_embeddings": VocabParallelEmbedding, "layers.*.attention.wq": ColumnParallelLinear, ...,
# "layers.*.feed_forward.w2": RowParallelLinear, "output": VocabParallelOutput}.
PLAN: dict[str, type[nn.Module]] = {
    r.pattern.removesuffix(".weight"): STYLES[r.kind]
    for r in ROLES
    if r.kind in STYLES and r.layers in ("all", "dense")  # MoE layers: no TP (config.check)
}


def style_of(name: str) -> type[nn.Module] | None:
    for pattern, style in PLAN.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def apply_tensor_parallel(module: nn.Module, tp: TensorParallel, prefix: str = "") -> nn.Module:
    """Swap the layers named in PLAN for their parallel versions, in place.

    `prefix` is the module's path inside the plain model (a pipeline stage holding only
    `layers.3` passes "" and keeps the plain names itself). Works on meta tensors too: the
    shards are then shaped but empty, to be filled by `parallel.weights.materialize`.
    """
    if tp.size == 1:
        return module
    if tp.sequence_parallel:
        for name, param in module.named_parameters():
            if role_of(prefix + name).kind == NORM:
                param.sequence_parallel = True
    for name, child in list(module.named_modules()):
        style = style_of(prefix + name) if name else None
        if style is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, style(child, tp))
    if hasattr(module, "config"):
        tie_module(module, module.config)  # the two new shards are one again
    return module


def sum_sequence_parallel_grads(module: nn.Module, tp: TensorParallel) -> None:
    """Norm weights under sequence parallelism saw only this rank's positions: sum their
    gradients over the group before DeepSpeed reduces them over data parallelism."""
    for param in module.parameters():
        if getattr(param, "sequence_parallel", False):
            param.register_hook(lambda grad: _summed(grad, tp))


def _summed(grad: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=tp.group)
    return grad


# ---------------------------------------------------------------- loss


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary rows (Megatron's algorithm): three
    all-reduces of [tokens]-sized vectors (max, target logit, sum of exponentials) instead of
    gathering [tokens, vocab] logits."""

    @staticmethod
    def forward(ctx, logits, target, tp):
        logits = logits.float()
        shift = logits.max(dim=-1).values
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp.group)
        logits = logits - shift.unsqueeze(-1)
        rows = logits.shape[-1]
        local = target - tp.rank * rows
        outside = (local < 0) | (local >= rows)
        local = local.masked_fill(outside, 0)
        picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(picked, group=tp.group)
        exp = logits.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=tp.group)
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local, outside)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        hit = softmax.new_zeros(softmax.shape).scatter_(
            -1, local.unsqueeze(-1), (~outside).unsqueeze(-1).float()
        )
        return (softmax - hit) * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy (labels -100 ignored) from vocabulary-split logits, in fp32;
    equal to `F.cross_entropy` on the gathered logits."""
    logits, labels = logits.flatten(0, -2), labels.flatten()
    keep = labels != -100
    losses = _VocabParallelCrossEntropy.apply(logits, labels.masked_fill(~keep, 0), tp) * keep
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / keep.sum().clamp(min=1)
