"""`engram experiment scaling` and the page's sections `scaling`, `scaling-4x` and `sanity`.

`engram experiment scaling` and `engram experiment ablations`: sweeps of one backbone.

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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram_lm.experiments.page import (
    STUDY_COMMAND, claim_verdict, data_name, epochs_range, fmt_estimate, losses_of, md_table, seeds_of, verdict_word,
)  # fmt: skip
from engram_lm.experiments.rows import group_by
from engram_lm.experiments.runner import RunSpec, sweep, write_csv
from engram_lm.experiments.stats import Comparison, Estimate, call, compare, estimate
from engram_lm.experiments.variants import quickstart_train, with_slots
from engram_lm.models.config import ModelConfig
from engram_lm.models.overencoding import OVERENCODING_TABLE_LR_MULT, overencoding_for_budget
from engram_lm.plotting import regime_caption, saved_figure
from engram_lm.recipes import quickstart_engram, quickstart_moe
from engram_lm.training.run import run_metadata, write_json


SCALING_TABLE_PARAMS = (524_288, 1_048_576, 2_097_152, 4_194_304, 8_388_608)
SCALING_FIELDS = ("method", "slots", "table_params", "active_params", "seed", "val_loss", "epochs")
SCALING_4X = "memory scaling at 4x the quickstart (no repetition)"


@functools.lru_cache(maxsize=64)
def scaling_configs(table_params: int) -> dict[str, ModelConfig]:
    base, _ = quickstart_moe()
    engram = quickstart_engram()[0].engram
    oe = overencoding_for_budget(table_params, base.dim)
    return {"engram": base.with_(engram=with_slots(engram, table_params // engram.head_dim)),
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
        train_cfg = quickstart_train(steps, data, seed)
        specs.append(RunSpec(f"{prefix}moe/seed-{seed}", base, train_cfg, {"experiment": "scaling", "method": "moe", "seed": seed}))
        for budget in sorted(budgets, reverse=True):
            for method, cfg in scaling_configs(budget).items():
                if methods is not None and method not in methods:
                    continue
                t = train_cfg.with_(table_lr_mult=OVERENCODING_TABLE_LR_MULT) if cfg.overencoding else train_cfg
                tags = {"experiment": "scaling", "method": method, "budget": budget, "seed": seed}
                specs.append(RunSpec(f"{prefix}{method}/budget-{budget}/seed-{seed}", cfg, t, tags))
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


# ---- the page's sections ----------------------------------------------------------------------
SCALING_INTRO = ("OverEncoding as its paper defines it (docs/model.md), tables at the base learning rate; Engram at 5x; "
                 "`overencoding_add_mean` keeps the token embedding at full scale (E + mean of the n-gram vectors), the "
                 "variant that beats no memory in the diagnosis below, also at the base learning rate.")  # fmt: skip


def scaling_section(runs: list[dict[str, Any]], title: str = "Memory scaling: Engram vs OverEncoding at equal table parameters",
                    intro: str = SCALING_INTRO, claim: str = "memory scaling") -> tuple[list[list[str]], list[str]]:  # fmt: skip
    """`claim` opens every verdict row ("memory scaling: Engram's loss falls ...")."""
    if not runs:
        return [], [f"## {title}", "", f"Not run yet (`{STUDY_COMMAND}`).", ""]
    rows = scaling_rows(runs)
    lines = [f"## {title}", "",
             f"Fixed quickstart MoE backbone, {runs[0]['requested']['train']['steps']} steps on `{data_name(runs)}` ({epochs_range(runs)} epochs), {seeds_of(runs)} seed(s). "
             + intro, ""]  # fmt: skip
    moe = losses_of(runs, method="moe")
    lines += _budget_table(runs, rows, moe) + engram_minus_overencoding(runs)
    verdicts, slope_lines = _slope_verdicts(runs, rows, claim)
    sanity, sanity_lines = _overencoding_sanity(runs, rows, moe)
    return verdicts + sanity, lines + slope_lines + sanity_lines + [""]


def _budget_table(runs: list[dict[str, Any]], rows: list[dict[str, Any]], moe: dict[int, float]) -> list[str]:
    """Each method at each table budget, minus the no-memory MoE."""
    table = []
    for (method, budget), g in sorted(group_by([r for r in rows if r["method"] != "moe"], "method", "table_params").items()):
        losses = {r["seed"]: r["val_loss"] for r in g}
        c = compare(losses, moe) if moe else None
        table.append([method, f"{budget:,}", f"{g[0]['slots']:,}", f"{g[0]['active_params']:,}", fmt_estimate(estimate(list(losses.values()))),
                      fmt_estimate(c.diff, True) if c else "", verdict_word(c.verdict) if c else ""])  # fmt: skip
    if moe:
        moe_active = next(r["params_active"] for r in runs if r["method"] == "moe")
        table.append(["moe (no memory)", "0", "0", f"{moe_active:,}",
                      fmt_estimate(estimate(list(moe.values()))), "", ""])  # fmt: skip
    return md_table(["method", "table params", "slots", "active params", "val loss", "minus MoE", "call"], table)


def _slope_verdicts(runs: list[dict[str, Any]], rows: list[dict[str, Any]],
                    claim: str) -> tuple[list[list[str]], list[str]]:  # fmt: skip
    """Slopes per decade, Engram's against each OverEncoding's, and whether Engram's is log-linear."""
    verdicts, lines = [], []
    slopes = {m: s for m in ("engram", "overencoding", "overencoding_add_mean")
              if (s := _slopes([r for r in rows if r["method"] == m]))}  # fmt: skip
    if slopes:
        lines += ["", "Slope of loss per decade of table parameters, fitted per seed: "
                  + ", ".join(f"{m} {fmt_estimate(estimate(list(s.values())), True)}" for m, s in slopes.items()) + "."]
    for other, name in (("overencoding", "OverEncoding's"), ("overencoding_add_mean", "the strongest OverEncoding's (E + mean)")):
        if "engram" in slopes and other in slopes:
            c = compare(slopes["engram"], slopes[other])
            verdicts.append([f"{claim}: Engram's loss falls more steeply than {name}", claim_verdict(c.verdict, "lower"),
                             f"{data_name(runs)}, {epochs_range(runs)} epochs, {c.diff.n} seed(s)", f"slope difference {fmt_estimate(c.diff, True)} per decade"])  # fmt: skip
    shapes = {m: h for m in slopes if (h := log_linearity([r for r in rows if r["method"] == m]))}
    if shapes:
        lines += ["", "Log-linear or saturating? The same slope on the smaller and on the larger half of the table sizes "
                  "(the middle size in both), fitted per seed: a log-linear curve has equal halves; a larger half called "
                  "flatter means the loss saturates within this range at this token budget.", "",
                  *md_table(["method", "slope, smaller half", "slope, larger half", "larger minus smaller", "shape"],
                            [[m, fmt_estimate(h.smaller, True), fmt_estimate(h.larger, True), fmt_estimate(h.bend.diff, True),
                              h.shape] for m, h in shapes.items()])]  # fmt: skip
    if "engram" in slopes:
        e_slope = estimate(list(slopes["engram"].values()))
        shape = shapes.get("engram")
        verdicts.append([f"{claim}: Engram's loss falls log-linearly with table size",
                         shape.verdict if shape else "inconclusive at this scale",
                         f"{data_name(runs)}, {epochs_range(runs)} epochs, {e_slope.n} seed(s)",
                         f"Engram slope {fmt_estimate(e_slope, True)} per decade over the range; "
                         + (shape.text() if shape else "linearity needs 3 or more table sizes")])  # fmt: skip
    return verdicts, lines


