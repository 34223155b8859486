import itertools
import math

import pytest

from dist_llm.config import load_config
from dist_llm.train.schedule import lr_multiplier


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_warmup_then_decay_to_min_lr_on_the_last_step(schedule):
    optim = load_config(
        None,
        [
            f"optim.schedule={schedule}",
            "optim.lr=1.0",
            "optim.min_lr=0.1",
            "optim.warmup_steps=4",
            "optim.decay_fraction=0.5",
            "train.steps=20",
        ],
    ).optim
    f = lr_multiplier(optim, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(19) == pytest.approx(0.1)  # the last of 20 steps trains at min_lr
    values = [f(s) for s in range(4, 20)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    if schedule == "wsd":
        assert f(9) == 1.0 and f(10) == 1.0 and f(11) < 1.0  # stable until the last half
    else:
        assert f(4) == 1.0 and math.isclose(
            f(4 + 15 // 2), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15))
        )


def test_constant_schedule():
    optim = load_config(None, ["optim.schedule=constant", "optim.warmup_steps=2", "train.steps=10"]).optim
    f = lr_multiplier(optim, 10)
    assert [f(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
