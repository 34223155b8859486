"""The one way a folder is replaced: checked first, written beside, swapped in, the old removed
last; whatever goes wrong, the old folder stays whole and no staging folder is left."""

import os
import sys
from pathlib import Path

import pytest

from dist_llm import files
from dist_llm.errors import InputError, OutputExists
from dist_llm.files import OutputKind, check_output_dir, holds_only, replace_dir, staged_output

from .output_util import snapshot, staging_left, unrelated_folder

MINE = OutputKind("a test output", "a folder holding mine.txt", lambda p: (p / "mine.txt").is_file())


def mine(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "mine.txt").write_text(text)
    (path / "deep").mkdir(exist_ok=True)
    (path / "deep" / "part").write_text(text)
    return path


@pytest.fixture(params=["exchange", "renames"])
def swap(request, monkeypatch):
    """Both ways of swapping: renameat2's exchange, and the two renames where it is missing."""
    if request.param == "renames":
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    return request.param


def test_replace_dir_puts_the_new_folder_in_place(tmp_path, swap):
    new = mine(tmp_path / "new", "new")
    replace_dir(new, tmp_path / "out")  # nothing there yet
    assert (tmp_path / "out" / "mine.txt").read_text() == "new" and not new.exists()
    replace_dir(mine(tmp_path / "newer", "newer"), tmp_path / "out")  # over a folder with a subfolder
    assert snapshot(tmp_path / "out") == {"deep": None, "deep/part": b"newer", "mine.txt": b"newer"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_by_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = mine(tmp_path / "out", "old")
    new = mine(tmp_path / "new", "new")
    real_replace = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        replace_dir(new, out)
    assert (out / "mine.txt").read_text() == "old" and staging_left(out) == []


def test_staged_output_swaps_in_on_success_and_leaves_nothing_on_failure(tmp_path, swap):
    out = tmp_path / "a" / "out"  # missing parents are made
    with staged_output(out, MINE, overwrite=False) as staging:
        mine(staging, "first")
    assert (out / "mine.txt").read_text() == "first"
    before = snapshot(out)
    with (
        pytest.raises(RuntimeError, match="writer died"),
        staged_output(out, MINE, overwrite=True) as staging,
    ):
        mine(staging, "second")
        raise RuntimeError("writer died")
    assert snapshot(out) == before and staging_left(out) == []
    with staged_output(out, MINE, overwrite=True) as staging:
        mine(staging, "second")
    assert (out / "mine.txt").read_text() == "second" and staging_left(out) == []


def test_somebody_elses_folder_is_never_replaced(tmp_path):
    victim = unrelated_folder(tmp_path / "victim")
    before = snapshot(victim)
    for overwrite in (False, True):
        with pytest.raises(OutputExists, match=rf"{victim} exists and is not a test output; it is never"):
            check_output_dir(victim, MINE, overwrite)
        with pytest.raises(OutputExists), staged_output(victim, MINE, overwrite):
            pytest.fail("never reached: nothing is staged for a folder that is not ours")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExists, match="is not a test output"):
        check_output_dir(tmp_path / "file", MINE, True)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputExists, match="is a symbolic link"):
        check_output_dir(tmp_path / "link", MINE, True)
    assert snapshot(victim) == before and staging_left(victim) == []
    assert issubclass(OutputExists, InputError)  # the CLI prints it as one line and exits 2


def test_own_output_needs_overwrite_and_an_empty_folder_is_fine(tmp_path):
    out = mine(tmp_path / "out", "old")
    with pytest.raises(OutputExists, match="already holds a test output: pass --overwrite"):
        check_output_dir(out, MINE, overwrite=False)
    check_output_dir(out, MINE, overwrite=True)
    (tmp_path / "empty").mkdir()
    with staged_output(tmp_path / "empty", MINE, overwrite=False) as staging:
        mine(staging, "new")
    assert (tmp_path / "empty" / "mine.txt").read_text() == "new"


def test_a_folder_that_changed_while_the_stage_ran_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExists), staged_output(out, MINE, overwrite=True) as staging:
        mine(staging, "new")
        unrelated_folder(out)  # somebody else wrote there meanwhile
    assert (out / "notes.txt").read_text() == "my notes\n" and staging_left(out) == []


def test_out_given_as_dot_is_staged_beside_it(tmp_path, monkeypatch):
    out = mine(tmp_path / "out", "old")
    monkeypatch.chdir(out)
    with staged_output(Path("."), MINE, overwrite=True) as staging:
        assert staging.parent == tmp_path
        mine(staging, "new")
    assert (out / "mine.txt").read_text() == "new" and staging_left(out) == []


def test_holds_only(tmp_path):
    (tmp_path / "a").write_text("")
    (tmp_path / "b").write_text("")
    assert holds_only(tmp_path, ["a"], ["a", "b"])
    assert not holds_only(tmp_path, ["a", "c"], ["a", "b", "c"])  # c is required
    assert not holds_only(tmp_path, ["a"], ["a"])  # b is not allowed
    (tmp_path / "sub").mkdir()
    assert not holds_only(tmp_path, ["a"], ["a", "b", "sub"])  # never a folder


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = mine(tmp_path / "a", "a"), mine(tmp_path / "b", "b")
    assert files._exchange(a, b)  # what replace_dir uses here; the renames are the fallback
    assert (a / "mine.txt").read_text() == "b" and (b / "mine.txt").read_text() == "a"