def _overencoding_sanity(runs: list[dict[str, Any]], rows: list[dict[str, Any]],
                         moe: dict[int, float]) -> tuple[list[list[str]], list[str]]:  # fmt: skip
    """Does the largest OverEncoding beat no memory (as its paper reports), and Engram beat it?"""
    top = max((r["table_params"] for r in rows if r["method"] == "overencoding"), default=None)
    if top is None or not moe:
        return [], []
    verdicts, lines = [], []
    oe = {r["seed"]: r["val_loss"] for r in rows if r["method"] == "overencoding" and r["table_params"] == top}
    c = compare(oe, moe)
    verdicts.append(["sanity: OverEncoding (largest table) beats no memory, as its paper reports",
                     claim_verdict(c.verdict, "lower"), f"{data_name(runs)}, {epochs_range(runs)} epochs, {c.diff.n} seed(s)",
                     f"OverEncoding - MoE {fmt_estimate(c.diff, True)} at {top:,} table params"])  # fmt: skip
    if c.verdict != "lower":
        lines += ["", f"**The OverEncoding baseline does not beat the no-memory MoE at its largest size here "
                      f"({fmt_estimate(c.diff, True)}); comparisons against it should be read with that in mind.**"]  # fmt: skip
    eng = {r["seed"]: r["val_loss"] for r in rows if r["method"] == "engram" and r["table_params"] == max(
        x["table_params"] for x in rows if x["method"] == "engram")}  # fmt: skip
    if eng:
        c = compare(eng, oe)
        weak = "" if compare(oe, moe).verdict == "lower" else "; this OverEncoding loses to no memory (see the sanity row)"
        verdicts.append(["Engram beats OverEncoding at equal table parameters (largest)", claim_verdict(c.verdict, "lower"),
                         f"{data_name(runs)}, {epochs_range(runs)} epochs, {c.diff.n} seed(s)", f"Engram - OverEncoding {fmt_estimate(c.diff, True)}{weak}"])  # fmt: skip
    return verdicts, lines


