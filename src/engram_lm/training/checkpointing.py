"""When a training loop saves, and what: a checkpoint every `save_every` steps, at the last
step, when a stop was requested, and every `save_minutes` of wall time (on any rank's
clock). `SaveCadence` is the when, shared by `engram train` and `engram retrofit`;
`Checkpointer` is the model's save (checkpoint/store.py: atomic, a checkpoint is whole or
absent, and "latest" is the newest complete one)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from engram_lm.checkpoint import store as ckpt_io
from engram_lm.distributed.context import DistContext
from engram_lm.memory.host_trainable import HostTableStepper
from engram_lm.training.config import TrainConfig


class SaveCadence:
    """Whether step `done` ends with a save. `any_rank` makes the wall-clock answer the same on
    every rank (a collective under torchrun; the plain bool in one process)."""

    def __init__(self, steps: int, save_every: int, save_minutes: float,
                 any_rank: Callable[[bool], bool] = bool) -> None:  # fmt: skip
        self.steps, self.save_every, self.save_minutes, self.any_rank = steps, save_every, save_minutes, any_rank
        self.last_save = time.monotonic()

    def is_due(self, done: int, stopping: bool) -> bool:
        overdue = time.monotonic() - self.last_save >= 60 * self.save_minutes if self.save_minutes else False
        return bool((self.save_every and done % self.save_every == 0) or done == self.steps or stopping
                    or self.any_rank(overdue))  # fmt: skip

    def saved(self) -> None:
        self.last_save = time.monotonic()


class Checkpointer:
    def __init__(self, out_dir: Path, cfg: TrainConfig, model: torch.nn.Module, optimizers: dict[str, Any],
                 state: dict[str, Any], tokenizer_path: Path, ctx: DistContext,
                 stepper: HostTableStepper | None = None) -> None:  # fmt: skip
        self.out_dir, self.model, self.optimizers = out_dir, model, optimizers
        self.state, self.tokenizer_path, self.ctx, self.stepper = state, tokenizer_path, ctx, stepper
        self.cadence = SaveCadence(cfg.steps, cfg.save_every, cfg.save_minutes, ctx.any)

    def is_due(self, done: int, stopping: bool) -> bool:
        return self.cadence.is_due(done, stopping)

    def save(self, step: int) -> None:
        if self.stepper is not None:
            self.stepper.wait()  # the rows and moments of this step, not of the one before
        ckpt_io.save_checkpoint(self.out_dir, step, self.model, self.optimizers, self.state, self.tokenizer_path,
                                rank=self.ctx.rank, world_size=self.ctx.world_size)  # fmt: skip
        self.cadence.saved()
