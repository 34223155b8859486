"""Moving weights between the plain model's full tensors and a rank's parallel shards.

Parallel modules are built on the meta device (no memory), then `materialize` fills every
parameter a rank holds from a *source* of full tensors named as in the plain model: the
deterministic initializer or a checkpoint's safetensors file. `gather_full` is the inverse:
the plain model's full state dict assembled from the shards of every rank. Both are layout
independent, which is what lets a checkpoint move between layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dist_llm.checkpoint.format import WEIGHTS, check_model_matches, saved_config
from dist_llm.config import ModelConfig
from dist_llm.model.llama import initial_value
from dist_llm.model.roles import pad_vocab, role_of, stored_name, tie
from dist_llm.parallel.tensor import TensorParallel, sum_sequence_parallel_grads
from dist_llm.parallel.topology import Layout

# name in the plain model -> full tensor
Source = Callable[[str], torch.Tensor]


def init_source(config: ModelConfig, seed: int) -> Source:
    from dist_llm.model.llama import Llama

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama(config).named_parameters(remove_duplicate=False)}

    def full(name: str) -> torch.Tensor:
        name = stored_name(name, config)
        return initial_value(name, shapes[name], config, seed)

    return full


def checkpoint_source(path: str | Path, config: ModelConfig) -> Source:
    """Full tensors read one at a time from a checkpoint's model.safetensors (no unpickling)."""
    from safetensors import safe_open

    check_model_matches(saved_config(path).model, config, path)
    handle = safe_open(str(Path(path) / WEIGHTS), framework="pt")

    def full(name: str) -> torch.Tensor:
        return handle.get_tensor(stored_name(name, config))

    return full


def plain_name(name: str, pipelined: bool) -> str:
    """The plain model's name of a parameter of a parallel module.

    Pipeline stages keep plain names below their index ("3.layers.2.attention.wq.weight"),
    and tied modules live under "tied_modules.<key>."."""
    if not pipelined:
        return name
    parts = name.split(".")
    return ".".join(parts[2:] if parts[0] == "tied_modules" else parts[1:])


def shard_of(full: torch.Tensor, param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    dim = getattr(param, "tp_dim", None)
    if dim is None:
        return full
    rows = getattr(param, "ds_shape", param.shape)[dim] * tp.size  # ZeRO-3 empties param.shape
    # Only the vocabulary has fewer rows than its shards: it is padded to a multiple of the TP size.
    return pad_vocab(full, dim, rows).chunk(tp.size, dim=dim)[tp.rank]


@torch.no_grad()
def materialize(module: nn.Module, source: Source, tp: TensorParallel, device, pipelined: bool = False):
    """Allocate the meta parameters of `module` on `device` and fill them from `source`."""
    attributes = {name: _parallel_attributes(p) for name, p in module.named_parameters()}
    shared: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for key, p in sub._parameters.items():
            if p is not None:
                shared.setdefault(id(p), []).append((sub, key))
    module.to_empty(device=device)  # allocates a new tensor per module: tied weights come apart
    for (owner, key), *others in shared.values():
        for sub, other_key in others:
            setattr(sub, other_key, getattr(owner, key))
    for name, param in module.named_parameters():
        for key, value in attributes[name].items():
            setattr(param, key, value)
        param.copy_(shard_of(source(plain_name(name, pipelined)), param, tp))
    for sub in module.modules():
        if hasattr(sub, "reset_buffers"):
            sub.reset_buffers()
    sum_sequence_parallel_grads(module, tp)
    return module


def _parallel_attributes(param: torch.Tensor) -> dict:
    keys = ("tp_dim", "model_parallel", "sequence_parallel")
    return {k: getattr(param, k) for k in keys if hasattr(param, k)}


def local_parameters(module: nn.Module, pipelined: bool) -> Iterator[tuple[str, nn.Parameter]]:
    """(plain name, parameter) of every parameter this rank holds; a tied pair appears once."""
    seen = set()
    for name, param in module.named_parameters():
        plain = plain_name(name, pipelined)
        if plain not in seen:
            seen.add(plain)
            yield plain, param


def gather_full(
    module: nn.Module, config: ModelConfig, layout: Layout, value: Callable[[nn.Parameter], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The plain model's full tensors on global rank 0, {} on every other rank (a collective:
    all ranks must call it).

    `value(param)` gives a local parameter's value whole over the data-parallel group (the fp32
    master weight or an optimizer state; itself a collective under ZeRO). TP shards are joined
    one parameter at a time and kept only by TP rank 0 of data-parallel replica 0; the stages'
    tensors then travel to stage 0. No rank but rank 0 ever holds more than one full tensor."""
    keep = layout.dp_rank == 0 and layout.tensor.rank == 0
    mine = {}
    for name, param in local_parameters(module, layout.pipelined):
        local = value(param).float()
        dim = getattr(param, "tp_dim", None)
        if dim is not None and layout.tp > 1:
            local = local.contiguous()
            parts = [torch.empty_like(local) for _ in range(layout.tp)]
            dist.all_gather(parts, local, group=layout.tensor.group)
            local = torch.cat(parts, dim=dim)
            if role_of(name).vocab:
                local = local.narrow(dim, 0, config.vocab_size)  # drop the padding rows
        if keep:
            mine[name] = local.cpu().clone()
    if keep and layout.pipelined:  # only these pipeline groups hold anything worth sending
        group = layout.pipe_group
        stages: list | None = [None] * layout.pp if layout.is_first_stage else None
        dist.gather_object(mine, stages, dst=dist.get_global_rank(group, 0), group=group)
        for stage in stages or []:
            for name, tensor in stage.items():
                mine.setdefault(name, tensor)
    if not (keep and layout.is_first_stage):
        return {}
    return tie(mine, config)
