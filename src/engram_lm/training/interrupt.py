"""Stopping a run on request: SIGINT/SIGTERM set a flag, the loop saves at the end of the
step and raises `TrainingInterrupted` (the CLI turns it into a one-line exit, code 130)."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path


class TrainingInterrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving the checkpoint of `step`."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved in {run_dir}; rerun the same command to resume")
        self.run_dir, self.step = run_dir, step


@contextlib.contextmanager
def graceful_stop():
    """A flag ({"stop": bool}) set by SIGINT/SIGTERM (main thread only); the loop saves and
    stops at the end of the step. A second Ctrl-C while saving is honoured by the default
    handler."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["stop"] = True
        signal.signal(signum, previous[signum])

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
