"""`dist-llm train` in a 3D layout (pp2 x tp2 x dp2, 8 processes) and its checkpoints moving to
other layouts: restored weights and Adam moments equal the saved ones exactly, the resumed run
continues the same loss curve, and a changed data-parallel size is refused or restarted."""

import json
import subprocess
import sys

import pytest

from dist_llm.checkpoint import load_weights
from dist_llm.config import ModelConfig

from ..launch_util import REPO, job_env, tiny_train_args, torchrun
from ..reference import train_losses

STEPS = 6


def args(data, out, *extra):
    return tiny_train_args(
        data,
        out,
        f"train.steps={STEPS}",
        "model.tie_embeddings=true",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        "checkpoint.every=3",
        "checkpoint.keep=5",
        "logging.every=1",
        "logging.val_every=3",
        "logging.val_batches=2",
        "logging.tensorboard=false",
        "optim.lr=0.003",
        *extra,
    )


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory, comedy_shards):
    out = tmp_path_factory.mktemp("run3d") / "run"
    proc = torchrun(8, args(comedy_shards, out, "parallel.tensor=2", "parallel.pipeline=2"))
    return out, proc


def test_3d_run_trains_validates_and_writes_a_portable_checkpoint(run_3d):
    out, proc = run_3d
    assert "world 8 = tp2 x pp2 x dp2" in proc.stdout
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val/loss" in x]
    assert [v["step"] for v in val] == [0, 3, 6] and val[-1]["val/loss"] < val[0]["val/loss"]
    meta = json.loads((out / "checkpoints/step_000000003/dist_llm.json").read_text())
    assert meta["layout"] == {"tensor": 2, "pipeline": 2, "data": 2}
    assert len(json.loads((out / "checkpoints/step_000000003/data_state.json").read_text())) == 2


def test_pipelined_checkpoint_evaluates_and_generates(run_3d, comedy_shards):
    out, _ = run_3d
    ckpt = out / "checkpoints/step_000000006"
    common = dict(cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    ev = subprocess.run(
        [sys.executable, "-m", "dist_llm", "eval", "--checkpoint", str(ckpt), "--data", str(comedy_shards)],
        **common,
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = json.loads(ev.stdout[ev.stdout.index("{") :])
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val/loss" in x]
    assert result["loss"] < val[0]["val/loss"]
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_llm",
            "generate",
            "--checkpoint",
            str(ckpt),
            "--prompt",
            "KING",
            "--max-new-tokens",
            "8",
        ],
        **common,
    )
    assert gen.returncode == 0 and gen.stdout.strip().startswith("KING"), gen.stderr[-2000:]


@pytest.mark.parametrize(
    ("tp", "pp", "procs", "zero"),
    [(1, 1, 2, 1), (2, 1, 8, 1), (1, 2, 4, 1), (2, 1, 4, 3)],
    ids=["dp2", "tp2xdp4", "pp2xdp2", "tp2xdp2-zero3"],
)
def test_state_moves_exactly_to_another_layout(run_3d, tp, pp, procs, zero, tmp_path):
    out, _ = run_3d
    result_file = tmp_path / "result.json"
    ckpt = out / "checkpoints/step_000000003"
    torchrun(
        procs, ["tests/parallel/resume_worker.py", str(ckpt), str(result_file), str(tp), str(pp), str(zero)]
    )
    got = json.loads(result_file.read_text())
    assert got["weights"] == 0.0 and got["moments"] == 0.0, got
    assert got["moment_keys_equal"] and got["step"] == 3 and got["global_steps"] == 3
    scheduler = json.loads((ckpt / "dist_llm.json").read_text())["scheduler"]
    assert got["lr"] == scheduler["_last_lr"][0]


