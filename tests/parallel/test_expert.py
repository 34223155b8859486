"""Expert parallelism against a plain single-process PyTorch loop on the same batches: fp32,
dropless, 10 steps, mean losses and final weights within 1e-5, with both router losses on (the
reference runs each rank's share of the batch on its own for those) and gradient clipping
active, at ep2 and at ep2 x dp2 with ZeRO-2."""

import pytest
import torch

from ..launch_util import torchrun
from ..reference import single_process_training
from .parity_worker import batches, config, documents

TOLERANCE = 1e-5


@pytest.mark.parametrize(
    ("world", "options"), [(2, ["ep=2"]), (4, ["ep=2", "zero=2"])], ids=["ep2", "ep2xdp2-zero2"]
)
def test_expert_parallel_matches_single_process(world, options, tmp_path):
    cfg = config("moe")
    ref_losses, ref_weights = single_process_training(
        cfg, batches(cfg.model.vocab_size), documents(), ranks=world
    )
    out = tmp_path / "out.pt"
    torchrun(world, ["tests/parallel/parity_worker.py", str(out), "1", "1", "moe", *options])
    got = torch.load(out, weights_only=True)
    assert max(abs(a - b) for a, b in zip(got["losses"], ref_losses, strict=True)) <= TOLERANCE
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it did learn something
    assert set(got["weights"]) == set(ref_weights)
    assert got["weights"]["layers.1.feed_forward.experts.w1"].shape[0] == 4  # all experts, gathered
    worst = {k: (got["weights"][k] - v).abs().max().item() for k, v in ref_weights.items()}
    assert max(worst.values()) <= TOLERANCE, worst
