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
    """Append-only metrics.jsonl; on resume, lines past the checkpoint step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, **record: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


class Progress:
    """One status line (loss, tokens/s, ETA), redrawn in place on a terminal."""

    def __init__(self, name: str, total: int, enabled: bool = True, every: int = 10) -> None:
        self.name, self.total, self.enabled, self.every = name, total, enabled, every
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
                f"ETA {int(eta_s) // 60}:{int(eta_s) % 60:02d}{extra}")  # fmt: skip
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)
