"""`dist-llm train` end to end with real processes: exact resume, atomic checkpoints, DeepSpeed's
own consolidation as the reference, TensorBoard event files read back with TensorBoard."""

import json
import shutil
import subprocess
import sys

import pytest

from ..launch_util import REPO, job_env, tiny_train_args, torchrun
from ..reference import train_losses

STEPS = 8


@pytest.fixture(scope="module")
def data(comedy_shards):
    return comedy_shards


def args(data, out, *extra):
    return tiny_train_args(
        data,
        out,
        f"train.steps={STEPS}",
        "checkpoint.every=4",
        "checkpoint.keep=5",
        "logging.every=1",
        "logging.val_every=4",
        "logging.val_batches=2",
        "data.num_workers=1",
        "parallel.zero_stage=2",
        "optim.lr=0.003",
        *extra,
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("runA") / "run"
    torchrun(2, args(data, out))
    return out


def test_uninterrupted_run_learns_and_checkpoints(reference_run):
    loss = train_losses(reference_run)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < loss[1] - 0.3
    root = reference_run / "checkpoints"
    assert (root / "latest").read_text() == "step_000000008"
    meta = json.loads((root / "step_000000008" / "dist_llm.json").read_text())
    assert meta["step"] == 8 and meta["tokens"] == 8 * 2 * 4 * 64 and meta["world_size"] == 2
    assert len(json.loads((root / "step_000000008" / "data_state.json").read_text())) == 2
    assert (root / "step_000000008" / "tokenizer.json").exists()


def test_exact_resume_from_a_checkpoint(reference_run, data, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run / "checkpoints" / "step_000000004", out / "checkpoints" / "step_000000004")
    (out / "checkpoints" / "latest").write_text("step_000000004")
    proc = torchrun(2, args(data, out))
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout
    want, got = train_losses(reference_run), train_losses(out)
    assert sorted(got) == [5, 6, 7, 8]
    assert all(got[s] == want[s] for s in got), (got, want)  # bitwise


def test_async_saves_equal_sync_ones_and_report_the_loop_blocked_time(reference_run, data, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(2, args(data, out, "checkpoint.async_save=true"))
    assert train_losses(out) == train_losses(reference_run)  # bitwise: saving changed nothing
    assert proc.stdout.count("writing in the background") == 2, proc.stdout
    blocked = [
        json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "checkpoint/blocked_s" in x
    ]
    assert [b["step"] for b in blocked] == [4, 8]
    for step in ("step_000000004", "step_000000008"):
        ours, ref = out / "checkpoints" / step, reference_run / "checkpoints" / step
        assert read_shards(ours) == read_shards(ref), step


def read_shards(path):
    from dist_llm.checkpoint import SHARDS, sharded

    names = sorted(sharded.specs(path / SHARDS))
    return {n: t.tolist() for n, t in sharded.read_full(path / SHARDS, names).items()}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_save_leaves_previous_checkpoint_and_resume_picks_it(mode, reference_run, data, tmp_path):
    out = tmp_path / "run"
    extra = ["checkpoint.async_save=true"] if mode == "async" else []
    proc = torchrun(2, args(data, out, *extra), check=False, DIST_LLM_FAULT="after_engine_save:8")
    assert proc.returncode != 0
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_000000004"
    assert (root / "step_000000008.tmp").exists() and not (root / "step_000000008").exists()
    proc = torchrun(2, args(data, out))
    assert "resumed from" in proc.stdout and "step_000000004" in proc.stdout
    want, got = train_losses(reference_run), train_losses(out)
    assert all(got[s] == want[s] for s in range(5, 9))
    assert (root / "step_000000008").exists() and not (root / "step_000000008.tmp").exists()


@pytest.mark.parametrize("stage,dtype", [(2, "fp32"), (3, "bf16")])
def test_sharded_weights_equal_deepspeeds_own_consolidation(stage, dtype, data, tmp_path):
    result = tmp_path / "result.json"
    overrides = args(data, tmp_path / "run", f"parallel.zero_stage={stage}", f"train.dtype={dtype}")[5:]
    torchrun(2, ["tests/train/shards_worker.py", str(result), "configs/tiny.yaml", *overrides])
    got = json.loads(result.read_text())
    assert got["names_equal"] and got["differ"] == [] and got["checked"] > 10, got


def test_tensorboard_has_every_scalar(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/tokens_seen",
        "train/mfu",
        "train/memory_gb",
        "val/loss",
        "val/perplexity",
    }
    assert expected <= scalars, expected - scalars
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Scalars("val/loss")] == [0, 4, 8]  # 0: the untrained baseline
    assert events.Scalars("train/loss")[-1].value == pytest.approx(train_losses(reference_run)[STEPS])
    assert any(tag.startswith("samples/greedy") for tag in events.Tags()["tensors"])
    projector = (reference_run / "tensorboard" / "projector_config.pbtxt").read_text()
    assert "token_embeddings" in projector and "metadata.tsv" in projector
    metadata = next((reference_run / "tensorboard").rglob("metadata.tsv")).read_text().splitlines()
    assert len(metadata) == 2048 and metadata[0] == "<|endoftext|>"
    hparams = EventAccumulator(str(reference_run / "tensorboard" / "hparams"))
    hparams.Reload()
    assert "hparam/val_loss" in hparams.Tags()["scalars"]


def run_single(*argv, **env):
    cmd = [sys.executable, "-m", "dist_llm", *argv]
    return subprocess.run(cmd, cwd=REPO, env=job_env(**env), capture_output=True, text=True, timeout=600)


def test_nan_stops_the_run_and_names_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    proc = run_single(
        *args(
            data,
            out,
            "optim.lr=1e4",
            "optim.min_lr=0.0",
            "optim.grad_clip=0.0",
            "checkpoint.every=1",
            "logging.val_every=0",
            "parallel.zero_stage=1",
            "train.steps=20",
        )[2:]
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert (
        message.startswith("error: loss") and " at step " in message and "stopped without saving" in message
    )
    step = int(message.split(" at step ")[1].split(";")[0])
    good = out / "checkpoints" / f"step_{step - 1:09d}"
    assert f"Last good checkpoint: {good}" in message
    assert good.exists() and not (out / "checkpoints" / f"step_{step:09d}").exists()


def test_runs_under_the_deepspeed_launcher(data, tmp_path):
    from ..launch_util import free_port

    out = tmp_path / "run"
    cmd = [
        str(REPO / ".venv" / "bin" / "deepspeed")
        if (REPO / ".venv" / "bin" / "deepspeed").exists()
        else "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        *args(data, out, "train.steps=3", "logging.val_every=0", "checkpoint.every=0")[1:],
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    assert (
        json.loads((out / "checkpoints" / "step_000000003" / "dist_llm.json").read_text())["world_size"] == 2
    )


def test_budget_stops_saves_exits_0_and_a_resume_continues_exactly(reference_run, data, tmp_path):
    out = tmp_path / "run"
    # 6 ms: already spent when the first step ends, so the run stops at step 1 of 8.
    proc = torchrun(2, args(data, out, "train.max_minutes=0.0001"))
    assert "deadlines: budget train.max_minutes=0.0001" in proc.stdout
    assert "stopped: train.max_minutes=0.0001 reached at step 1 of 8" in proc.stdout, proc.stdout[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") :])
    assert summary["step"] == 1 and summary["stopped"].startswith("train.max_minutes")
    assert summary["checkpoint"] == str(out / "checkpoints" / "step_000000001")
    assert "val_loss" in summary  # the summary is complete: validated at the step it stopped
    assert (out / "checkpoints" / "latest").read_text() == "step_000000001"
    proc = torchrun(2, args(data, out))  # no budget: continues to step 8
    assert "resumed from" in proc.stdout and "at step 1 " in proc.stdout
    want, got = train_losses(reference_run), train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in got), (got, want)  # bitwise


def test_slurm_end_time_saves_and_stops_for_requeue(data, tmp_path):
    """The job's end time minus train.slurm_margin_minutes is SLURM's time limit: save, exit 75
    (requeue is off here: there is no SLURM). The run also resolves train.dtype=auto and says why."""
    import time

    out = tmp_path / "run"
    end = int(time.time()) + 30  # 30 s left, margin 1 minute: the limit is already passed
    proc = run_single(
        *args(data, out, "train.slurm_margin_minutes=1", "train.dtype=auto", "parallel.zero_stage=1")[2:],
        SLURM_JOB_ID="4242",
        SLURM_JOB_END_TIME=str(end),
        DIST_LLM_REQUEUE="never",
    )
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "deadlines: SLURM job ends" in proc.stdout
    assert "stopped: slurm_time_limit at step 1: saved" in proc.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step_000000001"
    header = next(line for line in proc.stdout.splitlines() if line.startswith("model "))
    assert "| bf16 (auto: bf16 matmul measured" in header or "| fp32 (auto: bf16 matmul measured" in header
    assert "GFLOP/s per device (measured" in header or "TFLOP/s per device (measured" in header


def test_the_chosen_dtype_and_why_are_in_tensorboard_hparams(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(reference_run / "tensorboard" / "hparams"))
    events.Reload()
    runs = [
        plugin_data_pb2.HParamsPluginData.FromString(raw)
        for raw in events.PluginTagToContent("hparams").values()
    ]
    hparams = next(r.session_start_info.hparams for r in runs if r.HasField("session_start_info"))
    assert hparams["train.dtype"].string_value == "fp32"
    assert hparams["train.dtype_reason"].string_value == "set in the config"


def test_resume_auto_passes_over_a_damaged_checkpoint_and_says_so(reference_run, data, tmp_path):
    out = tmp_path / "run"
    for step in ("step_000000004", "step_000000008"):
        shutil.copytree(reference_run / "checkpoints" / step, out / "checkpoints" / step)
    (out / "checkpoints" / "latest").write_text("step_000000008")
    (out / "checkpoints" / "step_000000008" / "dist_llm.json").write_text("garbage")
    proc = torchrun(2, args(data, out, "checkpoint.keep=1"))
    assert "resuming from" in proc.stderr and "step_000000008/dist_llm.json is damaged" in proc.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_000000004'} at step 4" in proc.stdout
    want, got = train_losses(reference_run), train_losses(out)
    assert sorted(got) == [5, 6, 7, 8] and all(got[s] == want[s] for s in got)  # bitwise


def test_a_signal_during_start_up_is_kept_and_honoured(data, tmp_path):
    """SIGTERM sent the moment the CLI starts recording, before torch, DeepSpeed and the
    trainer exist (its default action would end the process without a checkpoint): the run
    starts, stops at its first step boundary, saves and exits 75."""
    out = tmp_path / "run"
    argv = args(data, out, "logging.val_every=0")[2:]
    script = f"""
import os, signal, sys
from dist_llm import cli, signals
start = signals.record_early
def start_then_signal():
    start()
    assert "torch" not in sys.modules and "deepspeed" not in sys.modules  # still starting up
    os.kill(os.getpid(), signal.SIGTERM)
signals.record_early = start_then_signal
sys.exit(cli.main({argv!r}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "dist-llm rank 0: SIGTERM: stopping at the next step boundary" in proc.stderr
    assert "stopped: SIGTERM at step 1: saved" in proc.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step_000000001"


def test_a_save_into_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(data, tmp_path):
    import resource
    import signal

    out = tmp_path / "run"
    torchrun(1, args(data, out, "train.steps=4", "logging.tensorboard=false"))
    root = out / "checkpoints"
    shard = next((root / "step_000000004" / "shards").glob("*.distcp"))
    limit = shard.stat().st_size // 2  # any file larger than this cannot be written: a full disk

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = {p: p.stat().st_size for p in (root / "step_000000004").rglob("*")}
    proc = subprocess.run(
        [sys.executable, *args(data, out, "logging.tensorboard=false")],
        env=job_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=full_disk,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "saving step 8 failed" in error[0] and "File too large" in error[0], (
        proc.stderr
    )
    assert "step_000000004" in error[0] and "free disk space" in error[0]
    assert (root / "latest").read_text() == "step_000000004" and not (root / "step_000000008").exists()
    assert {p: p.stat().st_size for p in (root / "step_000000004").rglob("*")} == before
