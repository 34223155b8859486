"""Moving weights between the plain model's full tensors and a rank's parallel shards.

Parallel modules are built on the meta device (no memory), then `materialize` fills every
parameter a rank holds from a *source* named as in the plain model: the deterministic
initializer, a weights-only checkpoint's safetensors file (full tensors, sliced here), or a
training checkpoint's shards (only this rank's slices are read). `full_pieces` says which
rectangles of a full tensor a flat range of a rank's slice is: what a sharded checkpoint
writes and reads. `gather_full` assembles the plain model's full state dict from every
rank (tests and small tensors only). All are layout independent, which is what lets a
checkpoint move between layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dist_llm.checkpoint import sharded
from dist_llm.checkpoint.format import SHARDS, WEIGHTS, check_model_matches, is_sharded, saved_config
from dist_llm.config import ModelConfig
from dist_llm.model.llama import initial_value
from dist_llm.model.roles import pad_vocab, role_of, stored_name, tie
from dist_llm.parallel.tensor import TensorParallel, sum_sequence_parallel_grads
from dist_llm.parallel.topology import Layout

# name in the plain model -> full tensor
FullTensor = Callable[[str], torch.Tensor]


class Source:
    """Fills a rank's parameters (plain-model names) with their values in this layout."""

    def fill(self, params: list[tuple[str, nn.Parameter]], tp: TensorParallel) -> None:
        raise NotImplementedError


class FullSource(Source):
    """From full tensors, one at a time, each cut to this rank's slice."""

    def __init__(self, full: FullTensor):
        self.full = full

    def fill(self, params, tp) -> None:
        for name, param in params:
            param.copy_(shard_of(self.full(name), param, tp))


class ShardSource(Source):
    """From a sharded checkpoint: each rank reads the rectangles of its own slices only."""

    def __init__(self, folder: Path, config: ModelConfig):
        self.folder, self.config = folder, config
        self.shapes = sharded.specs(folder)

    def fill(self, params, tp) -> None:
        wanted = {}
        for name, param in params:
            key = f"model/{stored_name(name, self.config)}"
            shape = self.shapes[key][0]
            param.zero_()  # the vocabulary's padding rows are in no checkpoint
            flat = param.view(-1)
            pieces = [
                sharded.Piece(offsets, flat[lo:hi].view(sizes))
                for offsets, sizes, lo, hi in full_pieces(param, tp, shape, 0, flat.numel())
            ]
            wanted.setdefault(key, sharded.Sharded(shape, [])).pieces.extend(pieces)
        sharded.load(self.folder, wanted)


def init_source(config: ModelConfig, seed: int) -> Source:
    from dist_llm.model.llama import Llama

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama(config).named_parameters(remove_duplicate=False)}

    def full(name: str) -> torch.Tensor:
        name = stored_name(name, config)
        return initial_value(name, shapes[name], config, seed)

    return FullSource(full)


def checkpoint_source(path: str | Path, config: ModelConfig) -> Source:
    """A checkpoint's weights: its shards (training checkpoints) or its model.safetensors
    (weights-only ones), read one tensor or one slice at a time (no unpickling)."""
    from safetensors import safe_open

    # Resumes are checked strictly before this (train/checkpoint.check_resumable); weights to
    # start from may be used at another context length.
    check_model_matches(saved_config(path).model, config, path, weights_only=True)
    if is_sharded(path):
        return ShardSource(Path(path) / SHARDS, config)
    handle = safe_open(str(Path(path) / WEIGHTS), framework="pt")
    return FullSource(lambda name: handle.get_tensor(stored_name(name, config)))


def full_pieces(
    param: torch.Tensor, tp: TensorParallel, full_shape, start: int, numel: int
) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int]]:
    """The rectangles of the full (unpadded) tensor that elements [start, start + numel) of this
    rank's slice of it, flattened, are: (offsets, sizes, lo, hi) with [lo, hi) the range of
    those numel elements each rectangle holds. A ZeRO partition of a slice is up to three
    (a partial row, whole rows, a partial row); the vocabulary's padding rows are none."""
    shape = tuple(getattr(param, "ds_shape", param.shape))
    base = [0] * len(shape)
    dim = getattr(param, "tp_dim", None)
    if dim is not None:
        base[dim] = tp.rank * shape[dim]
    if hasattr(param, "expert_shard"):  # this rank's experts: a range of the stack's dim 0
        base[0] = param.expert_shard[0] * shape[0]
    out = []
    for offsets, sizes, lo in _flat_range_rectangles(shape, start, numel):
        offsets = tuple(o + b for o, b in zip(offsets, base, strict=True))
        rows = min(sizes[0], full_shape[0] - offsets[0])  # dim 0 is outermost: a prefix stays
        if rows > 0:
            sizes = (rows, *sizes[1:])
            out.append((offsets, sizes, lo, lo + math.prod(sizes)))
    return out


