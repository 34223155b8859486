"""The mixture-of-experts feed-forward of the plain model (no parallelism in it).

Mixtral's routing, so that Hugging Face checkpoints give the same logits: a linear router gives
each token a logit per expert; the softmax over all experts (in fp32) is taken, the top_k kept
and, with `model.moe.normalize_top_k` (Mixtral), renormalised to sum to one. Each route runs its
expert, a SwiGLU MLP, and the token's output is the weighted sum. Optionally (Qwen2-MoE) a
shared expert that every token passes through, scaled by sigmoid(shared_gate(x)).

The experts' weights are stacked, [num_experts, out, in] (`experts.w1/w3/w2`), as torchtitan
and transformers 5 hold them: expert parallelism (parallel/expert.py) keeps a contiguous range
of dim 0 on each rank, and a checkpoint stores the whole stack as one tensor, so it moves
between expert-parallel sizes like any sharded tensor. Routes reach their experts through
`MoE.dispatch` (`local_dispatch` here: sort the routes by expert, run each expert on its rows,
add the weighted outputs back); expert parallelism swaps in one that trades rows with the other
ranks by all-to-all.

Routing is dropless by default. With `model.moe.capacity_factor`, in training each expert takes
at most ceil(capacity_factor * tokens * top_k / num_experts) routes of the micro-batch (the
first ones, in token order); dropped routes add nothing (the residual carries the token on).
Evaluation and generation are always dropless, as transformers is.

Each forward leaves its router statistics on the module (`MoE.stats`): the weighted
load-balancing loss (Switch Transformer, with Mixtral's normalisation: num_experts *
sum_e tokens_e / tokens * mean probability_e, which is top_k when balanced) and z-loss (ST-MoE:
mean logsumexp(logits)^2), and each expert's share of the routes. `router_loss(model)` is their
mean over the MoE layers, which training adds to its objective.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dist_llm.config import ModelConfig


class SwiGLU(nn.Module):
    """The dense feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """`n` SwiGLU MLPs as stacked weights: w1 (gate) and w3 (up) [n, hidden, dim], w2 [n, dim, hidden]."""

    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, hidden))

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [sum(counts), dim] sorted by expert: counts[e] rows for expert e of this module."""
        out = []
        # Empty chunks too (an empty matmul is free): every expert's weights stay in the graph,
        # so each has a gradient on every rank, zero where it got no route.
        for e, chunk in enumerate(rows.split(counts)):
            h = F.silu(F.linear(chunk, self.w1[e])) * F.linear(chunk, self.w3[e])
            out.append(F.linear(h, self.w2[e]))
        return torch.cat(out)


def sort_routes(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kept routes of `experts` [N, k] in expert order, as flat route indices; the routes
    per expert [num_experts]). Dropped routes (expert -1) are left out."""
    flat = experts.flatten()
    kept = flat >= 0
    order = torch.argsort(torch.where(kept, flat, num_experts), stable=True)[: int(kept.sum())]
    return order, torch.bincount(flat[order], minlength=num_experts)


def combine(x: torch.Tensor, order: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum of its routes' expert outputs `rows` (in `order`), [N, dim]."""
    k = weights.shape[1]
    rows = rows * weights.flatten()[order, None].to(rows.dtype)
    return torch.zeros_like(x).index_add_(0, order // k, rows.to(x.dtype))


def local_dispatch(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, module: Experts
) -> torch.Tensor:
    """Every route of x [N, dim] to its expert (experts, weights [N, k]; a dropped route has
    weight 0 and expert -1), on this process; the weighted sum per token [N, dim]."""
    order, counts = sort_routes(experts, module.w1.shape[0])
    rows = module(x[order // experts.shape[1]], counts.tolist())
    return combine(x, order, rows, weights)


class RouterStats(NamedTuple):
    aux_loss: torch.Tensor  # load-balancing loss, before its coefficient
    z_loss: torch.Tensor
    load: torch.Tensor  # [num_experts] share of this micro-batch's routes per expert (detached)


class MoE(nn.Module):
    """The feed-forward of an MoE layer (model.moe): router, experts, optional shared expert."""

    # How routes reach their experts; expert parallelism replaces it (parallel/expert.py).
    dispatch = staticmethod(local_dispatch)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.moe = moe = config.moe
        self.router = nn.Linear(config.dim, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, config.dim, config.expert_hidden)
        if moe.shared_expert_hidden:
            self.shared = SwiGLU(config.dim, moe.shared_expert_hidden)
            self.shared_gate = nn.Linear(config.dim, 1, bias=False)
        self.stats: RouterStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        probs = F.softmax(logits.float(), dim=-1)
        weights, experts = probs.topk(self.moe.top_k, dim=-1)
        if self.moe.normalize_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        self.stats = router_stats(logits, probs, experts, self.moe.num_experts)
        if self.training and self.moe.capacity_factor is not None:
            experts, weights = drop_over_capacity(
                experts, weights, self.moe.num_experts, self.moe.capacity_factor
            )
        out = self.dispatch(x, experts, weights, self.experts)
        if self.moe.shared_expert_hidden:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.view(shape)


def router_stats(logits: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor, n: int) -> RouterStats:
    tokens = logits.shape[0]
    counts = torch.bincount(experts.flatten(), minlength=n).to(probs.dtype)
    aux = n * (counts / max(tokens, 1) * probs.mean(0)).sum()
    z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
    return RouterStats(aux, z, (counts / counts.sum().clamp(min=1)).detach())


def drop_over_capacity(experts, weights, n: int, factor: float):
    """Routes past each expert's capacity (in token order) dropped: expert -1, weight 0."""
    tokens, k = experts.shape
    capacity = max(1, int(-(-factor * tokens * k // n)))
    one_hot = F.one_hot(experts.flatten(), n)
    position = (one_hot.cumsum(0) * one_hot).sum(-1).view(tokens, k)  # 1-based, per expert
    kept = position <= capacity
    return torch.where(kept, experts, -1), torch.where(kept, weights, 0.0)


def inactive_params(config: ModelConfig) -> int:
    """Parameters a token does not use: the experts it is not routed to, in every MoE layer."""
    moe = config.moe
    layers = sum(moe.is_moe_layer(i) for i in range(config.n_layers))
    return layers * (moe.num_experts - moe.top_k) * 3 * config.dim * config.expert_hidden


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def router_loss(model: nn.Module) -> torch.Tensor | float:
    """The weighted router losses of the last forward, averaged over MoE layers (0.0 without)."""
    layers = [m for _, m in moe_layers(model) if m.stats is not None]
    if not layers:
        return 0.0
    total = sum(m.moe.aux_loss_coef * m.stats.aux_loss + m.moe.z_loss_coef * m.stats.z_loss for m in layers)
    return total / len(layers)
