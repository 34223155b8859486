"""ZeRO stages 1-3 on 2 ranks against a plain single-process PyTorch loop on the same batches."""

import pytest
import torch

from ..launch_util import torchrun
from ..reference import single_process_training
from .parity_worker import batches, config


def reference():
    return single_process_training(config(1, "fp32", 1), batches())


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_single_process(stage, ref, tmp_path):
    out = tmp_path / "out.pt"
    torchrun(2, ["tests/train/parity_worker.py", str(out), str(stage), "fp32"])
    got = torch.load(out, weights_only=True)
    ref_losses, ref_weights = ref
    assert max(abs(a - b) for a, b in zip(got["losses"], ref_losses, strict=True)) <= 1e-5
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it did learn something
    assert set(got["weights"]) == set(ref_weights)
    worst = max((got["weights"][k] - v).abs().max().item() for k, v in ref_weights.items())
    assert worst <= 1e-5, worst


def test_bf16_zero1_is_close_to_fp32(ref, tmp_path):
    out = tmp_path / "out.pt"
    torchrun(2, ["tests/train/parity_worker.py", str(out), "1", "bf16"])
    got = torch.load(out, weights_only=True)
    diffs = [abs(a - b) for a, b in zip(got["losses"], ref[0], strict=True)]
    assert max(diffs) < 0.02, diffs
