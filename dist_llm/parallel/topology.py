"""Where this rank sits in the 3D layout: tensor x pipeline x data parallel.

DeepSpeed's `PipeModelDataParallelTopology` orders the axes (pipe, data, model): tensor-parallel
ranks are adjacent (inside one node, where the bandwidth is), data-parallel replicas next, and
pipeline stages outermost. Its `PipelineParallelGrid` builds the process groups and is the
`mpu` DeepSpeed asks for data-parallel and tensor-parallel groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_llm.config import Config, ConfigError
from dist_llm.parallel.tensor import TensorParallel


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    tensor: TensorParallel  # this rank's TP rank/size/group
    stage: int = 0
    dp_rank: int = 0
    grid: object | None = None  # DeepSpeed's PipelineParallelGrid when tp * pp > 1
    topology: object | None = None

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
        return {"tensor": self.tp, "pipeline": self.pp, "data": self.dp}

    def rank_of_dp(self, dp_rank: int) -> int:
        """The global rank at (first stage, TP rank 0) of data-parallel replica `dp_rank`."""
        if self.topology is None:
            return dp_rank
        return self.topology.get_rank(pipe=0, data=dp_rank, model=0)

    def describe(self) -> str:
        return f"tp{self.tp} x pp{self.pp} x dp{self.dp}"


def data_parallel_size(config: Config, world_size: int) -> int:
    """World size / (tp * pp), or a ConfigError naming what to change."""
    tp, pp = config.parallel.tensor, config.parallel.pipeline
    if world_size % (tp * pp):
        raise ConfigError(
            f"parallel.tensor={tp} x parallel.pipeline={pp} = {tp * pp} must divide the number of "
            f"processes ({world_size}); change the process count or the layout"
        )
    return world_size // (tp * pp)


def build_layout(config: Config, rank: int, world_size: int) -> Layout:
    """The layout of this rank. Builds the process groups (a collective) when tp * pp > 1."""
    tp, pp = config.parallel.tensor, config.parallel.pipeline
    dp = data_parallel_size(config, world_size)
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
