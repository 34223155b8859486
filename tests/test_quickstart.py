"""The README's first command, whole, in a shortened form: scripts/quickstart.sh with a training
budget that ends at the first step, so that a broken quickstart fails CI on any machine."""

import json
import subprocess

from .launch_util import REPO, job_env


def test_quickstart_runs_every_stage_and_stops_at_its_budget(tmp_path):
    work = tmp_path / "quickstart"
    proc = subprocess.run(
        # The budget (0.6 s) has passed when step 1 ends; validation reads 2 batches.
        ["bash", "scripts/quickstart.sh", "train.max_minutes=0.01", "logging.val_batches=2"],
        cwd=REPO,
        env=job_env(QUICKSTART_WORK=str(work), QUICKSTART_EVAL_BATCHES="2"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for n in range(1, 7):
        assert f"== {n}/6 " in out
    assert "stopped: train.max_minutes=0.01 reached at step 1 of 150" in out
    summary = json.loads(out[out.index("\n{", out.index("== 4/6")) : out.index("== 5/6")])
    assert summary["step"] == 1 and summary["val_loss"] > 0
    evaluated = json.loads(out[out.index("\n{", out.index("== 5/6")) : out.index("== 6/6")])
    assert evaluated["tokens"] > 0 and evaluated["perplexity"] > 1
    assert out.split("== 6/6 generate")[1].strip().startswith("ROMEO:")
    assert (work / "run" / "checkpoints" / "step_000000001" / "dist_llm.json").exists()
    assert (work / "run" / "tensorboard").is_dir()
