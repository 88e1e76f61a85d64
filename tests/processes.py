"""Ending the processes the tests launch (each in its own session, ``start_new_session=True``)."""

from __future__ import annotations

import os
import signal
import subprocess


def end_group(proc: subprocess.Popen, wait_s: float = 30) -> None:
    """SIGKILL ``proc``'s process group if it is still running (its children, e.g. data workers,
    too), then reap it; a group already gone is fine."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=wait_s)
