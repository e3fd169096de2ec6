"""What the sweeps share: an Engram resized to a number of memory slots, the slot count of a
config, and the quickstart's training run (paper optimiser) at a sweep's steps, data and seed."""

from __future__ import annotations

from engram_lm.config import EngramConfig
from engram_lm.hashing.layout import build_layout
from engram_lm.models.accounting import engram_with_rows
from engram_lm.recipes import paper_optimiser, quickstart_moe
from engram_lm.training.config import TrainConfig


def with_slots(engram: EngramConfig, slots: int) -> EngramConfig:
    columns = len(engram.layer_ids) * engram.num_hash_columns
    return engram_with_rows(engram, slots, max(2, slots // columns))


def quickstart_train(steps: int | None, data: str | None, seed: int) -> TrainConfig:
    train_cfg = paper_optimiser(quickstart_moe()[1])
    if steps is not None:
        train_cfg = train_cfg.with_(steps=steps, eval_every=min(train_cfg.eval_every, steps))
    return train_cfg.with_(seed=seed, **({"data": data} if data is not None else {}))


def slots(engram: EngramConfig) -> int:
    """Table rows over every layer and hash head (what a fixed memory budget holds fixed)."""
    return build_layout(engram, 1, 0).total_rows
