"""quantize and prune replace only a weights-only checkpoint, and only with --overwrite; every
argument (the report's evaluation source included) is checked before anything is written, and a
failure while writing or reporting leaves the previous output whole, no staging folder beside."""

import pytest

from dist_llm.cli import main

from ..output_util import snapshot, staging_left, unrelated_folder
from .test_prune import tiny

# Two settings each, so that a replaced output differs from the one before.
ARGS = {
    "quantize": (["--method", "int8"], ["--method", "int4", "--group-size", "16"]),
    "prune": (
        ["--method", "magnitude", "--sparsity", "0.5"],
        ["--method", "magnitude", "--sparsity", "0.25"],
    ),
}


@pytest.fixture
def work(tmp_path, tokenizer_dir, plays):
    _, _, ckpt = tiny(tmp_path, tokenizer_dir, n_layers=1)  # small and short: seconds per command
    text = tmp_path / "t.txt"
    text.write_text(plays[2].read_text(encoding="utf-8")[:800], encoding="utf-8")
    return ckpt, text


def run(command, work, out, setting=0, *extra, sources=None):
    ckpt, text = work
    sources = ["--text", str(text)] if sources is None else sources  # calibration, and evaluation by default
    return main(
        [command, "--checkpoint", str(ckpt), "--out", str(out), *ARGS[command][setting], *sources, *extra]
    )


@pytest.mark.parametrize("command", ARGS)
def test_somebody_elses_folder_survives(command, work, tmp_path, capsys):
    victim = unrelated_folder(tmp_path / "victim")
    before = snapshot(victim)
    for extra in ([], ["--overwrite"]):
        assert run(command, work, victim, 0, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"error: {victim} exists and is not a weights-only dist-llm checkpoint; it is never"
        )
        assert err.count("\n") == 1
    assert snapshot(victim) == before and staging_left(victim) == []


@pytest.mark.parametrize("command", ARGS)
def test_own_output_is_replaced_only_with_overwrite(command, work, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(command, work, out, 0) == 0
    first = snapshot(out)
    assert {"dist_llm.json", "model.safetensors", "report.json", "tensorboard"} <= first.keys()
    assert run(command, work, out, 1) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {out} already holds a weights-only dist-llm checkpoint"
    )
    assert snapshot(out) == first
    assert run(command, work, out, 1, "--overwrite") == 0
    assert snapshot(out)["model.safetensors"] != first["model.safetensors"] and staging_left(out) == []


@pytest.mark.parametrize("command", ARGS)
def test_a_failure_while_reporting_keeps_the_old_output(command, work, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run(command, work, out, 0) == 0
    before = snapshot(out)

    def dies(*args):  # after the new weights and report.json are written
        raise OSError("No space left on device")

    monkeypatch.setattr("dist_llm.compress.report._tensorboard", dies)
    with pytest.raises(OSError, match="No space left"):
        run(command, work, out, 1, "--overwrite")
    assert snapshot(out) == before and staging_left(out) == []


def test_quantize_without_an_evaluation_source_writes_nothing(work, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("quantize", work, out, 0, sources=[]) == 2
    assert (
        "error: the report's evaluation needs --eval-data SHARDS or --eval-text FILES"
        in capsys.readouterr().err
    )
    assert not out.exists() and staging_left(out) == []
    assert run("quantize", work, out, 0) == 0  # an existing output is not touched either
    before = snapshot(out)
    for sources in ([], ["--eval-text", str(tmp_path / "missing.txt")]):
        assert run("quantize", work, out, 1, "--overwrite", sources=sources) == 2
        assert snapshot(out) == before and staging_left(out) == []
    assert "missing.txt is not a file" in capsys.readouterr().err


def test_prune_checks_its_sources_before_writing(work, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("prune", work, out, 0, sources=[]) == 2
    assert "error: calibration needs --data SHARDS or --text FILES" in capsys.readouterr().err
    missing = ["--text", str(work[1]), "--eval-text", str(tmp_path / "missing.txt")]
    assert run("prune", work, out, 0, sources=missing) == 2
    assert "missing.txt is not a file" in capsys.readouterr().err
    assert run("prune", work, out, 0, "--pattern", "2-4") == 2
    assert "--pattern '2-4' is not N:M" in capsys.readouterr().err
    assert not out.exists() and staging_left(out) == []
