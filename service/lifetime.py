"""Processes that must not outlive their parent (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a no-op)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when the thread that started it exits. With ``parent``
    (the pid that started this process, known from before: ``spawned_by()``), a parent already gone by now
    (it died while this process was still importing, and the kernel sends nothing for a death before the
    call) means ``sig`` at once."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if parent is not None and os.getppid() != parent:  # reparented: the parent died before the call
            os.kill(os.getpid(), sig)


def spawned_by() -> int | None:
    """The pid of the process that started this multiprocessing child (None in a process it did not start)."""
    p = multiprocessing.parent_process()
    return None if p is None else p.pid
