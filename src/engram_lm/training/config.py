"""TrainConfig: what to train on and how (the model is a separate ModelConfig)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from engram_lm.config import check_field_types, checked_fields


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    data: str = "bible"  # built-in corpus name or a path (.txt, .jsonl, folder)
    tokenizer: str = "bpe:4096"  # bpe:V (trained on the data), a built-in name, or a path
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    table_lr_mult: float = 5.0  # paper: Engram tables at 5x the base lr (Adam)
    weight_decay: float = 0.1
    # decoupled decay (x the table lr) of the table rows a step touches; 0 is the paper's optimiser. None: chosen
    # by how often the run reads its data (training/regime.py): 10 when at most once, else 0 with row dropout 0.7
    table_weight_decay: float | None = None
    warmup_steps: int = 20
    decay_at: tuple[float, ...] = (0.8, 0.9)  # fractions of the run where lr steps down
    decay_factor: float = 0.316
    grad_clip: float = 1.0  # on dense parameters; 0 disables
    matrix_optimizer: str = "muon"  # "muon" (paper) or "adamw" for the 2-D block matrices
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500  # steps between checkpoints (0: by time and at the end only)
    save_minutes: float = 10.0  # also save when this long has passed since the last save (0: off)

    def __post_init__(self) -> None:
        if isinstance(self.decay_at, list):
            object.__setattr__(self, "decay_at", tuple(self.decay_at))
        check_field_types(self)
        object.__setattr__(self, "decay_at", tuple(float(x) for x in self.decay_at))
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid TrainConfig.{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("warmup_steps", "save_every", "seed", "save_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"invalid TrainConfig.{name}={getattr(self, name)!r}: must be >= 0")
        if self.table_weight_decay is not None and not self.table_weight_decay >= 0:
            raise ValueError(f"invalid TrainConfig.table_weight_decay={self.table_weight_decay!r}: must be >= 0")
        if not self.lr > 0 or not self.table_lr_mult > 0:
            raise ValueError(f"invalid TrainConfig.lr={self.lr} / table_lr_mult={self.table_lr_mult}: must be > 0")
        if self.matrix_optimizer not in ("muon", "adamw"):
            raise ValueError(f"invalid TrainConfig.matrix_optimizer={self.matrix_optimizer!r}: use 'muon' or 'adamw'")
        if any(not 0 < f < 1 for f in self.decay_at) or not 0 < self.decay_factor <= 1:
            raise ValueError("invalid TrainConfig.decay_at/decay_factor: fractions in (0, 1), factor in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decay_at"] = list(self.decay_at)
        return d

    @property
    def tokens_per_step(self) -> int:
        """Training tokens one optimizer step reads (the global batch, over every rank)."""
        return self.batch_size * self.seq_len * self.grad_accum

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**checked_fields(cls, d))

    def with_(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)
