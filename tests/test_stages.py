"""The stage registry (dist_llm/stages.py) is the one list of stages: the CLI's subcommands, which
stages `dist-llm submit` and the sbatch script run on every rank, and the import layering."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_llm import stages
from dist_llm.cli import build_parser
from dist_llm.launch import submit, torchrun
from dist_llm.launch.job import StageJob

from .launch_util import REPO

DISTRIBUTED = [s.name for s in stages.STAGES if s.distributed]


def test_every_stage_has_a_parser_help_and_run_function(capsys):
    names = [s.name for s in stages.STAGES]
    assert len(names) == len(set(names)) and "submit" not in names and "launch" not in names
    assert DISTRIBUTED == ["train", "distill", "dpo"]  # the stages every rank runs; the rest run once
    for stage in stages.STAGES:  # a launcher checks a distributed stage before starting its ranks
        assert (stage.check is not None) == stage.distributed, stage.name
    for stage in (*stages.STAGES, submit.SUBMIT, torchrun.LAUNCH):
        assert stage.help and callable(stage.run) and callable(stage.add_arguments), stage.name
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*stage.name.split(), "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: dist-llm {stage.name} "), stage.name


def test_dist_llm_help_lists_every_stage():
    def help_of(*words: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dist_llm", *words, "--help"], cwd=REPO, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    top = " ".join(help_of().split())  # argparse wraps long help lines
    for stage in (*stages.STAGES, submit.SUBMIT, torchrun.LAUNCH):
        group, _, action = stage.name.partition(" ")
        listing = " ".join(help_of(group).split()) if action else top
        assert f" {action or group} {stage.help} " in listing, stage.name
    for group, text in stages.GROUPS.items():
        assert f" {group} {text} " in top, group


def test_parsed_arguments_carry_their_stage():
    stage, args = stages.parse(
        ["data", "shard", "--input", "a.txt", "--tokenizer", "t", "--seq-len", "8", "--out", "o"]
    )
    assert stage.name == "data shard" and stage.run is stages.cmd_data_shard and args.seq_len == 8
    args = build_parser().parse_args(["submit", "--wait", "eval", "--checkpoint", "c"])
    assert args.stage_def is submit.SUBMIT and args.command == ["eval", "--checkpoint", "c"]


def with_distributed(monkeypatch, name: str) -> stages.Stage:
    """The registry with one more stage marked distributed: launchers must follow it."""
    changed = tuple(dataclasses.replace(s, distributed=True) if s.name == name else s for s in stages.STAGES)
    monkeypatch.setattr(stages, "STAGES", changed)
    return next(s for s in changed if s.name == name)


def test_submit_runs_exactly_the_registrys_distributed_stages_on_every_task():
    args = argparse.Namespace(nodes=2, tasks_per_node=4, gpus_per_node=8)
    for stage in stages.STAGES:
        assert submit.layout(args, stage) == ((2, 4) if stage.distributed else (1, 1)), stage.name
    command = ["train", "--config", str(REPO / "configs" / "tiny.yaml")]
    train = next(s for s in stages.STAGES if s.name == "train")
    assert submit.stage_argv(argparse.Namespace(command=command, config=None)) == (command, train)


def test_a_requeued_job_resumes_the_registrys_distributed_stages(monkeypatch):
    train = ["train", "--config", "configs/tiny.yaml", "train.steps=2"]
    evaluate = ["eval", "--checkpoint", "c", "--data", "d"]
    assert StageJob(train).checkpoint().function.argv == [*train, "checkpoint.resume=auto"]
    assert StageJob(evaluate).checkpoint().function.argv == evaluate
    with_distributed(monkeypatch, "eval")
    assert StageJob(evaluate).checkpoint().function.argv == [*evaluate, "checkpoint.resume=auto"]


def test_sbatch_asks_the_registry_for_the_distributed_stages():
    script = (REPO / "slurm" / "dist-llm.sbatch").read_text()
    helper = '"$PYTHON" -m dist_llm.stages --distributed'
    assert helper in script and "train | distill" not in script
    assert helper in (REPO / "slurm" / "submit.sh").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "dist_llm.stages", "--distributed"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.splitlines() == DISTRIBUTED


def fake_slurm(tmp_path: Path) -> dict:
    """srun and scontrol that only print: enough to see which branch the sbatch script takes."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (bin_ / "scontrol").write_text(
        '#!/bin/sh\n[ "$2" = hostnames ] && echo node1 || echo "NodeAddr=10.0.0.1"\n'
    )
    for tool in bin_.iterdir():
        tool.chmod(0o755)
    return dict(
        os.environ,
        PATH=f"{bin_}:{os.environ['PATH']}",
        DIST_LLM_PYTHON=sys.executable,
        SLURM_JOB_ID="123",
        SLURM_JOB_NODELIST="node1",
        SLURM_JOB_NUM_NODES="1",
    )


def sbatch(env: dict, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    script = str(REPO / "slurm" / "dist-llm.sbatch")
    return subprocess.run(
        ["bash", script, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_sbatch_runs_distributed_stages_under_torchrun_and_others_once(tmp_path, comedy_shards):
    env = fake_slurm(tmp_path)
    for stage in stages.STAGES:
        if stage.distributed:  # checked before srun, so it needs a real command line: below
            continue
        argv = [*stage.name.split(), "--some-arg"]
        proc = sbatch(env, tmp_path, *argv)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        srun = next(line for line in proc.stdout.splitlines() if line.startswith("srun "))
        assert "-m torch.distributed.run" not in srun and srun.endswith(f"-m dist_llm {' '.join(argv)}"), srun
    data = f"data.sources=[{{path: '{comedy_shards}'}}]"
    argv = [
        "train",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        data,
        f"train.out_dir={tmp_path / 'run'}",
    ]
    proc = sbatch(env, tmp_path, *argv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    srun = next(line for line in proc.stdout.splitlines() if line.startswith("srun "))
    assert "-m torch.distributed.run" in srun and srun.endswith(f"-m dist_llm {' '.join(argv)}"), srun


def imports(path: Path) -> set[str]:
    """Every dist_llm module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("dist_llm")}


def test_the_registry_sits_below_the_cli_and_the_launchers():
    package = REPO / "dist_llm"
    assert not {
        m for m in imports(package / "stages.py") if m.startswith(("dist_llm.cli", "dist_llm.launch"))
    }
    for launcher in (package / "launch").glob("*.py"):
        assert not {m for m in imports(launcher) if m.startswith("dist_llm.cli")}, launcher.name
    assert "dist_llm.launch.submit" not in imports(package / "launch" / "job.py")
