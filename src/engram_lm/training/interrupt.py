"""Stopping a run: on request (SIGINT/SIGTERM set a flag, the loop saves at the end of the
step and raises `TrainingInterrupted`, which the CLI turns into a one-line exit, code 130),
or because its loss stopped being finite (nothing is saved after that step)."""

from __future__ import annotations

import contextlib
import math
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


def refuse_divergence(loss: float, step: int, last_good: Path | None, fix: str) -> None:
    """Stop a run whose loss is no longer finite, naming the last good checkpoint and `fix`."""
    if not math.isfinite(loss):
        raise ValueError(f"the training loss became {loss} at step {step}: the run diverged; nothing was saved after it"
                         f" (last good checkpoint: {last_good or 'none'}); {fix}")
