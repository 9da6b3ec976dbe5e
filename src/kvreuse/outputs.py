"""Output paths checked before the work whose results they will hold: a bad --json-out or
--report-dir is one error line at the start, not a traceback after minutes of timing."""

from __future__ import annotations

import os
from pathlib import Path


def _why(e: OSError) -> str:
    return "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else str(e.strerror)


def check_file_out(path: str | Path, option: str) -> Path:
    """`path` can be written as a file: not a folder, its folder made if missing and writable."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot make its folder ({_why(e)})") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable")
    return p


def check_dir_out(path: str | Path, option: str) -> Path:
    """`path` is (or is made) a writable folder."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write there ({_why(e)}); give a writable folder") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"{option} {path}: not writable; give a writable folder")
    return p
