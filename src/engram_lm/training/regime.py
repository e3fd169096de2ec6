"""How a run keeps its Engram tables from memorising data it reads more than once, chosen by
how often it will read that data.

The study (docs/results.md, "regime") trained MoE and MoE+Engram to about 1, 2.5 and 4 epochs
of three corpora, 3 seeds each:
- reading the data once, a table decay of 10 (decoupled, x the table lr, on the rows a step
  touches) is the best regulariser measured: Engram 0.06-0.09 nats ahead of the MoE;
- when the data repeats, that decay falls behind the MoE on 250k-token slices of code and
  novels (+0.08 nats at 4 epochs), while whole-row dropout 0.7 with no decay stays ahead
  (-0.06 code, -0.02 novels) at a cost of about 0.02 nats at one epoch.
So a run whose config leaves `table_weight_decay` unset (None) takes decay 10 when it reads
its data at most once, and row dropout 0.7 with no decay when it repeats. A decay the config
names is used as named, with the model's own row dropout; so is a row dropout the model sets.

`planned_epochs` is decided before step 0 from the run's steps and its training tokens; a
resumed run keeps the choice it started with (config.json "table_regime"), even when
`--steps` extends it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from engram_lm.models.config import ModelConfig

SINGLE_EPOCH_TABLE_DECAY = 10.0  # the best single-epoch regulariser the study measured
REPEATED_ROW_DROPOUT = 0.7  # the one that held past one epoch on every corpus measured


@dataclass(frozen=True)
class TableRegime:
    planned_epochs: float
    table_weight_decay: float
    row_dropout: float
    chosen: str  # "single-epoch" / "repeated data": by the regime; "set": the config named the decay

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TableRegime":
        return cls(float(d["planned_epochs"]), float(d["table_weight_decay"]), float(d["row_dropout"]), str(d["chosen"]))

    def line(self) -> str:
        """One line for the log: what the run reads and what it does about it."""
        how = f"table decay {self.table_weight_decay:g}" + (f", whole-row dropout {self.row_dropout:g}" if self.row_dropout else "")
        if self.chosen == "set":
            return f"tables: {how} as configured ({self.planned_epochs:.2f} epochs planned)"
        return f"tables: {self.chosen} ({self.planned_epochs:.2f} epochs planned), so {how} (training/regime.py)"


def planned_epochs(steps: int, tokens_per_step: int, train_tokens: int) -> float:
    """How many times the run will read its training tokens."""
    if train_tokens < 1:
        raise ValueError("the training split is empty: give more text (or a smaller validation share)")
    return steps * tokens_per_step / train_tokens


def choose_table_regime(epochs: float, table_weight_decay: float | None, row_dropout: float) -> TableRegime:
    """The decay and row dropout a run trains its tables with (module docstring)."""
    if table_weight_decay is not None:
        return TableRegime(epochs, float(table_weight_decay), row_dropout, "set")
    if epochs <= 1.0:
        return TableRegime(epochs, SINGLE_EPOCH_TABLE_DECAY, row_dropout, "single-epoch")
    return TableRegime(epochs, 0.0, row_dropout or REPEATED_ROW_DROPOUT, "repeated data")


def with_row_dropout(model_cfg: ModelConfig, regime: TableRegime) -> ModelConfig:
    """The model config with the regime's row dropout (a model without Engram is unchanged)."""
    if model_cfg.engram is None or model_cfg.engram.row_dropout == regime.row_dropout:
        return model_cfg
    return model_cfg.with_(engram=model_cfg.engram.with_(row_dropout=regime.row_dropout))
