"""The loop's side jobs, one hook per concern (OLMo-core's callbacks): console and TensorBoard,
validation with a generated sample, checkpoints, stopping on signals and deadlines, and the
embedding projector. Each sees the whole run state (`train/state.py`).

`run_train` calls `start` on every hook in order, `after_step` in order after each optimizer
step, and `end` in reverse order, as nested contexts unwind: the final checkpoint is saved
before the final validation, and the logger, opened first, writes the summary and closes last.
Hooks that run collectives do so on every rank at the same step.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from dist_llm.data.manifest import DataError, open_split
from dist_llm.data.stream import eval_batches
from dist_llm.distributed import all_reduce_sum
from dist_llm.model.generate import generate
from dist_llm.model.llama import Llama, num_params
from dist_llm.model.moe import inactive_params, moe_layers
from dist_llm.model.roles import EMBEDDING_WEIGHT
from dist_llm.parallel import context_chunk, loss_function, model_inputs, pipeline_inputs
from dist_llm.precision import format_flops
from dist_llm.train import checkpoint, preemption
from dist_llm.train.metrics import eta, flops_per_token, memory_gb, peak_flops
from dist_llm.train.state import Run

SAMPLE_PROMPT = "\n"


class Hook:
    def start(self, run: Run) -> None:
        pass

    def after_step(self, run: Run) -> None:
        pass

    def end(self, run: Run) -> None:
        pass


class Logger(Hook):
    """The start-up line, every `logging.every` steps a console line and TensorBoard scalars
    (loss, lr, gradient norm, tokens/s, MFU, memory), and the hyperparameters at the end."""

    def start(self, run: Run) -> None:
        c = run.config
        with torch.device("meta"):
            n_params = num_params(Llama(c.model))
        # A token's matmuls run through its top_k experts only: MFU counts the active parameters.
        active = n_params - inactive_params(c.model)
        self.flops_token = flops_per_token(c.model, c.data.seq_len, active)
        self.peak, source = peak_flops(c, run.world.device)
        run.metrics.console(
            f"model {n_params / 1e6:.1f}M parameters"
            f"{f' ({active / 1e6:.1f}M active)' if active != n_params else ''} | world {run.world.size} = {run.layout.describe()} | "
            f"ZeRO-{c.parallel.zero_stage} | {c.train.dtype} ({run.precision.reason}) | "
            f"MFU against {format_flops(self.peak)} per device ({source})"
        )
        if c.lora.rank:
            trained = sum(
                getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters() if p.requires_grad
            )
            run.metrics.console(
                f"LoRA rank {c.lora.rank} on {', '.join(c.lora.target)}: {trained:,} trained parameters "
                f"({100 * trained / n_params:.2f}% of the model's), the rest frozen"
            )
        self.window_start, self.window_step = time.perf_counter(), run.step
        self.loop_start = self.window_start

    def after_step(self, run: Run) -> None:
        steps = run.config.train.steps
        if run.step % run.config.logging.every and run.step != steps:
            return
        now = time.perf_counter()
        tok_s = (run.step - self.window_step) * run.tokens_per_step / (now - self.window_start)
        mfu = tok_s * self.flops_token / (self.peak * run.world.size)
        lr, mem = run.engine.get_lr()[0], memory_gb(run.world.device)
        values = {"loss": run.loss, "lr": lr, "grad_norm": run.grad_norm, "tokens_per_s": tok_s}
        values.update(tokens_seen=run.tokens, mfu=mfu, memory_gb=mem)
        run.metrics.scalars(run.step, values, "train")
        log_router(run)
        remaining = (steps - run.step) * (now - self.loop_start) / (run.step - run.first_step)
        run.metrics.console(
            f"step {run.step}/{steps} | loss {run.loss:.4f} | lr {lr:.2e} | gnorm {run.grad_norm:.3f} | "
            f"{tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | mem {mem:.2f} GB | ETA {eta(remaining)}"
        )
        self.window_start, self.window_step = time.perf_counter(), run.step

    def end(self, run: Run) -> None:
        results = {k: v for k, v in run.summary().items() if isinstance(v, float)}
        run.metrics.hparams(results, {"train.dtype_reason": run.precision.reason})
        run.metrics.close()


def log_router(run: Run) -> None:
    """Each MoE layer's router losses and expert load (share of routes per expert) of this
    rank's last micro-batch, under moe/ in TensorBoard."""
    for name, layer in moe_layers(run.engine.module):
        if layer.stats is None:
            continue
        layer_name = name.removesuffix(".feed_forward").replace(".", "_")
        values = {"aux_loss": layer.stats.aux_loss.item(), "z_loss": layer.stats.z_loss.item()}
        values |= {f"load_expert{e}": share for e, share in enumerate(layer.stats.load.tolist())}
        run.metrics.scalars(run.step, values, f"moe/{layer_name}")


