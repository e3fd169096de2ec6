"""When the training loop saves, and what: a checkpoint every `save_every` steps, at the
last step, when a stop was requested, and every `save_minutes` of wall time (on any rank's
clock). Writing is atomic (checkpoint/store.py): a checkpoint is whole or absent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from engram_lm.checkpoint import store as ckpt_io
from engram_lm.distributed.context import DistContext
from engram_lm.memory.host_trainable import HostTableStepper
from engram_lm.training.config import TrainConfig


class Checkpointer:
    def __init__(self, out_dir: Path, cfg: TrainConfig, model: torch.nn.Module, optimizers: dict[str, Any],
                 state: dict[str, Any], tokenizer_path: Path, ctx: DistContext,
                 stepper: HostTableStepper | None = None) -> None:  # fmt: skip
        self.out_dir, self.cfg, self.model, self.optimizers = out_dir, cfg, model, optimizers
        self.state, self.tokenizer_path, self.ctx, self.stepper = state, tokenizer_path, ctx, stepper
        self.last_save = time.monotonic()

    def is_due(self, done: int, stopping: bool) -> bool:
        """Whether step `done` ends with a save; the same answer on every rank."""
        cfg = self.cfg
        overdue = time.monotonic() - self.last_save >= 60 * cfg.save_minutes if cfg.save_minutes else False
        return bool((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps or stopping
                    or self.ctx.any(overdue))  # fmt: skip

    def save(self, step: int) -> None:
        if self.stepper is not None:
            self.stepper.wait()  # the rows and moments of this step, not of the one before
        ckpt_io.save_checkpoint(self.out_dir, step, self.model, self.optimizers, self.state, self.tokenizer_path,
                                rank=self.ctx.rank, world_size=self.ctx.world_size)  # fmt: skip
        self.last_save = time.monotonic()
