"""SIGTERM / SIGINT handling: finish the current step, save a checkpoint, exit cleanly.

TPU VMs announce preemption with SIGTERM. While :class:`PreemptionGuard` is active, a signal only
sets :attr:`PreemptionGuard.requested`; the training loop checks it after every step, saves, and
raises :class:`Preempted`. Outside training (generation writes atomic shards) the signal raises
:class:`Preempted` at once, since nothing half-written can be read as complete.
"""

from __future__ import annotations

import signal
import threading

from sdcil_jax.errors import UserError


class Preempted(UserError):
    """The run was stopped by a signal after saving; rerunning the same command resumes it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PreemptionGuard:
    """Context manager installing SIGTERM/SIGINT handlers (main thread only; no-op elsewhere)."""

    def __init__(self):
        self.requested: int | None = None
        self.deferred = False  # True while a step loop can save before stopping
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        del frame
        self.requested = signum
        if not self.deferred:
            raise Preempted(f"Stopped by {signal.Signals(signum).name}; rerun the same command "
                            "to resume.", signum)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
