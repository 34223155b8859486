"""Expert parallelism: each MoE layer's experts split over `parallel.expert` ranks.

The expert-parallel group is carved out of the data-parallel ranks: every rank still reads its
own batches and holds the dense weights (attention, norms, routers, dense feed-forwards), but
only num_experts / ep of each MoE layer's experts, the contiguous range rank * E/ep ... of the
stacked weights' dim 0 (`expert_shard` on the parameter; checkpoints store the whole stack, so
they move between expert-parallel sizes). `ExpertDispatch` replaces `MoE.dispatch`: the routes
sorted by expert, one all-to-all of the routes per destination rank (their counts first), the
local experts run on what arrived (regrouped by expert), and the inverse all-to-all brings the
outputs home, where the router weights combine them. Both all-to-alls are autograd functions
whose backward is the other one, so the experts' gradients gather every rank's tokens.

Gradients. The loss is the mean of every rank's own; DeepSpeed's data-parallel group is the
ranks holding the same experts (topology.ContextGrid with the expert group as its "model" axis,
which it then treats like tensor parallelism: expert weights are `model_parallel`, their norms
summed over the group, the dense ones counted once). So before DeepSpeed averages over its
group: a dense weight's gradient is averaged over the expert group (a hook, one all-reduce per
tensor), and an expert weight's, which already sums the contributions of the whole expert
group's tokens, is divided by its size. ZeRO 1-2 then partitions both over its group.

DeepSpeed's own MoE (deepspeed.moe.layer.MoE, 0.19.8) is not used. Its gates can be made to
route as Mixtral does only by switching off what they do by default (top-2: Gumbel sampling of
the second expert, `top2_2nd_expert_sampling`; top-1: random token selection, `use_rts`;
capacity dropping, `drop_tokens`), its dropless mode pads every expert to the group's largest
count in a [tokens, experts, capacity] dispatch, its load-balancing loss is another
normalisation (mean(me * ce) * E^2 / k), it holds experts as a list of modules (not the stacked
layout of Mixtral and transformers 5) and lives in a module the plain model would have to
import, and the engine's expert-gradient handling engages only for that module class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dist_llm.model.moe import MoE, combine, sort_routes


@dataclass
class ExpertParallel:
    """This rank's place in its expert-parallel group (size 1: no expert parallelism)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


def _exchange(x: torch.Tensor, send: list[int], receive: list[int], ep: ExpertParallel) -> torch.Tensor:
    out = x.new_empty((sum(receive), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), receive, send, group=ep.group)
    return out


class _Exchange(torch.autograd.Function):
    """Rows [sum(send), dim]: send[j] of them to rank j; the rows received, in rank order."""

    @staticmethod
    def forward(ctx, x, send, receive, ep):
        ctx.send, ctx.receive, ctx.ep = send, receive, ep
        return _exchange(x, send, receive, ep)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.receive, ctx.send, ctx.ep), None, None, None


class ExpertDispatch:
    """`MoE.dispatch` over the expert-parallel group. A plain callable: no parameters."""

    def __init__(self, ep: ExpertParallel):
        self.ep = ep

    def __call__(self, x, experts, weights, module):
        ep, local = self.ep, module.w1.shape[0]
        order, counts = sort_routes(experts, local * ep.size)
        counts_in = torch.empty_like(counts)  # [source rank, my local expert] routes
        dist.all_to_all_single(counts_in, counts, group=ep.group)
        counts_in = counts_in.view(ep.size, local)
        send, receive = counts.view(ep.size, local).sum(1).tolist(), counts_in.sum(1).tolist()
        rows = _Exchange.apply(x[order // experts.shape[1]], send, receive, ep)
        # Arrived grouped by source rank, then expert: regroup by expert for the local experts.
        expert_of = (
            torch.arange(local, device=x.device).repeat(ep.size).repeat_interleave(counts_in.flatten())
        )
        by_expert = torch.argsort(expert_of, stable=True)
        out = module(rows[by_expert], counts_in.sum(0).tolist())
        out = out[torch.argsort(by_expert)]  # back to arrival order
        return combine(x, order, _Exchange.apply(out, receive, send, ep), weights)


def apply_expert_parallel(model: nn.Module, ep: ExpertParallel) -> nn.Module:
    """On a meta model: keep this rank's experts of every MoE layer and route through the
    all-to-alls. Names are unchanged; each expert weight is marked with its shard."""
    if ep.size == 1:
        return model
    for module in model.modules():
        if isinstance(module, MoE):
            for name, param in list(module.experts.named_parameters()):
                local = param.shape[0] // ep.size
                shard = nn.Parameter(torch.empty((local, *param.shape[1:]), device="meta"))
                shard.expert_shard = (ep.rank, ep.size)
                shard.model_parallel = True  # DeepSpeed: a distinct slice per rank of its "model" group
                setattr(module.experts, name, shard)
            module.dispatch = ExpertDispatch(ep)
    return model


def average_over_expert_group(model: nn.Module, ep: ExpertParallel) -> None:
    """Gradient hooks (on the materialized model): dense weights averaged over the expert group,
    expert weights divided by its size (see the module docstring)."""
    if ep.size == 1:
        return
    for param in {id(p): p for p in model.parameters()}.values():  # a tied weight once
        if hasattr(param, "expert_shard"):
            param.register_hook(lambda grad: grad / ep.size)
        else:
            param.register_hook(lambda grad: _mean(grad, ep))


def _mean(grad: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=ep.group)
    return grad / ep.size
