"""Expert parallelism against a plain single-process PyTorch loop on the same batches: fp32,
dropless, 4 steps, mean losses and final weights within 1e-5, with both router losses on (the
reference runs each rank's share of the batch on its own for those) and gradient clipping
active, at ep2 and at ep2 x dp2 with ZeRO-2."""

import json

import pytest
import torch

from ..launch_util import tiny_train_args, torchrun
from ..reference import single_process_training
from .parity_worker import batches, config, documents

TOLERANCE = 1e-5
STEPS = 4


@pytest.mark.parametrize(
    ("world", "options"), [(2, ["ep=2"]), (4, ["ep=2", "zero=2"])], ids=["ep2", "ep2xdp2-zero2"]
)
def test_expert_parallel_matches_single_process(world, options, tmp_path):
    cfg = config("moe", steps=STEPS)
    ref_losses, ref_weights = single_process_training(
        cfg, batches(cfg.model.vocab_size, STEPS), documents(), ranks=world
    )
    out = tmp_path / "out.pt"
    torchrun(
        world, ["tests/parallel/parity_worker.py", str(out), "1", "1", "moe", f"steps={STEPS}", *options]
    )
    got = torch.load(out, weights_only=True)
    assert max(abs(a - b) for a, b in zip(got["losses"], ref_losses, strict=True)) <= TOLERANCE
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it did learn something
    assert set(got["weights"]) == set(ref_weights)
    assert got["weights"]["layers.1.feed_forward.experts.w1"].shape[0] == 4  # all experts, gathered
    worst = {k: (got["weights"][k] - v).abs().max().item() for k, v in ref_weights.items()}
    assert max(worst.values()) <= TOLERANCE, worst


def test_an_ep2_run_logs_its_routers_and_resumes_exactly_in_one_process(comedy_shards, tmp_path):
    """`dist-llm train` at ep2 with ZeRO-2 for two steps: validation (every rank in each
    forward, the greedy sample too) runs, the routers' losses and per-expert load reach the
    metrics; its checkpoint, whose experts were split over two ranks, restores
    weights and Adam moments exactly in one process holding every expert."""
    out = tmp_path / "run"
    moe = ["model.moe.num_experts=4", "model.moe.z_loss_coef=0.001", "parallel.expert=2"]
    steps = ["train.steps=2", "optim.warmup_steps=1", "checkpoint.every=2", "logging.every=1"]
    quiet = [
        "logging.val_every=2",
        "logging.val_batches=2",
        "logging.tensorboard=false",
        "parallel.zero_stage=2",
    ]
    proc = torchrun(2, tiny_train_args(comedy_shards, out, *moe, *steps, *quiet))
    assert "world 2 = tp1 x pp1 x dp2 (ep2 within dp)" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(val) == 2 and val[1] < val[0]  # steps 0 and 2
    router = next(r for r in rows if "moe/layers_1/aux_loss" in r)
    load = [router[f"moe/layers_1/load_expert{e}"] for e in range(4)]
    assert abs(sum(load) - 1) < 1e-6 and 0 < router["moe/layers_1/aux_loss"] <= 4 * 2  # at most E * k
    ckpt = out / "checkpoints/step_000000002"
    meta = json.loads((ckpt / "dist_llm.json").read_text())
    assert meta["layout"] == {"tensor": 1, "pipeline": 1, "data": 2, "expert": 2}
    result = tmp_path / "result.json"
    torchrun(1, ["tests/parallel/resume_worker.py", str(ckpt), str(result), "1", "1", "1"])
    got = json.loads(result.read_text())
    assert got["weights"] == 0.0 and got["moments"] == 0.0, got
    assert got["moment_keys_equal"] and got["step"] == 2 and got["global_steps"] == 2


def test_flat_ranges_of_stacked_expert_weights_are_rectangles_of_them():
    """A ZeRO fragment of a 3-D expert stack (any flat range) is saved as rectangles: together
    they are exactly the range's elements, checked against flat indexing."""
    from dist_llm.parallel.weights import _flat_range_rectangles

    shape = (3, 4, 5)
    full = torch.arange(60).view(shape)
    for start, numel in [(0, 60), (7, 30), (20, 20), (3, 1), (19, 2), (41, 19)]:
        got = torch.zeros(numel, dtype=torch.long)
        for offsets, sizes, lo in _flat_range_rectangles(shape, start, numel):
            block = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
            got[lo : lo + block.numel()] = block.flatten()
        assert torch.equal(got, full.flatten()[start : start + numel]), (start, numel)