def test_resumed_in_another_layout_continues_the_same_curve(run_3d, comedy_shards, tmp_path):
    out, _ = run_3d
    moved = tmp_path / "moved"
    torchrun(2, args(comedy_shards, moved, f"checkpoint.resume={out / 'checkpoints/step_000000003'}"))
    before, after = train_losses(out), train_losses(moved)
    assert sorted(after) == [4, 5, 6]
    assert max(abs(after[s] - before[s]) for s in after) <= 1e-5, (before, after)
    model = ModelConfig(
        **json.loads((out / "checkpoints/step_000000006/dist_llm.json").read_text())["config"]["model"]
    )
    final_a = load_weights(out / "checkpoints/step_000000006", model)
    final_b = load_weights(moved / "checkpoints/step_000000006", model)
    assert max((final_a[k] - final_b[k]).abs().max().item() for k in final_a) <= 1e-5


def test_changed_data_parallel_size_is_refused_then_restarted(run_3d, comedy_shards, tmp_path):
    out, _ = run_3d
    ckpt = out / "checkpoints/step_000000003"
    refused = subprocess.run(
        [
            sys.executable,
            *args(comedy_shards, tmp_path / "r", f"checkpoint.resume={ckpt}", "parallel.tensor=2"),
        ],
        cwd=REPO,
        env=job_env(WORLD_SIZE="8", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "saved with 2 data-parallel ranks, this run has 4" in refused.stderr
    assert "checkpoint.data_state=restart" in refused.stderr
    restarted = tmp_path / "restarted"
    proc = torchrun(
        8,
        args(
            comedy_shards,
            restarted,
            f"checkpoint.resume={ckpt}",
            "parallel.tensor=2",
            "checkpoint.data_state=restart",
        ),
    )
    assert "tp2 x pp1 x dp4" in proc.stdout and "data stream restarted" in proc.stdout
    assert sorted(train_losses(restarted)) == [4, 5, 6]


def _step0_validation(data, out, procs, *extra):
    overrides = ["train.steps=1", "optim.warmup_steps=0", "logging.val_batches=0", "train.grad_accum=1"]
    proc = torchrun(procs, args(data, out, *overrides, *extra))
    row = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val/loss" in x)
    tokens = next(line for line in proc.stdout.splitlines() if "val loss" in line).split("|")[-1].strip()
    return row["val/loss"], tokens


@pytest.fixture(scope="module")
def context_run(tmp_path_factory, comedy_shards):
    """One step at cp2 (each sequence split over two ranks) under ZeRO-3, whose partitions of
    each parameter span the context ranks: its step-0 validation and its final checkpoint."""
    out = tmp_path_factory.mktemp("cp2") / "run"
    return out, _step0_validation(comedy_shards, out, 2, "parallel.context=2", "parallel.zero_stage=3")


def test_validation_is_the_same_in_every_layout(comedy_shards, context_run, tmp_path):
    """Step 0 validates the same initial weights over the whole split (so some ranks get
    padding-only micro-batches): the loss and the token count must not depend on the layout."""
    reference = _step0_validation(comedy_shards, tmp_path / "one", 1)
    runs = [("cp2", context_run[1])]
    for name, procs, extra in [
        ("pp2xdp3", 6, ["parallel.pipeline=2"]),
        ("tp2xdp3", 6, ["parallel.tensor=2"]),
    ]:
        runs.append((name, _step0_validation(comedy_shards, tmp_path / name, procs, *extra)))
    for name, (loss, tokens) in runs:
        assert tokens == reference[1], (name, tokens, reference)
        assert abs(loss - reference[0]) <= 1e-5, (name, loss, reference)


def test_context_parallel_checkpoint_resumes_without_it(context_run, tmp_path):
    """Context ranks hold replicated weights and split ZeRO's partitions with the data-parallel
    ranks (here ZeRO-3's, each parameter halved between the two): the checkpoint records the
    layout and restores exactly in one process."""
    out, _ = context_run
    ckpt = out / "checkpoints/step_000000001"
    assert json.loads((ckpt / "dist_llm.json").read_text())["layout"] == {
        "tensor": 1,
        "pipeline": 1,
        "data": 1,
        "context": 2,
    }
    result_file = tmp_path / "result.json"
    torchrun(1, ["tests/parallel/resume_worker.py", str(ckpt), str(result_file), "1", "1", "1"])
    got = json.loads(result_file.read_text())
    assert got["weights"] == 0.0 and got["moments"] == 0.0, got
    assert got["moment_keys_equal"] and got["step"] == 1 and got["global_steps"] == 1
