"""The study's section `oe-diagnosis`: why OverEncoding (its paper's form) loses to no memory
at this scale. The same largest table with the token embedding kept at full scale, or with
Engram's 5x table learning rate, each against the no-memory MoE of the same seed."""

from __future__ import annotations

from typing import Any

from engram_lm.experiments.page import keyed_section
from engram_lm.experiments.runner import RunSpec
from engram_lm.experiments.scaling import SCALING_TABLE_PARAMS, scaling_configs
from engram_lm.recipes import paper_optimiser, quickstart_moe


def oe_diagnosis_specs(*, seeds, prefix: str = "") -> list[RunSpec]:
    """Why OverEncoding (paper form) might lose to no memory here: the same largest table
    with the token embedding kept at full scale (E + mean of the n-gram vectors), or with
    Engram's 5x table learning rate; the MoE per seed for the comparison."""
    moe, train_cfg = quickstart_moe()
    train_cfg = paper_optimiser(train_cfg)
    configs = scaling_configs(max(SCALING_TABLE_PARAMS))
    oe = configs["overencoding"]
    variants = {"overencoding_add_mean": (configs["overencoding_add_mean"], 1.0), "overencoding_lr5x": (oe, 5.0),
                "overencoding": (oe, 1.0), "moe": (moe, train_cfg.table_lr_mult)}  # fmt: skip
    specs = []
    for seed in seeds:
        for name, (model, mult) in variants.items():
            t = train_cfg.with_(seed=seed, table_lr_mult=mult)
            specs.append(RunSpec(f"{prefix}{name}/seed-{seed}", model, t, {"experiment": "oe-diagnosis", "variant": name, "seed": seed}))
    return specs


def oe_diagnosis_section(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    return keyed_section(
        runs, "Why OverEncoding loses to no memory here: a diagnosis", "variant", "moe",
        "OverEncoding at its largest table (8.4M parameters), `{data}` ({epochs} epochs), {seeds} seed(s): the "
        "paper's form ((E + sum W T) / (1 + H), base lr), the token embedding kept at full scale (E + mean of "
        "W T), and the paper's form at Engram's 5x table lr; each minus the no-memory MoE.",
        {"overencoding": "sanity (diagnosis): OverEncoding, paper form, beats no memory",
         "overencoding_add_mean": "OverEncoding with the token embedding at full scale beats no memory"},
        expect="lower")  # fmt: skip
