"""Worker processes of the long commands (sweep, demos)."""

from __future__ import annotations

import os


def die_with_parent(parent: int) -> None:
    """Call first in a worker: it must not outlive a killed run (kill -9, the OOM killer, a
    timeout), or it would go on with its queued work unseen. Linux: the kernel sends SIGKILL when
    the thread that started the worker ends; elsewhere the worker checks `os.getppid()` per job."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)
