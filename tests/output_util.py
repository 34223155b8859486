"""What the output-folder tests share: somebody else's folder, a byte-for-byte picture of a tree,
and the staging folders a stage may have left beside its output."""

from __future__ import annotations

from pathlib import Path


def unrelated_folder(path: Path) -> Path:
    """A folder that no stage wrote: a file and a subfolder with a file."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return path


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every entry under `path` by relative name: a file's bytes, None for a folder."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))
    }


def staging_left(out: Path) -> list[str]:
    """Hidden `.<name>.*` folders beside `out` (staging or set-aside old output)."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
