"""Where this rank sits in the layout: tensor x context x pipeline x data parallel.

DeepSpeed's `PipeModelDataParallelTopology` orders the axes (pipe, data, model): tensor-parallel
ranks are adjacent (inside one node, where the bandwidth is), data-parallel replicas next, and
pipeline stages outermost. Its `PipelineParallelGrid` builds the process groups and is the
`mpu` DeepSpeed asks for data-parallel and tensor-parallel groups.

Context parallelism adds an axis between data and model (its all-to-alls move more than the
data-parallel reductions, less than TP's all-reduces): (pipe, data, context, model). DeepSpeed's
grid knows no such axis, so `ContextGrid` is the mpu then: DeepSpeed reads its sequence-parallel
group (Ulysses' name for it) and reduces gradients and partitions ZeRO over data x context, while
its data-parallel size (the batch arithmetic) stays the number of distinct batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_llm.config import Config, ConfigError
from dist_llm.parallel.context import ContextParallel
from dist_llm.parallel.expert import ExpertParallel
from dist_llm.parallel.tensor import TensorParallel


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    tensor: TensorParallel  # this rank's TP rank/size/group
    stage: int = 0
    dp_rank: int = 0
    grid: object | None = None  # DeepSpeed's mpu: its PipelineParallelGrid, or a ContextGrid
    topology: object | None = None
    context: ContextParallel = field(default_factory=ContextParallel)  # this rank's CP rank/size/group
    # this rank's EP rank/size/group; dp (distinct batches) counts the expert-parallel ranks too
    expert: ExpertParallel = field(default_factory=ExpertParallel)

    @property
    def ep(self) -> int:
        return self.expert.size

    @property
    def deepspeed_dp(self) -> int:
        """DeepSpeed's data-parallel size: the ranks holding the same experts."""
        return self.dp // self.ep

    @property
    def cp(self) -> int:
        return self.context.size

    @property
    def pipelined(self) -> bool:
        return self.pp > 1

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def pipe_group(self):
        return self.grid.get_pipe_parallel_group() if self.grid is not None and self.pp > 1 else None

    def sizes(self) -> dict:
        """The layout a checkpoint records (`context` only where there is context parallelism,
        so checkpoints without it are written as before)."""
        sizes = {"tensor": self.tp, "pipeline": self.pp, "data": self.dp}
        sizes = {**sizes, "context": self.cp} if self.cp > 1 else sizes
        return {**sizes, "expert": self.ep} if self.ep > 1 else sizes

    def rank_of_dp(self, dp_rank: int) -> int:
        """The global rank at (first stage, TP rank 0, CP rank 0) of data-parallel replica `dp_rank`."""
        if self.topology is None:
            return dp_rank * self.cp
        origin = {axis: 0 for axis in self.topology.get_axis_names()}
        return self.topology.get_rank(**{**origin, "data": dp_rank})

    def describe(self) -> str:
        context = f" x cp{self.cp}" if self.cp > 1 else ""
        expert = f" (ep{self.ep} within dp)" if self.ep > 1 else ""
        return f"tp{self.tp} x pp{self.pp}{context} x dp{self.dp}{expert}"


def data_parallel_size(config: Config, world_size: int) -> int:
    """World size / (tp * pp * cp), or a ConfigError naming what to change."""
    tp, pp, cp = config.parallel.tensor, config.parallel.pipeline, config.parallel.context
    if world_size % (tp * pp * cp):
        context = f" x parallel.context={cp}" if cp > 1 else ""
        raise ConfigError(
            f"parallel.tensor={tp} x parallel.pipeline={pp}{context} = {tp * pp * cp} must divide the number of "
            f"processes ({world_size}); change the process count or the layout"
        )
    dp = world_size // (tp * pp * cp)
    ep = config.parallel.expert
    if dp % ep:
        raise ConfigError(
            f"parallel.expert={ep} must divide the {dp} data-parallel ranks (expert-parallel groups are "
            "carved out of them); change the process count or parallel.expert"
        )
    return dp


def build_layout(config: Config, rank: int, world_size: int) -> Layout:
    """The layout of this rank. Builds the process groups (a collective) when tp * pp > 1."""
    tp, pp = config.parallel.tensor, config.parallel.pipeline
    dp = data_parallel_size(config, world_size)
    if config.parallel.context > 1:
        return _context_layout(config, rank, dp)
    if config.parallel.expert > 1:
        return _expert_layout(config, rank, dp)
    if tp * pp == 1:
        return Layout(tp=1, pp=1, dp=dp, tensor=TensorParallel(), dp_rank=rank)
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    coord = topology.get_coord(rank)
    tensor = TensorParallel(rank=coord.model, size=tp, sequence_parallel=config.parallel.sequence_parallel)
    layout = Layout(tp, pp, dp, tensor, stage=coord.pipe, dp_rank=coord.data, topology=topology)
    if pp == 1:  # a pipeline builds its own grid; the plain model needs one as DeepSpeed's mpu
        layout.grid = PipelineParallelGrid(topology=topology)
        tensor.group = layout.grid.get_slice_parallel_group()
    return layout


