"""The training run's state in one object: what the loop advances and every hook reads."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist_llm.config import Config
from dist_llm.distributed import World
from dist_llm.errors import TrainingDiverged
from dist_llm.parallel import Layout
from dist_llm.precision import Precision
from dist_llm.train import checkpoint
from dist_llm.train.metrics import Metrics

# What the loop minimizes: pretraining and fine-tuning (next-token cross-entropy, masked where
# labels are -100), distillation (KL to a teacher), DPO (train/dpo.py), ... `objective(logits, batch) -> loss`.
Objective = Callable[[torch.Tensor, dict], torch.Tensor]
# Batches other than the shards of data.sources (DPO's pairs): `loader(layout)` -> an iterable
# with state_dict() / load_state_dict(), as dist_llm.data.stream's loader.
Loader = Callable[[Layout], Any]


@dataclasses.dataclass
class Run:
    config: Config
    world: World
    layout: Layout
    engine: Any  # a DeepSpeed engine (a PipelineEngine when pipelined)
    loader: Any  # dist_llm.data.stream's loader: iterable, with state_dict()
    metrics: Metrics
    objective: Objective
    precision: Precision
    tokenizer_dir: Path | None
    started: float  # time.monotonic() when run_train began (train.max_minutes counts from it)
    step: int = 0
    tokens: int = 0
    first_step: int = 0  # the step this process started at (after a resume)
    last_good: Path | None = None  # the newest complete checkpoint of this run
    loss: float | None = None  # the last step's training loss, averaged over the world
    grad_norm: float = 0.0
    val_loss: float | None = None
    val_step: int | None = None
    stopped: str | None = None  # why the loop ended before train.steps (the user's budget)
    saver: checkpoint.Saver | None = None  # built by start() once the process group exists
    saved_step: int | None = None  # the step of the last save started (complete or in flight)

    @property
    def tokens_per_step(self) -> int:
        t = self.config.train
        rows = getattr(self.loader, "rows_per_sample", 1)  # DPO: a pair is two rows
        return t.micro_batch_size * rows * t.grad_accum * self.layout.dp * self.config.data.seq_len

    @property
    def done(self) -> bool:
        return self.step >= self.config.train.steps or self.stopped is not None

    def record(self, loss: float) -> None:
        """One optimizer step is done: count it, and refuse to go on from a diverged one."""
        self.step += 1
        self.tokens += self.tokens_per_step
        self.loss = loss
        self.grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        # fp16's loss scaler skips steps with inf gradients by design; elsewhere they are fatal.
        bad_norm = self.config.train.dtype != "fp16" and not math.isfinite(self.grad_norm)
        if not math.isfinite(loss) or bad_norm:
            raise TrainingDiverged(
                f"loss {loss}, gradient norm {self.grad_norm} at step {self.step}; stopped without saving. "
                f"Last good checkpoint: {self.last_good or 'none'} "
                "(lower optim.lr or raise optim.warmup_steps, then resume from it)"
            )

    def save(self, wait: bool = False) -> Path:
        """Checkpoint this step (a collective), unless it already is; with `wait` (or without
        checkpoint.async_save) it is complete on return. Returns the newest complete one."""
        if self.saved_step != self.step and (
            self.last_good is None or self.last_good.name != f"step_{self.step:09d}"
        ):
            path = self.saver.save(
                self.engine, self.step, self.tokens, self.loader.state_dict(), self.tokenizer_dir
            )
            self.saved_step = self.step
            self.last_good = self.saver.complete or self.last_good
            blocked = self.saver.blocked
            self.metrics.scalars(self.step, {"blocked_s": blocked}, "checkpoint")
            how = "writing in the background" if self.saver.pending is not None else "saved"
            self.metrics.console(f"{how} {path} (the loop waited {blocked:.2f} s)")
        if wait:
            self.finish_saving()
        return self.last_good

    def finish_saving(self) -> None:
        """Until the checkpoint in flight, if any, is complete."""
        if self.saver is not None:
            pending = self.saver.pending is not None
            self.saver.wait()
            if self.saver.complete is not None:
                self.last_good = self.saver.complete
                if pending:
                    self.metrics.console(f"saved {self.last_good}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> dict:
        result = {"step": self.step, "tokens": self.tokens, "train_loss": self.loss}
        result["checkpoint"] = str(self.last_good)
        if self.val_loss is not None:
            result.update(val_loss=self.val_loss, val_perplexity=math.exp(self.val_loss))
        if self.stopped is not None:
            result["stopped"] = self.stopped
        return result
