"""A model that computes beside the one being trained, without gradients: distillation's
teacher, DPO's reference. A full copy on every rank, in eval mode, in the training dtype (known
once train.dtype=auto is resolved, so it follows the logits it is compared with)."""

from __future__ import annotations

import os

import torch

from dist_llm.checkpoint import load_model


def local_device() -> torch.device:
    """This rank's device before the process group exists (torch.cuda.set_device is not yet called)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


class Frozen:
    def __init__(self, path):
        self.model, self.config, _ = load_model(path, local_device())
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, dtype: torch.dtype, **inputs) -> torch.Tensor:
        self.model.to(dtype)
        return self.model(input_ids, **inputs)
