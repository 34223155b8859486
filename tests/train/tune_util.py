"""What the LoRA and DPO tests share: a tiny base checkpoint with the plays' tokenizer, preference
pairs built from real lines of the plays, and a stage run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dist_llm.checkpoint import save_weights_only
from dist_llm.config import Config, ModelConfig
from dist_llm.model.llama import Llama

from ..launch_util import REPO, job_env

# The model of configs/tiny.yaml, which the stages run with.
TINY = ModelConfig(
    vocab_size=2048, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, max_seq_len=256
)


def base_checkpoint(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A weights-only checkpoint of a freshly initialized tiny model, with the tokenizer."""
    config = Config(model=TINY)
    model = Llama(TINY, seed=seed)
    return save_weights_only(folder, model.state_dict(), config, tokenizer_dir)


def play_lines(plays: list[Path], count: int) -> list[str]:
    """`count` distinct lines of verse from the plays (8 to 60 characters, letters first)."""
    seen: list[str] = []
    for play in plays:
        for line in play.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if 8 <= len(line) <= 60 and line[0].isalpha() and line not in seen:
                seen.append(line)
                if len(seen) == count:
                    return seen
    raise AssertionError("not enough lines")


def write_pairs(path: Path, lines: list[str]) -> Path:
    """Synthetic but learnable preferences over real text: the line as written is chosen over
    the same line in capitals (the same words, so only a learned preference separates them)."""
    with path.open("w") as f:
        for i, line in enumerate(lines):
            prompt = f"Line {i}:\n"
            f.write(json.dumps({"prompt": prompt, "chosen": line, "rejected": line.upper()}) + "\n")
    return path


def stage(command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dist_llm", command, *args],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def result(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{") :])
