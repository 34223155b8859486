"""Learning-rate schedules as multipliers of optim.lr (for torch's LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable

from dist_llm.config import OptimConfig


def lr_multiplier(optim: OptimConfig, steps: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine to min_lr, warmup-stable-decay, or constant.

    `step` is the number of optimizer steps already taken, so step 0 trains at 1/warmup.
    """
    floor = optim.min_lr / optim.lr
    warmup = optim.warmup_steps

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        if optim.schedule == "cosine":
            # The last step taken is steps - 1: it must train at exactly min_lr.
            progress = min(1.0, (step - warmup) / max(1, steps - warmup - 1))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        # wsd: flat at the peak, then linear decay to min_lr over the last decay_fraction of steps
        decay_start = steps - int(optim.decay_fraction * steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, steps - decay_start - 1))
        return 1.0 - (1 - floor) * progress

    return multiplier
