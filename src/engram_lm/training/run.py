"""Run folders: resolved config, versions and git revision, metrics.jsonl, progress line."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engram_lm.models.config import ModelConfig
from engram_lm.training.config import TrainConfig


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def read_request(requested: dict[str, Any]) -> dict[str, Any]:
    """A saved {"model", "train"} request read through today's configs: a field added since it
    was saved takes its default (an added field's default keeps the behaviour the run had; a
    field that existed was saved with its value, so a changed default still shows as a change),
    and a train field removed since is dropped. A request the configs cannot read is returned
    as it is, for the caller's comparison to name."""
    try:
        model = ModelConfig.from_dict(requested["model"]).to_dict()
        fields = TrainConfig.__dataclass_fields__
        train = TrainConfig.from_dict({k: v for k, v in requested["train"].items() if k in fields}).to_dict()
    except (KeyError, TypeError, ValueError, AttributeError):
        return requested
    return json.loads(json.dumps({"model": model, "train": train}))


def run_metadata() -> dict[str, Any]:
    versions = {}
    for dist in ("engram-lm", "torch", "numpy", "tokenizers", "safetensors"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "versions": {"python": platform.python_version(), **versions},
        "git_revision": git_revision(),
        "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},  # fmt: skip
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the checkpoint step are dropped.
    A torn line (a crash mid-write) is dropped too; non-finite numbers are written as null
    so every line stays valid JSON."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            keep = [r for r in _parse_lines(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, **record: Any) -> None:
        clean = {k: (None if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")) else v)
                 for k, v in record.items()}  # fmt: skip
        with self.path.open("a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return _parse_lines(self.path) if self.path.exists() else []


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue  # torn by a crash mid-write
        if isinstance(record, dict):
            out.append(record)
    return out


class Progress:
    """One status line (loss, tokens/s, ETA), redrawn in place on a terminal. With
    `later_steps` (runs that follow in the same job) the ETA is the job's, and says so."""

    def __init__(self, name: str, total: int, enabled: bool = True, every: int = 10, later_steps: int = 0) -> None:
        self.name, self.total, self.enabled, self.every, self.later_steps = name, total, enabled, every, later_steps
        self.tty = sys.stderr.isatty()
        self._last_draw = 0.0

    def update(self, step: int, loss: float, tokens_per_s: float, eta_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and now - self._last_draw < 0.2 and step != self.total:
            return
        if not self.tty and step % self.every and step != self.total:
            return  # logs and pipes get one line per logging interval
        self._last_draw = now
        width = 24
        done = int(width * step / self.total)
        bar = "#" * done + "." * (width - done)
        line = (f"{self.name} [{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s "
                f"ETA {int(eta_s) // 60}:{int(eta_s) % 60:02d}{' (whole job)' if self.later_steps else ''}{extra}")  # fmt: skip
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


class RunFolderBusy(ValueError):
    """The run folder is locked by another live process."""


class RunLock:
    """One owner per run folder: an advisory lock on <run>/.lock holding the owner's pid.

    The kernel drops the lock when the owning process exits, however it exits, so a crashed
    run never leaves the folder stuck; a second process gets a refusal naming the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {self.path.parent} is in use by {holder}; wait for it to finish, stop it, "
                "or pass another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
