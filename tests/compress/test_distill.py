"""Distillation through the one training loop: the soft loss itself, a distilled student against
the same student trained from scratch on the same tokens, and prune-then-distill."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dist_llm.compress.distill import distill_loss

from ..launch_util import REPO, job_env


def test_distill_loss_limits():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    ce = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(distill_loss(student, teacher, labels, 0.0, 2.0), ce)
    assert distill_loss(student, student, labels, 1.0, 2.0).abs().item() < 1e-6
    keep = labels.flatten() != -100
    kl = F.kl_div(
        F.log_softmax(student.flatten(0, 1)[keep], -1),
        F.log_softmax(teacher.flatten(0, 1)[keep], -1),
        log_target=True,
        reduction="batchmean",
    )
    assert torch.allclose(distill_loss(student, teacher, labels, 1.0, 1.0), kl)


@pytest.fixture(scope="module")
def data(comedy_shards):
    return comedy_shards


def stage(command, data, out, *extra):
    args = [
        sys.executable,
        "-m",
        "dist_llm",
        command,
        "--config",
        "configs/tiny.yaml",
        f"data.sources=[{{path: '{data}'}}]",
        f"train.out_dir={out}",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        "logging.every=1000",
        "logging.val_batches=10",
        "logging.tensorboard=false",
        *extra,
    ]
    proc = subprocess.run(args, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def test_distilled_student_beats_the_same_student_from_scratch(data, tmp_path):
    teacher = stage(
        "train",
        data,
        tmp_path / "teacher",
        "train.steps=200",
        "model.dim=128",
        "model.n_layers=4",
        "model.ffn_hidden=384",
        "logging.val_every=200",
    )
    student = ["train.steps=60", "logging.val_every=60"]
    scratch = stage("train", data, tmp_path / "scratch", *student)
    distilled = stage(
        "distill",
        data,
        tmp_path / "student",
        *student,
        f"distill.teacher={teacher['checkpoint']}",
        "distill.alpha=0.9",
        "distill.temperature=1.0",
    )
    assert teacher["val_loss"] < distilled["val_loss"] < scratch["val_loss"] - 0.1, (
        teacher,
        distilled,
        scratch,
    )
    # Prune the teacher's MLPs by half, then distill the pruned model back (Minitron's recipe).
    from dist_llm.compress.prune import run_prune

    run_prune(
        teacher["checkpoint"],
        tmp_path / "pruned",
        "mlp",
        0.5,
        "",
        {"data": str(data), "split": "train", "texts": (), "samples": 16, "seq_len": 64},
        {"data": str(data), "split": "val", "texts": (), "max_batches": 5},
    )
    healed = stage(
        "distill",
        data,
        tmp_path / "healed",
        "train.steps=20",
        "logging.val_every=20",
        f"distill.teacher={teacher['checkpoint']}",
        f"checkpoint.init_from={tmp_path / 'pruned'}",
        "distill.alpha=0.9",
        "distill.temperature=1.0",
    )
    saved = json.loads((tmp_path / "healed" / "checkpoints" / "step_000000020" / "dist_llm.json").read_text())
    assert saved["config"]["model"]["ffn_hidden"] == 192 and saved["config"]["model"]["dim"] == 128
    assert healed["val_loss"] < 7.0
