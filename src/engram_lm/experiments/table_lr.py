"""The study's section `table-lr`: the table learning-rate multiplier (the paper trains the
tables at 5x the base learning rate), swept at the quickstart MoE+Engram."""

from __future__ import annotations

from typing import Any

from engram_lm.experiments.page import keyed_section
from engram_lm.experiments.runner import RunSpec
from engram_lm.recipes import paper_optimiser, quickstart_engram


TABLE_LR_MULTS = (0.5, 1.0, 2.0, 5.0, 10.0)


def table_lr_specs(*, seeds, data: str = "bible", prefix: str = "") -> list[RunSpec]:
    engram, train_cfg = quickstart_engram()
    train_cfg = paper_optimiser(train_cfg)
    specs = []
    for seed in seeds:
        for mult in TABLE_LR_MULTS:
            tags = {"experiment": "table-lr", "table_lr_mult": mult, "seed": seed}
            t = train_cfg.with_(seed=seed, data=data, table_lr_mult=mult)
            specs.append(RunSpec(f"{prefix}mult-{mult:g}/seed-{seed}", engram, t, tags))
    return specs


def table_lr_section(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    return keyed_section(
        runs, "Table learning-rate multiplier", "table_lr_mult", 5.0,
        "MoE+Engram (rho = 0.75), `{data}` ({epochs} epochs), {seeds} seed(s); the paper uses 5x.",
        {m: f"table lr: the paper's 5x beats {m:g}x" for m in (0.5, 1.0, 2.0, 10.0)})
