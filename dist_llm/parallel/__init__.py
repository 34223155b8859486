"""Parallelism applied to the plain model, one file per dimension.

- `topology.py`: this rank's (tensor, context, pipeline, data) coordinates and process groups;
- `tensor.py`: Megatron-style layers and the plan that swaps them into the model;
- `context.py`: each sequence split over ranks, attention through Ulysses' all-to-alls;
- `expert.py`: MoE experts split over ranks, tokens exchanged by all-to-all;
- `pipeline.py`: the model sliced into DeepSpeed pipeline stages;
- `weights.py`: full tensors <-> this rank's shards (initialization, loading, gathering).

Data parallelism (and ZeRO's partitioning of it) is DeepSpeed's, in `train/engine.py`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dist_llm.config import ModelConfig
from dist_llm.model.llama import Llama, lm_loss
from dist_llm.parallel.context import apply_context_parallel, context_chunk, context_loss, model_inputs
from dist_llm.parallel.expert import apply_expert_parallel, average_over_expert_group
from dist_llm.parallel.pipeline import build_pipeline, pipeline_inputs
from dist_llm.parallel.tensor import apply_tensor_parallel, vocab_parallel_cross_entropy
from dist_llm.parallel.topology import Layout, build_layout, data_parallel_size
from dist_llm.parallel.weights import Source, checkpoint_source, gather_full, init_source, materialize

__all__ = [
    "Layout",
    "build_layout",
    "build_model",
    "checkpoint_source",
    "context_chunk",
    "data_parallel_size",
    "gather_full",
    "init_source",
    "loss_function",
    "model_inputs",
    "pipeline_inputs",
]


def loss_function(layout: Layout, reduction: str = "mean"):
    """Next-token cross-entropy of (this rank's) logits and the labels; under context
    parallelism a mean is over the whole context group's labels."""
    if layout.cp > 1 and reduction == "mean":
        return context_loss(loss_function(layout, "sum"), layout.context)
    if layout.tp == 1:
        return functools.partial(lm_loss, reduction=reduction)
    return functools.partial(vocab_parallel_cross_entropy, tp=layout.tensor, reduction=reduction)


def build_model(config: ModelConfig, layout: Layout, source: Source, device) -> nn.Module:
    """This rank's part of the model: the whole plain model, its tensor-parallel shards, or a
    pipeline stage (of shards), with weights from `source`."""
    if layout.pipelined:
        return build_pipeline(config, layout, source, device, loss_function(layout))
    with torch.device("meta"):
        model = Llama(config)
    if layout.tp > 1:
        apply_tensor_parallel(model, layout.tensor)
    apply_context_parallel(model, layout.context)
    apply_expert_parallel(model, layout.expert)
    model = materialize(model, source, layout.tensor, device)
    average_over_expert_group(model, layout.expert)
    return model
