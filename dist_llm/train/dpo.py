"""`dist-llm dpo`: direct preference optimization (Rafailov et al. 2023) through the one loop.

For a pair (prompt x, chosen y_w, rejected y_l), with log pi(y|x) summed over the response's
tokens, the policy pi and a frozen reference pi_ref:

    h    = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

(eps = dpo.label_smoothing: conservative DPO, a label flipped with probability eps; 0 = DPO).
With dpo.loss=ipo it is IPO's (Azar et al. 2023) squared distance to a fixed margin instead:
loss = (h - 1 / (2 beta))^2, with h of summed log-probabilities as above.
The implicit rewards are beta * (log pi - log pi_ref) of each response; their margin and the
share of pairs whose chosen reward is the higher (accuracy) go to the metrics writer (`dpo/`).

The reference is `dpo.reference`, by default `checkpoint.init_from` (the initial policy): a
full copy on every rank (train/frozen.py), also under ZeRO-3 (which shards only the policy).
With LoRA (`lora.rank` > 0) and no `dpo.reference`, it is the policy with its adapters disabled
(`disable_adapter()`, as peft users do): the base itself, no second copy.

The pairs (data/pairs.py) come in batches of chosen rows then rejected rows, so the loop's
forward computes both halves at once and the objective only splits them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_llm.config import Config, ConfigError
from dist_llm.data.pairs import PairLoader, read_pairs
from dist_llm.distributed import all_reduce_sum
from dist_llm.train.frozen import Frozen
from dist_llm.train.hooks import Hook
from dist_llm.train.state import Run

STATS = ("chosen_reward", "rejected_reward", "margin", "accuracy")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p of each row's scored tokens (labels != -100), summed, in fp32: [rows]."""
    keep = labels != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards) of a batch of pairs' sequence log-probs."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    if loss == "ipo":
        h = (chosen - rejected) / beta
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        logits = chosen - rejected
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), chosen.detach(), rejected.detach()


class DPOObjective(Hook):
    """The loop's objective (called with the policy's logits of a pair batch) and the hook
    that logs its rewards every `logging.every` steps."""

    def __init__(self, config: Config, reference: Frozen | None):
        self.beta, self.smoothing, self.loss = config.dpo.beta, config.dpo.label_smoothing, config.dpo.loss
        self.reference = reference
        self.policy = None
        self.sums = dict.fromkeys(STATS, 0.0)
        self.pairs = 0

    def start(self, run: Run) -> None:
        self.policy = run.engine.module

    def reference_logits(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.reference is not None:
            return self.reference(input_ids, dtype)
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(input_ids)

    def __call__(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        policy = sequence_logps(logits, labels)
        reference = sequence_logps(self.reference_logits(batch["input_ids"], logits.dtype), labels)
        half = labels.shape[0] // 2
        loss, chosen, rejected = dpo_loss(
            policy[:half],
            policy[half:],
            reference[:half],
            reference[half:],
            self.beta,
            self.smoothing,
            self.loss,
        )
        margin = chosen - rejected
        for key, value in zip(STATS, (chosen, rejected, margin, (margin > 0).float()), strict=True):
            self.sums[key] += value.sum().item()
        self.pairs += half
        return loss

    def after_step(self, run: Run) -> None:
        if run.step % run.config.logging.every and run.step != run.config.train.steps:
            return
        totals = all_reduce_sum([*self.sums.values(), float(self.pairs)], run.world)
        values = {k: v / max(totals[-1], 1) for k, v in zip(STATS, totals, strict=False)}
        run.metrics.scalars(run.step, values, "dpo")
        run.metrics.console(
            f"step {run.step} | dpo reward chosen {values['chosen_reward']:.4f} rejected "
            f"{values['rejected_reward']:.4f} | margin {values['margin']:.4f} | accuracy {values['accuracy']:.3f}"
        )
        self.sums, self.pairs = dict.fromkeys(STATS, 0.0), 0


def prepare(config: Config) -> Config:
    """Checks before any process group: the pairs file, the initial policy and its tokenizer."""
    if not config.dpo.data:
        raise ConfigError("dpo.data: set it to a JSONL file of {prompt, chosen, rejected} records")
    if not config.checkpoint.init_from:
        raise ConfigError(
            "checkpoint.init_from: DPO tunes a trained model; set it to the checkpoint of the policy to start from"
        )
    if not (Path(config.checkpoint.init_from) / "tokenizer.json").is_file():
        raise ConfigError(
            f"checkpoint.init_from: {config.checkpoint.init_from} holds no tokenizer.json to tokenize dpo.data with"
        )
    from dist_llm.checkpoint import saved_config

    model = saved_config(config.checkpoint.init_from).model
    if config.data.seq_len > model.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {config.data.seq_len} (the pairs' row length) exceeds max_seq_len={model.max_seq_len} "
            f"of {config.checkpoint.init_from}; lower it"
        )
    # The pairs are the data: shards named in data.sources (a base file's) are not read.
    return dataclasses.replace(config, model=model, data=dataclasses.replace(config.data, sources=[]))


def run_dpo(config: Config) -> dict:
    from dist_llm.train.loop import run_train

    config = prepare(config)
    pairs = read_pairs(config.dpo.data, config.checkpoint.init_from, config.data.seq_len)
    adapters_off = config.lora.rank > 0 and not config.dpo.reference
    reference = None if adapters_off else Frozen(config.dpo.reference or config.checkpoint.init_from)
    objective = DPOObjective(config, reference)

    def loader(layout):
        return PairLoader(pairs, config.train.micro_batch_size, config.data.seed, layout.dp_rank, layout.dp)

    return run_train(config, objective, loader=loader)
