"""Output directories of `kvreuse demos` / `kvreuse train`, written all at once.

A run writes into a hidden staging directory beside `out` and swaps it in at the end, so an
interrupted run never leaves a mix of old and new files: `out` holds the previous result or
the new one, whole. `kvreuse demos` keeps its staging directory when interrupted (`resumable`):
finished pieces in it are reused by the next run, `out` stays untouched until the end.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..outputs import os_reason


def check_out(out: str | Path, what: str, holds: Callable[[Path], bool], owned: Callable[[Path], bool],
              overwrite: bool) -> Path:
    """Validate `out` before any work. `holds(out)`: it already holds a `what`; `owned(p)`: p is
    a file or directory a `what` consists of (only those are replaced with --overwrite)."""
    out = Path(out)
    for p in (out, *out.parents):  # mkdir would fail late on a file anywhere on the path
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {out}: {p} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not holds(out):
        raise ValueError(f"--out {out}: directory is not empty and holds no {what}; choose a new or empty directory")
    if not overwrite:
        raise ValueError(f"--out {out} already holds a {what}; pass --overwrite to replace it")
    foreign = sorted(p.name for p in out.iterdir() if not owned(p))
    if foreign:  # --overwrite replaces the whole directory: never delete what we did not write
        raise ValueError(f"--out {out}: also holds {foreign[:5]}, which are not part of a {what}; not replacing it")
    return out


def real_out(out: str | Path) -> Path:
    """`out` as an absolute path ("." or "x/.." have no usable name); a symlink's target, so that the
    swap replaces the directory it names, on its disk, and the link stays as it was."""
    out = Path(os.path.abspath(out))
    return out.resolve() if out.is_symlink() else out


def staging(out: Path) -> Path:
    """A fresh, empty hidden directory beside `out` (a leftover of a killed run is removed)."""
    out = real_out(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise _unwritable(out, tmp, e) from None
    return tmp


def _unwritable(out: Path, tmp: Path, e: OSError) -> ValueError:
    return ValueError(f"--out {out}: cannot write its work in progress {tmp}: {os_reason(e)}")


def resumable(out: Path) -> tuple[Path, int]:
    """The hidden directory `.NAME.partial` beside `out`, kept by an interrupted run so that the
    next one reuses what it finished, with an open descriptor holding its lock (close it when
    done): two runs on one `out` at a time would write the same pieces."""
    out = real_out(out)
    tmp = out.parent / f".{out.name}.partial"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:  # a read-only folder, a file of that name
        raise _unwritable(out, tmp, e) from None
    try:
        _lock(fd, out, f"its work in progress: {tmp}")
    except ValueError:
        os.close(fd)
        raise
    return tmp, fd


def _lock(fd: int, out: Path, held: str) -> None:
    """An exclusive lock on fd at once, or one error: a second run on one `out` would write the same files."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"--out {out}: another run is writing it ({held})") from None


@contextmanager
def claimed(out: str | Path) -> Iterator[None]:
    """Hold `out` for one run: an exclusive lock on `.NAME.lock` beside it. Without it two runs on
    one `out` each trained in their own staging directory and the later swap silently replaced the
    earlier result. The lock file is removed at the end, still locked; a run that locked a file
    removed under it finds another one (or none) at the path and counts as second."""
    out = real_out(out)
    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only folder, a file on the path
        raise _unwritable(out, path, e) from None
    try:
        held = f"it holds {path}"
        _lock(fd, out, held)
        try:
            ours = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            ours = False
        if not ours:  # removed under us by the run that held it: it is the first
            raise ValueError(f"--out {out}: another run is writing it ({held})")
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` (absent, empty, or checked by `check_out`) with `tmp`, by renames."""
    out = real_out(out)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:  # `out` must not be left missing: the previous result goes back
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    if old.exists():  # the new result is in place: a failure here must not read as "out is as it was"
        shutil.rmtree(old, ignore_errors=True)