def _flat_range_rectangles(shape, start: int, numel: int):
    """(offsets, sizes, index of the first element in the range) of each rectangle: a partial
    first row (itself rectangles of a row), whole rows, a partial last row."""
    if numel <= 0:
        return []
    if len(shape) == 1:
        return [((start,), (numel,), 0)]
    inner, end = math.prod(shape[1:]), start + numel
    (r0, c0), (r1, c1) = divmod(start, inner), divmod(end, inner)

    def within(row: int, lo: int, hi: int, first: int):
        return [((row, *o), (1, *s), first + i) for o, s, i in _flat_range_rectangles(shape[1:], lo, hi - lo)]

    if r0 == r1:
        return within(r0, c0, c1, 0)
    out, lo = [], 0
    if c0:
        out += within(r0, c0, inner, 0)
        lo, r0 = inner - c0, r0 + 1
    if r1 > r0:
        out.append(((r0, *[0] * (len(shape) - 1)), (r1 - r0, *shape[1:]), lo))
        lo += (r1 - r0) * inner
    if c1:
        out += within(r1, 0, c1, lo)
    return out


def plain_name(name: str, pipelined: bool) -> str:
    """The plain model's name of a parameter of a parallel module.

    Pipeline stages keep plain names below their index ("3.layers.2.attention.wq.weight"),
    and tied modules live under "tied_modules.<key>."."""
    if not pipelined:
        return name
    parts = name.split(".")
    return ".".join(parts[2:] if parts[0] == "tied_modules" else parts[1:])


def shard_of(full: torch.Tensor, param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    if hasattr(param, "expert_shard"):
        rank, size = param.expert_shard
        return full.chunk(size, dim=0)[rank]
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
    params = []
    for name, param in module.named_parameters():
        for key, value in attributes[name].items():
            setattr(param, key, value)
        params.append((plain_name(name, pipelined), param))
    source.fill(params, tp)
    for sub in module.modules():
        if hasattr(sub, "reset_buffers"):
            sub.reset_buffers()
    sum_sequence_parallel_grads(module, tp)
    return module


def _parallel_attributes(param: torch.Tensor) -> dict:
    keys = ("tp_dim", "model_parallel", "sequence_parallel", "expert_shard")
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
    module: nn.Module,
    config: ModelConfig,
    layout: Layout,
    value: Callable[[nn.Parameter], torch.Tensor],
    only: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The plain model's full tensors on global rank 0, {} on every other rank (a collective:
    all ranks must call it).

    `value(param)` gives a local parameter's value whole over the data-parallel group (the fp32
    master weight or an optimizer state; itself a collective under ZeRO). TP shards are joined
    one parameter at a time and kept only by TP (and CP) rank 0 of data-parallel replica 0; the stages'
    tensors then travel to stage 0. No rank but rank 0 ever holds more than one full tensor.
    `only` limits it to some plain names (the embedding for TensorBoard's projector)."""
    keep = layout.dp_rank == 0 and layout.tensor.rank == 0 and layout.context.rank == 0
    mine = {}
    for name, param in local_parameters(module, layout.pipelined):
        if only is not None and name not in only:
            continue
        local = value(param).float()
        dim = getattr(param, "tp_dim", None)
        if dim is not None and layout.tp > 1:
            local = local.contiguous()
            parts = [torch.empty_like(local) for _ in range(layout.tp)]
            dist.all_gather(parts, local, group=layout.tensor.group)
            local = torch.cat(parts, dim=dim)
            if role_of(name).vocab:
                local = local.narrow(dim, 0, config.vocab_size)  # drop the padding rows
        if hasattr(param, "expert_shard") and layout.ep > 1:
            parts = [torch.empty_like(local) for _ in range(layout.ep)]
            dist.all_gather(parts, local.contiguous(), group=layout.expert.group)
            local = torch.cat(parts)
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
