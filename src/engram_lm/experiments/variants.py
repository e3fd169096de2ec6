"""`engram experiment scaling` and `engram experiment ablations`: sweeps of one backbone.

scaling (paper Figure 3, right): the backbone stays fixed (the quickstart MoE) and only the
memory grows. Engram and OverEncoding (as its paper defines it, models/overencoding.py)
are swept over the same table-parameter budgets, 16x apart end to end, so the x-axis is
table parameters, not slots (an OverEncoding row and an Engram row have different
widths); active parameters are reported beside them. The no-memory MoE trains once per
seed. OverEncoding tables train at the base learning rate (its paper's choice), Engram's
at 5x (this paper's). Because the paper-form OverEncoding loses to no memory at this scale
(docs/results.md, the diagnosis), the sweep also runs its strongest variant here, the token
embedding kept at full scale plus the mean of the n-gram vectors (`overencoding_add_mean`),
so the slope comparison is made against a baseline that helps as well.
ablations (paper Figure 5): from the quickstart MoE+Engram reference, remove one piece at a
time (gating, tokenizer compression, short conv), add 4-grams at the same number of slots,
move the single module to each layer, and the capacity-1 control. On an M-branch backbone
(`branches`, the paper's mHC uses 4) one more: `no_branch_fusion`, one key projection, gate and
conv norm on the mean of the branches instead of one per branch, the same output added to
every branch (our reading of the paper's "multi-branch fusion" ablation; the paper gives no formula).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

from engram_lm.config import EngramConfig
from engram_lm.experiments.runner import RunSpec, sweep, write_csv
from engram_lm.experiments.stats import estimate
from engram_lm.hashing.layout import build_layout
from engram_lm.models.accounting import engram_with_rows
from engram_lm.models.config import ModelConfig
from engram_lm.models.overencoding import OVERENCODING_TABLE_LR_MULT, overencoding_for_budget
from engram_lm.plotting import regime_caption, saved_figure
from engram_lm.recipes import paper_optimiser, quickstart_engram, quickstart_moe
from engram_lm.training.config import TrainConfig
from engram_lm.training.run import run_metadata, write_json

SCALING_TABLE_PARAMS = (524_288, 1_048_576, 2_097_152, 4_194_304, 8_388_608)
SCALING_FIELDS = ("method", "slots", "table_params", "active_params", "seed", "val_loss", "epochs")
ABLATION_FIELDS = ("variant", "seed", "val_loss", "params_total", "params_active", "epochs")


def _with_slots(engram: EngramConfig, slots: int) -> EngramConfig:
    columns = len(engram.layer_ids) * engram.num_hash_columns
    return engram_with_rows(engram, slots, max(2, slots // columns))


def _quickstart_train(steps: int | None, data: str | None, seed: int) -> TrainConfig:
    train_cfg = paper_optimiser(quickstart_moe()[1])
    if steps is not None:
        train_cfg = train_cfg.with_(steps=steps, eval_every=min(train_cfg.eval_every, steps))
    return train_cfg.with_(seed=seed, **({"data": data} if data is not None else {}))


@functools.lru_cache(maxsize=64)
def scaling_configs(table_params: int) -> dict[str, ModelConfig]:
    base, _ = quickstart_moe()
    engram = quickstart_engram()[0].engram
    oe = overencoding_for_budget(table_params, base.dim)
    return {"engram": base.with_(engram=_with_slots(engram, table_params // engram.head_dim)),
            "overencoding": base.with_(overencoding=oe),
            "overencoding_add_mean": base.with_(overencoding=oe.with_(combine="add_mean"))}  # fmt: skip


def scaling_specs(*, budgets=SCALING_TABLE_PARAMS, seeds=(0,), steps: int | None = None, data: str | None = None,
                  prefix: str = "", methods: tuple[str, ...] | None = None) -> list[RunSpec]:  # fmt: skip
    """Per seed: the MoE, then the memories (`methods`, default all) from the largest budget
    down (the sanity check that matters most, OverEncoding at its largest size vs no memory,
    comes first)."""
    base, _ = quickstart_moe()
    specs = []
    for seed in seeds:
        train_cfg = _quickstart_train(steps, data, seed)
        specs.append(RunSpec(f"{prefix}moe/seed-{seed}", base, train_cfg, {"experiment": "scaling", "method": "moe", "seed": seed}))
        for budget in sorted(budgets, reverse=True):
            for method, cfg in scaling_configs(budget).items():
                if methods is not None and method not in methods:
                    continue
                t = train_cfg.with_(table_lr_mult=OVERENCODING_TABLE_LR_MULT) if cfg.overencoding else train_cfg
                tags = {"experiment": "scaling", "method": method, "budget": budget, "seed": seed}
                specs.append(RunSpec(f"{prefix}{method}/budget-{budget}/seed-{seed}", cfg, t, tags))
    return specs


TWO_MODULES = (1, 2)


def slots(engram: EngramConfig) -> int:
    """Table rows over every layer and hash head (what a fixed memory budget holds fixed)."""
    return build_layout(engram, 1, 0).total_rows


def ablation_configs(branches: int = 1) -> dict[str, ModelConfig]:
    ref = quickstart_engram()[0].with_(num_branches=branches)
    e = ref.engram
    four = _with_slots(e.with_(max_ngram=4, table_sizes=(2, 2, 2)), slots(e))
    variants = {"reference": ref, "no_gating": ref.with_(engram=e.with_(use_gating=False)),
                "no_compression": ref.with_(engram=e.with_(compress_tokens=False)),
                "no_short_conv": ref.with_(engram=e.with_(use_short_conv=False)),
                "with_4grams": ref.with_(engram=four), "capacity1": ref.with_(engram=e.with_(single_slot=True))}  # fmt: skip
    for layer in range(ref.num_layers):
        if (layer,) != e.layer_ids:
            variants[f"layer_{layer}"] = ref.with_(engram=e.with_(layer_ids=(layer,)))
    # the paper: two modules (layers 2 and 6 of its ablation model) beat one. Here the early layer and the middle
    # one, the same number of slots split between them; each module brings its own projections, gate and conv
    variants["two_modules"] = ref.with_(engram=_with_slots(e.with_(layer_ids=TWO_MODULES), slots(e)))
    if branches > 1:
        variants["no_branch_fusion"] = ref.with_(engram=e.with_(branch_fusion=False))
    return variants


def ablation_specs(*, seeds=(0,), steps: int | None = None, data: str | None = None, prefix: str = "", branches: int = 1,
                   variants: tuple[str, ...] | None = None, experiment: str = "ablations") -> list[RunSpec]:  # fmt: skip
    """Every variant of ablation_configs(branches) per seed, or only the named `variants`."""
    configs = ablation_configs(branches)
    unknown = sorted(set(variants or ()) - set(configs))
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown} at {branches} branch(es); choose from {sorted(configs)}")
    specs = []
    for seed in seeds:
        for name, cfg in configs.items():
            if variants is not None and name not in variants:
                continue
            tags = {"experiment": experiment, "variant": name, "seed": seed}
            specs.append(RunSpec(f"{prefix}{name}/seed-{seed}", cfg, _quickstart_train(steps, data, seed), tags))
    return specs


def scaling_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"method": r["method"], "slots": _slots_of(r), "table_params": r["params_engram"],
             "active_params": r["params_active"], "seed": r["seed"], "val_loss": r["val_loss"], "epochs": r["epochs"]}
            for r in results]  # fmt: skip


def _slots_of(r: dict[str, Any]) -> int:
    model = r["requested"]["model"]
    if model.get("engram"):
        return r["params_engram"] // (model["engram"]["embed_per_ngram"] // model["engram"]["num_heads"])
    if model.get("overencoding"):
        return r["params_engram"] // model["overencoding"]["table_dim"]
    return 0


def scaling_sweep(out_dir: Path, *, progress: bool = True, device: str | None = None, **kwargs: Any) -> list[dict]:
    return scaling_rows(sweep(out_dir, scaling_specs(**kwargs), write_scaling, progress=progress, device=device))


def write_scaling(results: list[dict[str, Any]], out_dir: Path) -> None:
    if not results:
        return
    rows = scaling_rows(results)
    write_csv(out_dir / "scaling.csv", rows, SCALING_FIELDS)
    write_json(out_dir / "scaling.json", {"runs": results, **run_metadata()})
    _plot_scaling(rows, out_dir / "scaling.png", regime_caption(results))


def ablation_sweep(out_dir: Path, *, progress: bool = True, device: str | None = None, **kwargs: Any) -> list[dict]:
    return sweep(out_dir, ablation_specs(**kwargs), write_ablations, progress=progress, device=device)


def write_ablations(results: list[dict[str, Any]], out_dir: Path) -> None:
    if not results:
        return
    write_csv(out_dir / "ablations.csv", results, ABLATION_FIELDS)
    write_json(out_dir / "ablations.json", {"runs": results, **run_metadata()})
    _plot_ablations(results, out_dir / "ablations.png")


def group_by(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def natural_key(value: Any) -> list[tuple[int, float, str]]:
    """Sort key that reads numbers inside names as numbers: engram_table_wd_3.0 before
    engram_table_wd_10.0, 0.5 before 10.0."""
    parts = re.split(r"(\d+(?:\.\d+)?)", str(value))
    return [(1, float(p), "") if i % 2 else (0, 0.0, p) for i, p in enumerate(parts)]


def fit_log_slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b log10(x): (a, b)."""
    lx = [math.log10(x) for x in xs]
    mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ys)) / max(sum((u - mx) ** 2 for u in lx), 1e-12)
    return my - b * mx, b


