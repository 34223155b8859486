"""Process-group setup shared by every stage, whatever started the processes.

torchrun, the deepspeed launcher and `accelerate launch` export RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; a plain `python -m dist_llm ...` has none and runs as a world of one.
CUDA machines use NCCL with one GPU per process; CPU machines use gloo.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(timeout_s: float = 1800.0) -> World:
    """Start (or join) the default process group and pick this process's device."""
    if "RANK" not in os.environ:  # a single process started by hand
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        # DeepSpeed's own init wires its comm layer (and the fast shared-memory allreduce on CPU).
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.size > 1:
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_objects(obj, world: World) -> list:
    if world.size == 1:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish_process(code: int = 0) -> None:
    """End a distributed process once its work is done and flushed.

    With DeepSpeed's CPU shared-memory allreduce loaded, interpreter teardown intermittently dies
    with "terminate called without an active exception" (SIGABRT) after all work succeeded (seen
    in about 1 of 12 two-rank runs here; ../shared/notes/deepspeed-on-cpu.md reports it for
    ZeRO-3). Skipping the teardown keeps a successful run's exit status 0.
    """
    import logging
    import sys

    shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
