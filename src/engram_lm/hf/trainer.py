"""Training an Engram-retrofitted model with `transformers.Trainer` (and what builds on it, TRL).

Two things stop a plain Trainer: it takes one optimizer, while the tables want sparse-row Adam
and the rest AdamW (`engram_optimizers`); and it computes the gradient norm over every
parameter, which fails on the tables' sparse gradients. So:
- `CombinedOptimizer` steps several optimizers as one `torch.optim.Optimizer`: its
  `param_groups` are theirs (the same dicts, so Trainer's learning-rate scheduler scales
  each group, the tables' 5x kept), and its state dict holds theirs by name;
- `EngramTrainer` builds that from `engram_optimizers(model, lr=args.learning_rate, ...)`
  and clips (and logs the norm of) the dense gradients only, as `engram train` does; the
  tables' rows are not clipped.
Save the memory with `save_engram` (and LoRA with peft's `save_pretrained`). Trainer's own
checkpoints hold what the model's save_pretrained writes: for a peft model, the LoRA weights
only. So every checkpoint also gets the memory as an adapter (`<checkpoint>/engram`, save_engram's
format), and resuming copies it back into the model's Engram in place: a resumed run ends
bit-identical to the unbroken one, LoRA or not (tested). `args.weight_decay` does not apply: the
optimizers are ours. The overridden methods are Trainer's private `_clip_grad_norm`,
`_get_grad_norm`, `_save` and `_load_from_checkpoint` (tested against transformers 5.25).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from engram_lm.hf.adapter import restore_engram, save_engram
from engram_lm.hf.train import engram_optimizers
from engram_lm.training.allocator import keep_large_buffers_on_heap


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped and zeroed as one."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = dict(optimizers)
        params = [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter is in more than one optimizer: each may step it only once")
        super().__init__(params, {})
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]  # theirs, not copies

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state_dict)}, this model's optimizers are "
                             f"{sorted(self.optimizers)}: it was saved for another setup (LoRA or not, another base)")  # fmt: skip
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


def dense_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The norm of the dense gradients, clipped to `max_norm` (inf: measure only); sparse ones are left alone."""
    dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
    if not dense:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(dense, max_norm)


class EngramTrainer(transformers.Trainer):
    """`transformers.Trainer` for a model with Engram added (`add_engram`, on a base or a peft model).

    table_lr_mult: the tables' learning rate over `args.learning_rate` (the paper's 5);
    other_lr: LoRA weights' (or an unfrozen base's) learning rate, default `args.learning_rate`.
    Everything else is Trainer's own."""

    def __init__(self, *args: Any, table_lr_mult: float = 5.0, other_lr: float | None = None, **kwargs: Any) -> None:
        keep_large_buffers_on_heap()  # the step's big buffers stay mapped (training/allocator.py)
        self.table_lr_mult, self.other_lr = table_lr_mult, other_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opts = engram_optimizers(self.model if model is None else model, lr=self.args.learning_rate,
                                     table_lr_mult=self.table_lr_mult, other_lr=self.other_lr)  # fmt: skip
            order = sorted(opts, key=lambda name: name == "table")  # the tables last: Trainer logs the first group's lr
            self.optimizer = CombinedOptimizer({name: opts[name] for name in order})
        return self.optimizer

    def _clip_grad_norm(self, model):
        return dense_grad_norm(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        return float(dense_grad_norm(model, float("inf")) if grad_norm is None else grad_norm)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # peft saves LoRA only: the memory goes beside it, in the adapter format
            save_engram(self.model, Path(output_dir or self.args.output_dir) / MEMORY_FOLDER)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        folder = Path(resume_from_checkpoint) / MEMORY_FOLDER
        if folder.is_dir():
            restore_engram(self.model, folder)
        elif _is_peft(self.model):  # the memory is nowhere else in a peft checkpoint: never resume from fresh tables
            raise ValueError(f"{resume_from_checkpoint} holds no Engram memory ({MEMORY_FOLDER}/): it was not written by "
                             "EngramTrainer, and a peft model's checkpoint keeps LoRA only; resume from a checkpoint "
                             "EngramTrainer wrote, or start the run again")  # fmt: skip


MEMORY_FOLDER = "engram"  # inside each Trainer checkpoint


def _is_peft(model: torch.nn.Module) -> bool:
    return any(type(m).__name__.startswith("Peft") for m in (model, getattr(model, "module", None)) if m is not None)
