"""Independent references for the multi-process tests: a plain single-process PyTorch loop, and
the loss curve a run wrote."""

from __future__ import annotations

import json

import torch

from dist_llm.config import Config
from dist_llm.model.llama import Llama, lm_loss
from dist_llm.model.moe import router_loss
from dist_llm.train.schedule import lr_multiplier


def single_process_training(
    cfg: Config,
    batches: torch.Tensor,
    documents: torch.Tensor | None = None,
    unscored: int = 0,
    ranks: int = 1,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch: the model, AdamW (decay on matrices), clipping and the LR schedule of
    `cfg`, one optimizer step per batch of [batch, seq + 1] tokens (whose rows pack the
    documents `documents` [batch, seq] says, if given; the first `unscored` positions of each
    row labelled -100). Returns (losses, weights).

    A mixture of experts adds its router losses, which depend on which tokens are routed
    together: as `ranks` data-parallel ranks would, the batch is run in that many equal parts,
    each with its own router loss, and their mean is the objective."""
    model = Llama(cfg.model, seed=cfg.train.seed)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": o.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        foreach=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(o, cfg.train.steps))
    losses = []
    for tokens in batches:
        parts = zip(
            tokens.chunk(ranks), [None] * ranks if documents is None else documents.chunk(ranks), strict=True
        )
        loss = objective = 0.0
        for part, docs in parts:
            part_loss = lm_loss(model(part[:, :-1], document_ids=docs), labels_of(part, unscored))
            loss, objective = loss + part_loss / ranks, objective + (part_loss + router_loss(model)) / ranks
        opt.zero_grad()
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def labels_of(tokens: torch.Tensor, unscored: int = 0) -> torch.Tensor:
    """Next-token labels of [batch, seq + 1] tokens, the first `unscored` positions not scored."""
    labels = tokens[:, 1:].clone()
    labels[:, :unscored] = -100
    return labels


def train_losses(out) -> dict[int, float]:
    """step -> train loss from a run folder's metrics.jsonl (a resumed run appends: last wins;
    {} before the run has written any)."""
    found = {}
    if not (out / "metrics.jsonl").exists():
        return found
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            found[row["step"]] = row["train/loss"]
    return found
