"""Small file helpers shared by every stage: atomic writes, atomic folder replacement, hashes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dist_llm.errors import OutputExists


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside `path`, fsync, then rename over it.

    A crash at any point leaves either the old file or the new one, never half of either.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def make_temp_dir(beside: Path, tag: str) -> Path:
    """A fresh folder next to `beside` (same file system, so it can be renamed into place)."""
    path = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}.{tag}-"))
    path.chmod(0o777 & ~_umask())
    return path


# ---------------------------------------------------------------- output folders


@dataclass(frozen=True)
class OutputKind:
    """What a stage writes to --out, so it can tell its own output from somebody else's folder."""

    name: str  # "a sharded dataset"
    rule: str  # how it is recognised, quoted in the refusal: "a folder holding manifest.json"
    test: Callable[[Path], bool]  # called on an existing, non-empty folder


def holds_only(path: Path, required: Iterable[str], allowed: Iterable[str]) -> bool:
    """True if `path` holds every `required` file and nothing but `allowed` files (no folders)."""
    entries = list(Path(path).iterdir())
    names = {e.name for e in entries}
    return set(required) <= names <= set(allowed) and all(e.is_file() for e in entries)


def check_output_dir(out: Path, kind: OutputKind, overwrite: bool) -> None:
    """Refuse `out` unless it is absent, an empty folder, or `kind`'s output with `overwrite` set.

    A stage only ever replaces what the same kind of stage wrote, so a mistyped --out cannot
    delete anybody's folder. Call it before anything is written (and `staged_output` again
    before the swap)."""
    out = Path(out)
    if out.is_symlink():
        raise OutputExists(f"{out} is a symbolic link; pass the folder it points to as --out")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out.is_dir() and kind.test(out)):
        raise OutputExists(
            f"{out} exists and is not {kind.name}; it is never replaced: choose another --out "
            f"(only {kind.rule} is replaced, with --overwrite)"
        )
    if not overwrite:
        raise OutputExists(
            f"{out} already holds {kind.name}: pass --overwrite to replace it, or choose another --out"
        )


@contextlib.contextmanager
def staged_output(out: Path, kind: OutputKind, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh folder beside `out` to write the output into; on success it replaces `out`
    (`replace_dir`), on any error it is removed and `out` is left as it was."""
    check_output_dir(out, kind, overwrite)
    target = Path(os.path.abspath(out))  # "." or "a/.." have no name to put a sibling beside
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(target, "staging")
    try:
        yield staging
        check_output_dir(out, kind, overwrite)  # again: the stage may have run for hours
        replace_dir(staging, target)
    finally:
        # A no-op after a swap (the staging name is gone); after an error, our half-written output.
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(staging: Path, out: Path) -> None:
    """Put the folder `staging` at `out`; whatever was at `out` is removed only once the new
    folder is in place, so a failure or crash at any moment leaves the old or the new folder."""
    staging, out = Path(staging), Path(out)
    if not os.path.lexists(out):
        os.replace(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging)  # now holds the old folder
    else:
        _replace_by_renames(staging, out)


def _replace_by_renames(staging: Path, out: Path) -> None:
    """Where paths cannot be exchanged: move the old folder aside, move the new one in, remove the
    old. A crash in between leaves the old folder whole in a hidden `.<name>.old-*` beside."""
    aside = make_temp_dir(out, "old")
    os.replace(out, aside / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(aside / out.name, out)  # put the old one back
        aside.rmdir()
        raise
    shutil.rmtree(aside)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), so `b` is never missing,
    not even for an instant; False where the C library or the file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, obj) -> None:
    with atomic_writer(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
