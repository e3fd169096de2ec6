"""`engram study --workers N`: N study processes on one --out folder, one thread each.

On a CPU, N one-thread trainers finish more runs per hour than one N-thread trainer at
these model sizes (small matrices scale poorly across threads). The workers share the plan
without a scheduler: each run folder is locked by its trainer and a worker skips a folder
that another holds (runner.py). Worker K writes its output to <out>/worker-K.log. This
process prints a progress line every `every_s` seconds, forwards SIGINT/SIGTERM to the
workers as SIGTERM (each saves a checkpoint at the end of its current step) and waits for
them; it never trains. The page is then written by a fresh interpreter (`report_command`):
code edited during hours of training is read whole, never half as imported at the start
and half as it is now.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence


class StudyStopped(Exception):
    """SIGINT/SIGTERM stopped the workers; each saved a checkpoint of its run."""


def worker_command(*, seeds: int, out: Path, long_data: str | None, sections: Sequence[str] | None,
                   device: str | None) -> list[str]:  # fmt: skip
    """One worker: the same study, no report (the parent writes it once all have stopped)."""
    cmd = [sys.executable, "-m", "engram_lm", "study", "--seeds", str(seeds), "--out", str(out), "--report", ""]
    if long_data:
        cmd += ["--long-data", str(long_data)]
    if sections:
        cmd += ["--sections", ",".join(sections)]
    if device:
        cmd += ["--device", device]
    return cmd


def report_command(out: Path, report: Path) -> list[str]:
    """`engram experiment report` for the study in `out`: section outputs, then the page."""
    return [sys.executable, "-m", "engram_lm", "experiment", "report", "--runs", str(out), "--out", str(report)]


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """One intra-op thread per worker unless the caller chose otherwise."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return env


def run_workers(commands: list[list[str]], logs: list[Path], *, progress: Callable[[], str] | None = None,
                every_s: float = 60.0, stagger_s: float = 10.0, env: dict[str, str] | None = None) -> tuple[list[int], bool]:  # fmt: skip
    """Start one process per command (output appended to its log), wait for all of them.
    Returns (exit codes, whether a SIGINT/SIGTERM stopped them)."""
    procs: list[subprocess.Popen] = []
    stopped = False

    def forward(signum, frame) -> None:
        nonlocal stopped
        stopped = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i, (cmd, log) in enumerate(zip(commands, logs)):
            if stopped:
                break
            if i:
                _sleep_unless(lambda: stopped, stagger_s)  # the first worker takes the first run's lock first
            with open(log, "a") as f:  # the child keeps its own descriptor
                # a new session: a terminal's Ctrl-C reaches only this process, which forwards SIGTERM
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            print(f"worker {i + 1}: pid {procs[-1].pid}, log {log}", flush=True)
        last = time.monotonic()
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)
            if progress is not None and time.monotonic() - last >= every_s:
                print(progress(), flush=True)
                last = time.monotonic()
    except BaseException:  # this process failed: do not leave workers training unattended
        forward(signal.SIGTERM, None)
        for p in procs:
            p.wait()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return [p.returncode for p in procs], stopped


def _sleep_unless(stop: Callable[[], bool], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop():
        time.sleep(0.1)