def _plot_scaling(rows: list[dict], path: Path, caption: str) -> None:
    with saved_figure(path, (6, 4)) as (fig, ax):
        for method, color, label in (("engram", "tab:red", "Engram"), ("overencoding", "tab:blue", "OverEncoding"),
                                     ("overencoding_add_mean", "tab:green", "OverEncoding, E + mean")):  # fmt: skip
            points = sorted(group_by([r for r in rows if r["method"] == method], "table_params").items())
            if not points:
                continue
            xs = [k[0] for k, _ in points]
            est = [estimate([r["val_loss"] for r in runs]) for _, runs in points]
            fit = fit_log_slope(xs, [e.mean for e in est]) if len(xs) >= 2 else None
            # the measured means joined point to point: a straight fit drawn over them would hide a bend
            ax.errorbar(xs, [e.mean for e in est], yerr=[0 if e.n < 2 else e.se for e in est], fmt="o-", color=color,
                        capsize=3, label=label + (f": {fit[1]:+.3f} per decade fitted" if fit else ""))  # fmt: skip
        moe = [r["val_loss"] for r in rows if r["method"] == "moe"]
        if moe:
            e = estimate(moe)
            ax.axhline(e.mean, color="black", ls="--", lw=1, label=f"MoE, no memory: {e}")
        ax.set_xscale("log")
        sizes = [r["table_params"] for r in rows if r["method"] != "moe"]
        if sizes:  # ticks at the sweep's budgets, whatever the range measured so far
            lo, hi = min(sizes) / 1.5, max(sizes) * 1.5
            ticks = [v for v in SCALING_TABLE_PARAMS if lo <= v <= hi] or sorted(set(sizes))
            ax.set_xlim(lo, hi)
            ax.set_xticks(ticks, [f"{v / 1e6:.2g}M" for v in ticks])
            ax.minorticks_off()
        ax.set_xlabel("memory-table parameters")
        ax.set_ylabel("validation loss, mean ± SE over seeds")
        ax.set_title(f"Fixed backbone, growing memory\n{caption}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def _plot_ablations(results: list[dict], path: Path) -> None:
    groups = group_by(results, "variant")
    names = list(groups)
    est = [estimate([r["val_loss"] for r in groups[(n,)]]) for (n,) in names]
    with saved_figure(path, (6, 0.4 * len(names) + 1.2)) as (fig, ax):
        ax.barh([n for (n,) in names], [e.mean for e in est], xerr=[0 if e.n < 2 else e.se for e in est],
                color="tab:purple", capsize=3)  # fmt: skip
        lo = min(e.mean for e in est)
        ax.set_xlim(lo - 0.05, max(e.mean for e in est) + 0.05)
        ax.set_xlabel("validation loss, mean ± SE over seeds")
        ax.set_title(f"Ablations\n{regime_caption(results)}", fontsize=10)
