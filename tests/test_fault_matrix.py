"""The fault matrix (issue 19): every user mistake we know of, run through `dist-llm` in this
process, must exit with its status (2: one `error:` line; argument errors: argparse's 2), name
the file or the setting, and change nothing outside the command's output folder.

Each case builds its inputs in its own folder (`work`), the shared fixtures (tokenizer, shards,
checkpoints) are read-only to it; both are compared byte for byte before and after. The cases
run in-process (no subprocess, no process group): the whole matrix takes seconds. Costlier
failures that need real processes (a rank dying, preemption, a full disk) live beside their
subjects: tests/launch/test_torchrun.py, tests/train/test_train_cli.py, tests/test_files.py.
docs/troubleshooting.md points here for every row this covers.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dist_llm.checkpoint import META, WEIGHTS
from dist_llm.cli import main

from .checkpoint.builders import model_state, moments_of, write_sharded
from .eval.test_perplexity import make_checkpoint
from .launch_util import REPO
from .output_util import snapshot, unrelated_folder

TINY = str(REPO / "configs" / "tiny.yaml")


@dataclasses.dataclass(frozen=True)
class Paths:
    """What a case may name: its own folder and the shared, read-only inputs."""

    work: Path
    tokenizer: Path
    shards: Path
    weights: Path  # a weights-only checkpoint of configs/tiny.yaml's model
    trained: Path  # a sharded training checkpoint of the same model (step 4)


@dataclasses.dataclass(frozen=True)
class Case:
    argv: Callable[[Paths], list[str]]
    says: Callable[[Paths], list[str]]  # what stderr must contain (file names, settings)
    code: int = 2


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def copied(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def train(p: Paths, *overrides: str) -> list[str]:
    sources = f"data.sources=[{{path: '{p.shards}'}}]"
    return ["train", "--config", TINY, sources, f"train.out_dir={p.work / 'run'}", *overrides]


def shard(p: Paths, inputs: list[str], seq_len="8", tokenizer=None, out=None) -> list[str]:
    tokenizer, out = tokenizer or p.tokenizer, out or p.work / "out"
    return [
        "data",
        "shard",
        "--input",
        *inputs,
        "--tokenizer",
        str(tokenizer),
        "--seq-len",
        seq_len,
        "--out",
        str(out),
    ]


def tokenizer_train(p: Paths, text: str, out: Path | None = None) -> list[str]:
    inputs = str(write(p.work / "t.txt", text))
    return [
        "tokenizer",
        "train",
        "--input",
        inputs,
        "--vocab-size",
        "300",
        "--out",
        str(out or p.work / "out"),
    ]


def eval_of(p: Paths, checkpoint: Path) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--text", str(write(p.work / "t.txt", "words\n"))]


def latin1(p: Paths) -> str:
    return str(write(p.work / "latin1.txt", "Fran\u00e7ais caf\u00e9".encode("latin-1")))


def damaged_shard(p: Paths) -> Path:
    data = copied(p.shards, p.work / "ds")
    victim = sorted(data.glob("train-*.tar"))[0]
    blob = bytearray(victim.read_bytes())
    blob[600] ^= 0xFF  # one flipped byte inside the first member
    victim.write_bytes(bytes(blob))
    return data


def damaged_checkpoint(p: Paths, how: str) -> Path:
    ckpt = copied(p.weights, p.work / "ckpt")
    if how == "meta":
        (ckpt / META).write_text("{ this is not json")
    else:
        (ckpt / WEIGHTS).unlink()
    return ckpt


def folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def not_a_folder(p: Paths) -> str:
    return str(write(p.work / "file", "x") / "run")


def eval_text(make: Callable[[Path], Path], said: str) -> Case:
    """eval --text with a bad file: named before the (missing) checkpoint is looked at."""
    return Case(
        lambda p: ["eval", "--checkpoint", str(p.work / "no-checkpoint"), "--text", str(make(p.work))],
        lambda p: [f"error: --text {make(p.work)}", said],
    )


def generate_flag(flag: str, value: str) -> Case:
    return Case(
        lambda p: ["generate", "--checkpoint", str(p.weights), "--prompt", "x", flag, value],
        lambda p: [f"argument {flag}:"],
    )


GENERATE_FLAGS = [
    ("--temperature", "-1"),
    ("--temperature", "nan"),
    ("--top-p", "2"),
    ("--top-p", "0"),
    ("--top-k", "-3"),
    ("--max-new-tokens", "0"),
]

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- configuration
    "config unknown key": Case(
        lambda p: ["config", "show", "--config", str(write(p.work / "c.yaml", "model:\n  dimm: 5\n"))],
        lambda p: ["model.dimm: unknown key", "did you mean 'dim'", str(p.work / "c.yaml")],
    ),
    "config YAML syntax error": Case(
        lambda p: ["config", "show", "--config", str(write(p.work / "c.yaml", "model: [unclosed\n"))],
        lambda p: ["not valid YAML", str(p.work / "c.yaml")],
    ),
    "config file missing": Case(
        lambda p: ["config", "show", "--config", str(p.work / "nope.yaml")],
        lambda p: ["config file not found", str(p.work / "nope.yaml")],
    ),
    "train parallel.tensor=3": Case(
        lambda p: train(p, "parallel.tensor=3"), lambda p: ["parallel.tensor: 3 must divide model.n_heads"]
    ),
    "launch checks before any worker": Case(
        lambda p: ["launch", "--nproc-per-node", "2", *train(p, "parallel.tensor=3")],
        lambda p: ["parallel.tensor: 3 must divide model.n_heads"],
    ),
    "launch: data.seq_len against the shards": Case(
        lambda p: ["launch", "--check-only", "--nproc-per-node", "2", *train(p, "data.seq_len=32")],
        lambda p: ["data.seq_len: 32", str(p.shards), "--seq-len 64"],
    ),
    "launch: distill without a teacher": Case(
        lambda p: ["launch", "--check-only", "--nproc-per-node", "2", "distill", *train(p)[1:]],
        lambda p: ["distill.teacher: set it to the checkpoint of the teacher model"],
    ),
    "launch of a one-process stage": Case(
        lambda p: ["launch", "--nproc-per-node", "2", "eval", "--checkpoint", str(p.weights), "--text", "x"],
        lambda p: ["`eval` runs as one process"],
    ),
    "train.out_dir under a file": Case(
        lambda p: train(p, f"train.out_dir={not_a_folder(p)}"),
        lambda p: [
            f"train.out_dir: {p.work / 'file' / 'run'} cannot be created: {p.work / 'file'} is a file"
        ],
    ),
    "train.out_dir is a file": Case(
        lambda p: train(p, f"train.out_dir={write(p.work / 'file', 'x')}"),
        lambda p: [f"train.out_dir: {p.work / 'file'} exists and is not a folder"],
    ),
    # ---------------------------------------------------------------- resuming
    "resume a checkpoint of another shape": Case(
        lambda p: train(p, f"checkpoint.resume={p.trained}", "model.dim=128", "model.n_heads=4"),
        lambda p: [
            "model.dim: checkpoint 64, config 128",
            "layers.0.attention.wq.weight: checkpoint (64, 64)",
        ],
    ),
    "resume an unfinished save": Case(
        lambda p: train(p, f"checkpoint.resume={folder(p.work / 'step_000000009.tmp')}"),
        lambda p: ["unfinished save", str(p.work / "step_000000009.tmp")],
    ),
    "resume a folder that is no checkpoint": Case(
        lambda p: train(p, f"checkpoint.resume={p.shards}"),
        lambda p: [f"{p.shards} is not a complete dist-llm checkpoint"],
    ),
    "resume a missing checkpoint": Case(
        lambda p: train(p, f"checkpoint.resume={p.work / 'nope'}"),
        lambda p: [str(p.work / "nope"), "does not exist"],
    ),
    # ---------------------------------------------------------------- data
    "shard: a glob matching nothing": Case(
        lambda p: shard(p, [str(p.work / "nothing-*.txt")]),
        lambda p: [f"input '{p.work / 'nothing-*.txt'}' matches no file"],
    ),
    "shard: non-UTF-8 input": Case(
        lambda p: shard(p, [latin1(p)]),
        lambda p: [f"{p.work / 'latin1.txt'} (byte 4): not valid UTF-8", "--on-error skip"],
    ),
    "shard: bad --seq-len": Case(
        lambda p: shard(p, [str(write(p.work / "a.txt", "some words\n"))], seq_len="0"),
        lambda p: ["--seq-len must be positive, got 0"],
    ),
    "shard: missing tokenizer": Case(
        lambda p: shard(p, [str(write(p.work / "a.txt", "w\n"))], tokenizer=p.work / "tok"),
        lambda p: [f"tokenizer not found at {p.work / 'tok'}"],
    ),
    "shard: --out is somebody else's folder": Case(
        lambda p: shard(p, [str(write(p.work / "a.txt", "w\n"))], out=unrelated_folder(p.work / "victim")),
        lambda p: [f"{p.work / 'victim'} exists and is not a", "it is never replaced"],
    ),
    "data inspect --verify: a shard's sha256 differs": Case(
        lambda p: ["data", "inspect", "--data", str(damaged_shard(p)), "--verify"],
        lambda p: [
            "1 of",
            "shards failed verification",
            str(sorted((p.work / "ds").glob("train-*.tar"))[0].name),
        ],
    ),
    "tokenizer train on an empty file": Case(
        lambda p: tokenizer_train(p, " \n\n"), lambda p: [f"{p.work / 't.txt'}: no text to train on"]
    ),
    "tokenizer train: --out is somebody else's folder": Case(
        lambda p: tokenizer_train(p, "w w\n", out=unrelated_folder(p.work / "victim")),
        lambda p: [f"{p.work / 'victim'} exists and is not a", "it is never replaced"],
    ),
    # ---------------------------------------------------------------- checkpoints and models
    "eval: garbage dist_llm.json": Case(
        lambda p: eval_of(p, damaged_checkpoint(p, "meta")),
        lambda p: [f"{p.work / 'ckpt' / META} is damaged (not valid JSON"],
    ),
    "eval: weights file missing": Case(
        lambda p: eval_of(p, damaged_checkpoint(p, "weights")),
        lambda p: [f"{p.work / 'ckpt' / WEIGHTS} is missing"],
    ),
    "import-hf of a folder that is not Hugging Face's": Case(
        lambda p: [
            "import-hf",
            "--model",
            str(unrelated_folder(p.work / "notes")),
            "--out",
            str(p.work / "out"),
        ],
        lambda p: [f"{p.work / 'notes'}: no config.json", "--model"],
    ),
    "import-hf of a missing folder": Case(
        lambda p: ["import-hf", "--model", str(p.work / "nope"), "--out", str(p.work / "out")],
        lambda p: [f"{p.work / 'nope'} is not a folder"],
    ),
    "export-hf: --out is somebody else's folder": Case(
        lambda p: [
            "export-hf",
            "--checkpoint",
            str(p.weights),
            "--out",
            str(unrelated_folder(p.work / "victim")),
        ],
        lambda p: [f"{p.work / 'victim'} exists and is not a", "it is never replaced"],
    ),
    "quantize: --out is somebody else's folder": Case(
        lambda p: [
            "quantize",
            "--checkpoint",
            str(p.weights),
            "--out",
            str(unrelated_folder(p.work / "victim")),
            "--method",
            "int8",
            "--text",
            str(write(p.work / "t.txt", "words\n")),
        ],
        lambda p: [f"{p.work / 'victim'} exists and is not a", "it is never replaced"],
    ),
    # ---------------------------------------------------------------- eval and generate arguments
    "eval --text missing.txt": eval_text(lambda w: w / "missing.txt", "no such file"),
    "eval --text a folder": eval_text(lambda w: w, "is a folder"),
    "eval --text non-UTF-8": eval_text(lambda w: write(w / "l1.txt", b"caf\xe9"), "not UTF-8 at byte 3"),
    "eval --text only whitespace": eval_text(lambda w: write(w / "blank.txt", b"  \n\t\n"), "holds no text"),
    **{f"generate {flag} {value}": generate_flag(flag, value) for flag, value in GENERATE_FLAGS},
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer_dir, comedy_shards) -> dict:
    root = tmp_path_factory.mktemp("matrix")
    weights, config = make_checkpoint(root / "weights", tokenizer_dir)
    state = {f"model/{k}": v for k, v in model_state(config).items()}
    trained = write_sharded(
        root / "trained" / "step_000000004",
        config,
        {**state, **moments_of(model_state(config))},
        tokenizer_dir,
    )
    return {"tokenizer": tokenizer_dir, "shards": comedy_shards, "weights": weights, "trained": trained}


def on_screen(err: str) -> list[str]:
    """stderr as a terminal shows it: what a carriage return overwrote (a progress bar) is gone."""
    lines = (line.rsplit("\r", 1)[-1] for line in err.split("\n"))
    return [line for line in lines if line.strip()]


def run(argv: list[str]) -> int:
    """`dist-llm ARGV` as the console script runs it: its status, argparse's exits included."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("name", CASES)
def test_fault(name, shared, tmp_path, capsys):
    case = CASES[name]
    paths = Paths(work=tmp_path / "work", **shared)
    paths.work.mkdir()
    argv, expected = case.argv(paths), case.says(paths)  # builds the case's inputs
    readonly = [paths.tokenizer, paths.shards, paths.weights, paths.trained]
    before = [snapshot(paths.work), *map(snapshot, readonly)]
    capsys.readouterr()
    code = run(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    for text in expected:
        assert text in err, (text, err)
    if "argument" not in err:  # argparse's own errors start with its usage
        screen = on_screen(err)
        assert screen[0].startswith("error: "), err  # the first line the user reads
        assert sum(line.startswith("error:") for line in screen) == 1, err  # and said once
    assert not torch.distributed.is_initialized()  # refused before any process group
    outputs = {"out", "run"}  # the command's own output folders (none may be left behind either)
    assert not any((paths.work / o).exists() for o in outputs), sorted(paths.work.iterdir())
    assert [snapshot(paths.work), *map(snapshot, readonly)] == before
