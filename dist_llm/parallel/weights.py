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

from dist_llm.config import ModelConfig
from dist_llm.model.llama import initial_value
from dist_llm.parallel.tensor import TensorParallel

# name in the plain model -> full tensor
Source = Callable[[str], torch.Tensor]


def init_source(config: ModelConfig, seed: int) -> Source:
    from dist_llm.model.llama import Llama

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama(config).named_parameters(remove_duplicate=False)}

    def full(name: str) -> torch.Tensor:
        if name == "output.weight" and config.tie_embeddings:
            name = "tok_embeddings.weight"
        return initial_value(name, shapes[name], config, seed)

    return full


def checkpoint_source(path: str | Path, config: ModelConfig) -> Source:
    """Full tensors read one at a time from a checkpoint's model.safetensors (no unpickling)."""
    from safetensors import safe_open

    from dist_llm.train.checkpoint import WEIGHTS, check_model_matches, saved_config

    check_model_matches(saved_config(path).model, config, path)
    handle = safe_open(str(Path(path) / WEIGHTS), framework="pt")

    def full(name: str) -> torch.Tensor:
        if name == "output.weight" and config.tie_embeddings:
            name = "tok_embeddings.weight"
        return handle.get_tensor(name)

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
    rows = param.shape[dim] * tp.size
    if full.shape[dim] < rows:  # vocabulary padded to a multiple of the TP size
        pad = list(full.shape)
        pad[dim] = rows - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    return full.chunk(tp.size, dim=dim)[tp.rank]


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
    return module


def _parallel_attributes(param: torch.Tensor) -> dict:
    return {k: getattr(param, k) for k in ("tp_dim", "model_parallel") if hasattr(param, k)}


def local_parameters(module: nn.Module, pipelined: bool) -> Iterator[tuple[str, nn.Parameter]]:
    """(plain name, parameter) of every parameter this rank holds; a tied pair appears once."""
    seen = set()
    for name, param in module.named_parameters():
        plain = plain_name(name, pipelined)
        if plain not in seen:
            seen.add(plain)
            yield plain, param


def gather_full(
    module: nn.Module,
    config: ModelConfig,
    tp: TensorParallel,
    pipe_group,
    pipelined: bool,
    value: Callable[[nn.Parameter], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The plain model's full tensors, on every rank (a collective over the whole world).

    `value(param)` gives this rank's full-over-data-parallel value of a local parameter (the
    fp32 master weight, or an optimizer state); shards are concatenated over the TP group and
    the stages' tensors exchanged over the pipeline group."""
    mine = {}
    for name, param in local_parameters(module, pipelined):
        local = value(param).float().cpu()
        dim = getattr(param, "tp_dim", None)
        if dim is not None and tp.size > 1:
            send = local.to(param.device).contiguous()
            parts = [torch.empty_like(send) for _ in range(tp.size)]
            dist.all_gather(parts, send, group=tp.group)
            local = torch.cat([p.cpu() for p in parts], dim=dim)
            if name in ("tok_embeddings.weight", "output.weight"):
                local = local.narrow(dim, 0, config.vocab_size)
        mine[name] = local
    if pipe_group is not None and dist.get_world_size(pipe_group) > 1:
        stages: list = [None] * dist.get_world_size(pipe_group)
        dist.all_gather_object(stages, mine, group=pipe_group)
        for stage in stages:
            for name, tensor in stage.items():
                mine.setdefault(name, tensor)
    if config.tie_embeddings:
        mine["output.weight"] = mine["tok_embeddings.weight"]
    return mine