def engram_minus_overencoding(runs: list[dict[str, Any]]) -> list[str]:
    """Per table budget: Engram minus each OverEncoding form, over the seeds both have."""
    table = []
    for budget in sorted({r["budget"] for r in runs if "budget" in r}):
        engram = losses_of(runs, method="engram", budget=budget)
        cells = []
        for method in ("overencoding", "overencoding_add_mean"):
            other = losses_of(runs, method=method, budget=budget)
            c = compare(engram, other) if set(engram) & set(other) else None
            cells.append(f"{fmt_estimate(c.diff, True)} ({verdict_word(c.verdict)})" if c else "")
        if any(cells):
            table.append([f"{budget:,}", *cells])
    if not table:
        return []
    return ["", "Engram minus OverEncoding at each table budget (negative: Engram is better), paired over shared seeds:", "",
            *md_table(["table budget", "minus OverEncoding (paper form)", "minus OverEncoding (E + mean)"], table)]  # fmt: skip


def strongest_overencoding_gap(scaling: list[dict[str, Any]], diagnosis: list[dict[str, Any]]) -> Comparison | None:
    """Engram at its largest table minus the diagnosis' OverEncoding that keeps the token
    embedding at full scale, over the seeds both have; None without both."""
    engram = [r for r in scaling_rows(scaling) if r["method"] == "engram"] if scaling else []
    oe = [r for r in diagnosis if r.get("variant") == "overencoding_add_mean"]
    if not engram or not oe:
        return None
    top = max(r["table_params"] for r in engram)
    eng = {r["seed"]: r["val_loss"] for r in engram if r["table_params"] == top}
    base = {r["seed"]: r["val_loss"] for r in oe}
    return compare(eng, base) if set(eng) & set(base) else None


