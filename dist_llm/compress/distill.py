"""`dist-llm distill`: train a student through the one training loop with a frozen teacher.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy
(Hinton et al. 2015; T^2 keeps the soft term's gradients on the scale of the hard one). Positions
whose label is -100 (padding, fine-tuning prompts) count in neither term. The student may start
from any checkpoint, e.g. a pruned one (`checkpoint.init_from`, prune-then-distill as in
Minitron); its model shape is then taken from that checkpoint.

The teacher runs in eval mode, without gradients, in the training dtype, as a full copy on every
rank (fine for teachers that fit one device; a ZeRO-3-sharded teacher is future work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_llm.checkpoint import saved_config
from dist_llm.config import Config, ConfigError
from dist_llm.model.llama import lm_loss


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
):
    keep = labels.flatten() != -100
    s = student.flatten(0, 1)[keep].float() / temperature
    t = teacher.flatten(0, 1)[keep].float() / temperature
    soft = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return alpha * temperature**2 * soft + (1 - alpha) * lm_loss(student, labels)


def prepare(config: Config) -> Config:
    """The student's config: its shape from checkpoint.init_from when given; checks the teacher."""
    if not config.distill.teacher:
        raise ConfigError("distill.teacher: set it to the checkpoint of the teacher model")
    teacher = saved_config(config.distill.teacher).model
    if config.checkpoint.init_from:
        import dataclasses

        config = dataclasses.replace(config, model=saved_config(config.checkpoint.init_from).model)
    if teacher.vocab_size != config.model.vocab_size:
        raise ConfigError(
            f"distill.teacher has vocab_size {teacher.vocab_size}, the student {config.model.vocab_size}: "
            "teacher and student must share one tokenizer"
        )
    return config


def run_distill(config: Config) -> dict:
    from dist_llm.train.frozen import Frozen
    from dist_llm.train.loop import run_train

    config = prepare(config)
    teacher = Frozen(config.distill.teacher)
    alpha, temperature = config.distill.alpha, config.distill.temperature

    def objective(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        target = teacher(batch["input_ids"], logits.dtype, document_ids=batch.get("document_ids"))
        return distill_loss(logits, target, batch["labels"], alpha, temperature)

    return run_train(config, objective)