class Validator(Hook):
    """The first source's `val` split: at step 0 of a fresh run (the untrained baseline), every
    `logging.val_every` steps and at the end; with a greedy sample in TensorBoard."""

    def start(self, run: Run) -> None:
        self.spec = None
        # No validation shards (sharded with --val-fraction 0): nothing to validate on.
        with contextlib.suppress(DataError):
            if run.config.logging.val_every and run.config.data.sources:
                self.spec = open_split(run.config.data.sources[0].path, "val")
        if self.spec is not None and run.step == 0:
            self.validate(run)

    def after_step(self, run: Run) -> None:
        if self.spec is not None and run.step % run.config.logging.val_every == 0:
            self.validate(run)

    def end(self, run: Run) -> None:
        if self.spec is not None and run.val_step != run.step:
            self.validate(run)

    @torch.no_grad()
    def validate(self, run: Run) -> None:
        run.engine.eval()
        try:
            nll, count = self._score(run)
        finally:
            run.engine.train()
        # Each data-parallel group's sums are held by all of its tp * pp ranks (context ranks
        # each hold their own positions' share).
        group = run.layout.tp * run.layout.pp
        nll, count = (x / group for x in all_reduce_sum([nll, count], run.world))
        run.val_loss, run.val_step = nll / max(count, 1), run.step
        ppl = math.exp(min(run.val_loss, 50))
        run.metrics.scalars(run.step, {"loss": run.val_loss, "perplexity": ppl}, "val")
        run.metrics.console(
            f"step {run.step} | val loss {run.val_loss:.4f} | val ppl {ppl:.2f} | {int(count):,} tokens"
        )
        if group * run.layout.cp == 1:  # sharded layouts: `dist-llm generate` on a checkpoint instead
            sample = _sample_text(run.engine, run.tokenizer_dir)
            if sample is not None:
                run.metrics.text(run.step, "samples/greedy", sample)

    def _score(self, run: Run) -> tuple[float, int]:
        """(summed token NLL, scored tokens) of this rank's share of the validation batches."""
        c, layout, device = run.config, run.layout, run.world.device
        summed = loss_function(layout, "sum")
        nll, count = 0.0, 0
        batches = eval_batches(
            self.spec,
            c.train.micro_batch_size,
            layout.dp_rank,
            layout.dp,
            c.logging.val_batches,
            c.data.verify_sha256,
        )
        with _pipeline_loss(run.engine, summed if layout.pipelined else None):
            for batch in batches:
                batch = context_chunk(batch, layout.context)
                labels = batch["labels"].to(device)
                if layout.pipelined:
                    # eval_batch averages over data-parallel ranks: world sum = tp * pp * the total.
                    feed = iter([(pipeline_inputs(batch, device), labels)])
                    nll += run.engine.eval_batch(feed, num_micro_batches=1).item()
                else:
                    inputs = {
                        k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()
                    }
                    logits = run.engine(batch["input_ids"].to(device), **inputs)
                    nll += summed(logits, labels).item()
                count += int((labels != -100).sum())
        return nll, count


class _pipeline_loss:
    """A pipeline's last stage computes its own loss: sum over tokens while validating, and put
    the training loss back afterwards, whatever happens in between."""

    def __init__(self, engine, loss_fn):
        self.module, self.loss_fn = engine.module, loss_fn

    def __enter__(self):
        if self.loss_fn is not None:
            self.saved, self.module.loss_fn = self.module.loss_fn, self.loss_fn

    def __exit__(self, *exc):
        if self.loss_fn is not None:
            self.module.loss_fn = self.saved


def _sample_text(engine, tokenizer_dir) -> str | None:
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        return None
    tokenizer = Tokenizer.from_file(str(path))
    # Every rank generates (a ZeRO-3 model needs all ranks in each forward); rank 0 logs.
    new = generate(engine.module, tokenizer.encode(SAMPLE_PROMPT).ids, max_new_tokens=48)
    return SAMPLE_PROMPT + tokenizer.decode(new, skip_special_tokens=False)


class Checkpointer(Hook):
    """Every `checkpoint.every` steps, at the last step, and where the loop stopped early."""

    def after_step(self, run: Run) -> None:
        every = run.config.checkpoint.every
        if (every and run.step % every == 0) or run.step == run.config.train.steps:
            run.save()

    def end(self, run: Run) -> None:
        run.finish_saving()
        if run.stopped is not None:
            run.save(wait=True)
            run.metrics.console(
                f"stopped: {run.stopped} of {run.config.train.steps} after {eta(run.elapsed())}; saved "
                f"{run.last_good}. To continue, run again with a larger train.max_minutes (or 0)"
            )


class Stopper(Hook):
    """Signals (preemption, cancel) and deadlines (train.max_minutes, SLURM's end time), agreed
    by all ranks at each step boundary: a budget ends the loop as finished; anything else saves,
    maybe requeues, and raises errors.Preempted."""

    def __init__(self, signals: preemption.StopSignals):
        self.signals = signals

    def start(self, run: Run) -> None:
        self.deadline = preemption.Deadline.for_run(run.config.train, run.world, run.started)
        if self.deadline.description:
            run.metrics.console(f"deadlines: {self.deadline.description}")

    def after_step(self, run: Run) -> None:
        if run.step >= run.config.train.steps:
            return
        agreed = self.signals.agreed(run.world, self.deadline)  # the same answer on every rank
        if agreed == [preemption.BUDGET]:
            run.stopped = f"train.max_minutes={run.config.train.max_minutes:g} reached at step {run.step}"
        elif agreed:
            self.signals.stop([s for s in agreed if s != preemption.BUDGET], run)


class Embeddings(Hook):
    """The token embeddings with their tokens, for TensorBoard's projector, at the end."""

    def end(self, run: Run) -> None:
        from tokenizers import Tokenizer

        if run.config.lora.rank:  # a LoRA run does not train the embeddings
            return
        weights = checkpoint.consolidated_state_dict(run.engine, run.config, run.layout, {EMBEDDING_WEIGHT})
        weight = weights.get(EMBEDDING_WEIGHT)
        path = Path(run.tokenizer_dir) / "tokenizer.json"
        if run.metrics.enabled and weight is not None and path.exists():
            tokenizer = Tokenizer.from_file(str(path))
            vocab = [tokenizer.id_to_token(i) or "" for i in range(weight.shape[0])]
            run.metrics.embeddings(run.step, weight, vocab)


def default_hooks(signals: preemption.StopSignals) -> list[Hook]:
    return [Logger(), Validator(), Checkpointer(), Stopper(signals), Embeddings()]
