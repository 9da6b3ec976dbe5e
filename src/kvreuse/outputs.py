"""Output paths checked before the work whose results they will hold: a bad --json-out or
--report-dir is one error line at the start, not a traceback after minutes of timing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn


def stop_keeping(e: BaseException, what: str, kept: str) -> NoReturn:
    """Raise for a long command that stops on `e` with work kept aside (`kept` says where). Ctrl-C
    and other non-errors carry the note to the CLI's interrupt line; bad input becomes one error
    line; any other error (a bug, the device, the disk) keeps its type and traceback, which the CLI
    prints before its one line saying what was kept."""
    if isinstance(e, ValueError):
        raise ValueError(f"{what}: {e} ({kept})") from e
    e.kept, e.what = kept, what
    raise e


def os_reason(e: OSError) -> str:
    """Why a path could not be written, in words for an error line."""
    return "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else str(e.strerror)


def md_cell(text: str) -> str:
    """Text for a Markdown table cell: a bare | (the phase gate's "phase(raw>=0.9|0.995)") ends the cell,
    shifting every number after it one column to the right."""
    return text.replace("|", "\\|")


def usual_mode(path: Path) -> None:
    """Give a file the mode a new file gets here (0666 less the umask): safetensors writes 0600
    (a temp file renamed), which a shared results or checkpoint folder could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_file_out(path: str | Path, option: str) -> Path:
    """`path` can be written as a file: not a folder, its folder made if missing and writable."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot make its folder ({os_reason(e)})") from None
    existed = p.exists()
    try:  # not os.access: it says yes to root everywhere, /proc and read-only mounts included
        with open(p, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path}: not writable ({os_reason(e)})") from None
    if not existed:
        p.unlink(missing_ok=True)
    return p


def check_dir_out(path: str | Path, option: str) -> Path:
    """`path` is (or is made) a writable folder."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write there ({os_reason(e)}); give a writable folder") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"{option} {path}: not writable; give a writable folder")
    return p