def _context_layout(config: Config, rank: int, dp: int) -> Layout:
    """The layout of a run with context parallelism (pp = 1: config.check refuses pipelines)."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    tp, cp = config.parallel.tensor, config.parallel.context
    topology = ProcessTopology(axes=["pipe", "data", "context", "model"], dims=[1, dp, cp, tp])
    coord = topology.get_coord(rank)
    grid = ContextGrid(topology, rank)
    tensor = TensorParallel(rank=coord.model, size=tp, group=grid.groups["model"])
    context = ContextParallel(rank=coord.context, size=cp, group=grid.groups["context"])
    return Layout(tp, 1, dp, tensor, dp_rank=coord.data, grid=grid, topology=topology, context=context)


def _expert_layout(config: Config, rank: int, dp: int) -> Layout:
    """Expert parallelism (tp = pp = cp = 1: config.check refuses the others): adjacent ranks
    form an expert group. DeepSpeed's mpu is a ContextGrid whose "model" axis is that group
    (parallel/expert.py says why) and whose data axis the ranks holding the same experts."""
    from deepspeed.runtime.pipe.topology import ProcessTopology

    ep = config.parallel.expert
    topology = ProcessTopology(axes=["pipe", "data", "context", "model"], dims=[1, dp // ep, 1, ep])
    grid = ContextGrid(topology, rank)
    expert = ExpertParallel(rank=topology.get_coord(rank).model, size=ep, group=grid.groups["model"])
    return Layout(1, 1, dp, TensorParallel(), dp_rank=rank, grid=grid, expert=expert)


class ContextGrid:
    """DeepSpeed's mpu for a layout with context parallelism: the groups of each axis, and of
    data x context, in the names DeepSpeed asks for.

    DeepSpeed averages gradients over `get_sequence_data_parallel_group` dividing by its size
    over the sequence-parallel size: summed over context ranks (each holds part of the loss),
    averaged over data-parallel ones. ZeRO partitions over the same group. Its model-parallel
    group must stay the TP group: DeepSpeed sums gradient norms over it."""

    AXES = ("data", "context", "model", "pipe", ("data", "context"))

    def __init__(self, topology, rank: int):
        import torch.distributed as dist

        self.rank = rank
        self.groups, self.members = {}, {}
        for axes in self.AXES:  # every rank creates every group, in the same order
            key = axes if isinstance(axes, str) else "+".join(axes)
            for ranks in _comm_lists(topology, (axes,) if isinstance(axes, str) else axes):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    self.groups[key], self.members[key] = group, ranks

    def _rank(self, key: str) -> int:
        return self.members[key].index(self.rank)

    def _size(self, key: str) -> int:
        return len(self.members[key])

    # data parallel: distinct batches (DeepSpeed's batch-size arithmetic)
    def get_data_parallel_group(self):
        return self.groups["data"]

    def get_data_parallel_rank(self) -> int:
        return self._rank("data")

    def get_data_parallel_world_size(self) -> int:
        return self._size("data")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.members["data"]

    # tensor parallel, which is all the model parallelism there is without a pipeline
    def get_model_parallel_group(self):
        return self.groups["model"]

    def get_model_parallel_rank(self) -> int:
        return self._rank("model")

    def get_model_parallel_world_size(self) -> int:
        return self._size("model")

    get_slice_parallel_group = get_tensor_model_parallel_group = get_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_pipe_parallel_group(self):
        return self.groups["pipe"]

    def get_pipe_parallel_rank(self) -> int:
        return 0

    def get_pipe_parallel_world_size(self) -> int:
        return 1

    # context parallel (DeepSpeed: sequence parallel), and data x context
    def get_sequence_parallel_group(self):
        return self.groups["context"]

    def get_sequence_parallel_rank(self) -> int:
        return self._rank("context")

    def get_sequence_parallel_world_size(self) -> int:
        return self._size("context")

    def get_sequence_data_parallel_group(self):
        return self.groups["data+context"]

    def get_sequence_data_parallel_rank(self) -> int:
        return self._rank("data+context")

    def get_sequence_data_parallel_world_size(self) -> int:
        return self._size("data+context")


def _comm_lists(topology, axes: tuple[str, ...]) -> list[list[int]]:
    """The rank lists that differ only along `axes`, one per combination of the other axes."""
    import itertools

    others = [a for a in topology.get_axis_names() if a not in axes]
    lists = []
    for values in itertools.product(*(range(topology.get_dim(a)) for a in others)):
        lists.append(sorted(topology.filter_match(**dict(zip(others, values, strict=True)))))
    return lists