def versus_strongest_overencoding(scaling: list[dict[str, Any]], diagnosis: list[dict[str, Any]]) -> list[list[str]]:
    """Engram at its largest table against the diagnosis' OverEncoding that keeps the token
    embedding at full scale (the variant that beats no memory): the strongest baseline we
    have at equal table parameters, on the same data, steps and seeds."""
    c = strongest_overencoding_gap(scaling, diagnosis)
    if c is None:
        return []
    engram = [r for r in scaling_rows(scaling) if r["method"] == "engram"]
    oe = [r for r in diagnosis if r.get("variant") == "overencoding_add_mean"]
    top = max(r["table_params"] for r in engram)
    return [["Engram beats the strongest OverEncoding here (token embedding at full scale) at equal table parameters",
             claim_verdict(c.verdict, "lower"), f"{data_name(oe)}, {epochs_range(oe)} epochs, {c.diff.n} seed(s)",
             f"Engram - OverEncoding (E + mean) {fmt_estimate(c.diff, True)} at {top:,} vs {oe[0]['params_engram']:,} table params, "
             f"{next(r['active_params'] for r in engram if r['table_params'] == top):,} vs {oe[0]['params_active']:,} active"]]  # fmt: skip


def _slopes(rows: list[dict[str, Any]]) -> dict[int, float]:
    out = {}
    for (seed,), g in group_by(rows, "seed").items():
        if len(g) >= 2:
            out[seed] = fit_log_slope([r["table_params"] for r in g], [r["val_loss"] for r in g])[1]
    return out


@dataclass(frozen=True, slots=True)
class Linearity:
    verdict: str  # reproduced / not reproduced / inconclusive at this scale
    smaller: Estimate  # slope per decade on the smaller half of the table sizes
    larger: Estimate  # ... on the larger half
    bend: Comparison  # larger minus smaller: "higher" means the curve flattens

    @property
    def shape(self) -> str:
        return {"higher": "flattens", "lower": "steepens"}.get(self.bend.verdict, "no bend called")

    def text(self) -> str:
        return (f"smaller half {fmt_estimate(self.smaller, True)}, larger half {fmt_estimate(self.larger, True)} per decade "
                f"(larger minus smaller {fmt_estimate(self.bend.diff, True)}: {self.shape})")


def log_linearity(rows: list[dict[str, Any]]) -> Linearity | None:
    """Does the loss fall log-linearly with table parameters, or flatten? Per seed, the
    slope per decade on the smaller and on the larger half of the sizes (sharing the middle
    one when their number is odd). Not reproduced when the larger half is called flatter
    (saturation) or the loss is called to rise; reproduced when both halves are called
    falling; otherwise inconclusive. None below 3 sizes, where curvature cannot be seen."""
    lower, upper = {}, {}
    for (seed,), g in group_by(rows, "seed").items():
        g = sorted(g, key=lambda r: r["table_params"])
        if len(g) >= 3:
            half = (len(g) + 1) // 2
            lower[seed] = fit_log_slope([r["table_params"] for r in g[:half]], [r["val_loss"] for r in g[:half]])[1]
            upper[seed] = fit_log_slope([r["table_params"] for r in g[-half:]], [r["val_loss"] for r in g[-half:]])[1]
    if not lower:
        return None
    smaller, larger, bend = estimate(list(lower.values())), estimate(list(upper.values())), compare(upper, lower)
    if bend.verdict == "higher" or call(estimate(list(_slopes(rows).values()))) == "higher":
        verdict = "not reproduced"
    elif call(smaller) == "lower" and call(larger) == "lower":
        verdict = "reproduced"
    else:
        verdict = "inconclusive at this scale"
    return Linearity(verdict, smaller, larger, bend)


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


def scaling_4x_section(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    return scaling_section(
        runs, "Memory scaling at 4x the quickstart (no repetition)",
        "Engram at the smallest, middle and largest table budget of the scaling sweep, on data that does not repeat; "
        "the MoE is allocation-4x's rho 1 (the same training, reused). Does the shape of the 0.86-epoch sweep above "
        "(log-linear or flattening) hold with 4x the tokens?", claim=SCALING_4X)
