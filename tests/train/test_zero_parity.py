"""ZeRO stages 1-3 on 2 ranks against a plain single-process PyTorch loop on the same batches."""

import pytest
import torch

from dist_llm.model.llama import Llama, lm_loss
from dist_llm.train.schedule import lr_multiplier

from ..launch_util import torchrun
from .parity_worker import batches, config


def reference():
    cfg = config(1, "fp32", 1)
    torch.manual_seed(0)
    model = Llama(cfg.model)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": o.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        foreach=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(o, cfg.train.steps))
    losses = []
    for tokens in batches():
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, {k: v.detach() for k, v in model.named_parameters()}


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
