"""`engram experiment allocation`: the sparsity-allocation sweep (paper Figure 3, left).

At fixed P_tot and P_act, a fraction rho of the MoE's sparse (inactive routed-expert)
budget stays in routed experts and the rest becomes Engram slots (models/accounting.py).
rho = 0 keeps only the top-k routed experts (all of the sparse budget in memory); rho = 1
is the pure MoE. The capacity-1 control (same Engram module, one row per hash column) runs
at a few rhos to show what the memory itself adds over its dense parameters. Every point
trains with the same data, steps and schedule, once per seed. The points train coarse to
fine (`coarse_to_fine`), each with all its seeds before the next, and the capacity-1 controls
once the coarse shape (both ends and the midpoint) is in: a sweep stopped part way has the
MoE reference and a few points across the interval, each with its standard error.
Writes allocation.csv (one row per run: rho, seed, num_routed_experts, engram_slots,
params_total, params_active, val_loss, variant, epochs) and allocation.png (mean +- standard
error per rho).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engram_lm.experiments.page import STUDY_COMMAND, claim_verdict, data_name, epochs_range, fmt_estimate, md_table, seeds_of, verdict_word
from engram_lm.experiments.runner import RunSpec, sweep, write_csv
from engram_lm.experiments.stats import Estimate, compare, estimate, held_out_best, optimum
from engram_lm.models.accounting import allocate
from engram_lm.plotting import regime_caption, saved_figure
from engram_lm.recipes import paper_optimiser, quickstart_engram_template, quickstart_moe
from engram_lm.training.run import run_metadata, write_json

DEFAULT_RHOS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 1.0)
CAPACITY1_RHOS = (0.0, 0.5, 0.8)
PRESETS = {"quickstart": (quickstart_moe, quickstart_engram_template)}
CSV_FIELDS = ("rho", "seed", "num_routed_experts", "engram_slots", "params_total", "params_active", "val_loss",
              "variant", "epochs")  # fmt: skip


def allocation_specs(*, preset: str = "quickstart", rhos=DEFAULT_RHOS, seeds=(0,), steps: int | None = None,
                     data: str | None = None, capacity1_rhos=CAPACITY1_RHOS, prefix: str = "") -> list[RunSpec]:  # fmt: skip
    if preset not in PRESETS:
        raise ValueError(f"unknown allocation preset {preset!r}; choose one of {sorted(PRESETS)}")
    base_fn, template_fn = PRESETS[preset]
    base, train_cfg = base_fn()
    train_cfg = paper_optimiser(train_cfg)
    if steps is not None:
        train_cfg = train_cfg.with_(steps=steps, eval_every=min(train_cfg.eval_every, steps))
    if data is not None:
        train_cfg = train_cfg.with_(data=data)
    configs = {rho: allocate(base, rho, template_fn()) for rho in coarse_to_fine(rhos)}  # once: allocation builds models
    points, controls = [], []  # (rho, variant, model, slots), in training order
    for i, (rho, cfg) in enumerate(configs.items()):  # coarse to fine
        points.append((rho, "engram" if cfg.engram is not None else "moe", cfg, _slots(cfg)))
        if cfg.engram is not None and any(abs(rho - r) < 1e-9 for r in capacity1_rhos):
            controls.append((rho, "capacity1", cfg.with_(engram=cfg.engram.with_(single_slot=True)), _slots(cfg)))
        if i >= 2:  # the coarse shape (both ends, the midpoint) is in: the controls of the points so far follow
            points += controls
            controls = []
    specs = []
    for rho, variant, model, slots in points + controls:  # every seed of a point before the next point
        for seed in seeds:
            name = f"rho-{rho:.2f}" if variant != "capacity1" else f"capacity1-rho-{rho:.2f}"
            tags = {"experiment": "allocation", "rho": rho, "seed": seed, "variant": variant,
                    "num_routed_experts": model.num_routed_experts, "engram_slots": slots}  # fmt: skip
            specs.append(RunSpec(f"{prefix}{name}/seed-{seed}", model, train_cfg.with_(seed=seed), tags))
    return specs


def coarse_to_fine(rhos) -> list[float]:
    """The training order of a sweep's points: the pure MoE (largest rho), then the smallest rho,
    then always the point farthest from those already trained (ties: the smaller rho). A sweep
    stopped part way has the MoE reference and a coarse picture of the whole interval, not a
    dense corner of it."""
    left = sorted(set(rhos))
    if not left:
        return []
    order = [left.pop()]
    while left:
        pick = max(left, key=lambda r: (round(min(abs(r - o) for o in order), 9), -r))  # round: 0.65-0.5 > 0.5-0.35 in floats
        order.append(pick)
        left.remove(pick)
    return order


def _slots(cfg) -> int:
    from engram_lm.experiments.variants import slots

    return 0 if cfg.engram is None else slots(cfg.engram)


def allocation_sweep(out_dir: Path, *, progress: bool = True, device: str | None = None, **kwargs: Any) -> list[dict]:
    return sweep(out_dir, allocation_specs(**kwargs), write_allocation, progress=progress, device=device)


def write_allocation(results: list[dict[str, Any]], out_dir: Path) -> None:
    if not results:
        return
    order = sorted(results, key=lambda r: (r["variant"] == "capacity1", r["rho"], r["seed"]))
    write_csv(out_dir / "allocation.csv", order, CSV_FIELDS)
    write_json(out_dir / "allocation.json", {"runs": results, **run_metadata()})
    plot_allocation(results, out_dir / "allocation.png")


def summarise(results: list[dict[str, Any]], variant_filter=("engram", "moe")) -> list[dict[str, Any]]:
    """Per rho: mean and standard error of the validation loss over seeds."""
    by_rho: dict[float, list[dict[str, Any]]] = {}
    for r in results:
        if r["variant"] in variant_filter:
            by_rho.setdefault(r["rho"], []).append(r)
    rows = []
    for rho in sorted(by_rho):
        runs = by_rho[rho]
        e = estimate([r["val_loss"] for r in runs])
        rows.append({"rho": rho, "mean": e.mean, "se": e.se, "n": e.n, "runs": runs})
    return rows


def plot_allocation(results: list[dict[str, Any]], path: Path) -> None:
    with saved_figure(path, (6, 4)) as (fig, ax):
        for variants, color, label in ((("engram", "moe"), "tab:red", "MoE + Engram (rho = 1: pure MoE)"),
                                       (("capacity1",), "tab:grey", "capacity-1 control")):  # fmt: skip
            rows = summarise(results, variants)
            if rows:
                ax.errorbar([r["rho"] for r in rows], [r["mean"] for r in rows], yerr=[_zero_nan(r["se"]) for r in rows],
                            marker="o", color=color, capsize=3, label=label)  # fmt: skip
        ax.set_xlabel("rho: fraction of the sparse budget kept in routed experts (1 = pure MoE)")
        ax.set_ylabel("validation loss (nats/token), mean ± SE")
        p_tot = next((r["params_total"] for r in results if r["variant"] != "capacity1"), None)
        ax.set_title("Sparsity allocation" + (f" at fixed P_tot = {p_tot:,}" if p_tot else "")
                     + f"\n{regime_caption(results)}", fontsize=10)  # fmt: skip
        ax.set_xlim(-0.05, 1.05)  # the whole interval, however much of it is measured
        ax.grid(alpha=0.3)
        ax.legend()


def _zero_nan(x: float) -> float:
    return 0.0 if x != x else x


# ---- the page's section ------------------------------------------------------------------------
def allocation_section(runs: list[dict[str, Any]], title: str) -> tuple[list[list[str]], list[str]]:
    if not runs:
        return [], [f"## {title}", "", f"Not run yet (`{STUDY_COMMAND}`).", ""]
    rows = summarise(runs)
    steps = runs[0]["requested"]["train"]["steps"]
    regime = f"{data_name(runs)}, {epochs_range(runs)} epochs"
    lines = [f"## {title}", "", f"`{data_name(runs)}`, {steps} steps ({epochs_range(runs)} epochs), {seeds_of(runs)} seed(s); "
             f"P_tot {next(r for r in runs if r['variant'] != 'capacity1')['params_total']:,} at every Engram point (rho = 0 keeps only the top-k routed experts).", ""]  # fmt: skip
    by_rho = {r["rho"]: {x["seed"]: x["val_loss"] for x in r["runs"]} for r in rows}
    moe = by_rho.get(1.0)

    def versus_moe(losses: dict[int, float], rho: float | None = None) -> list[str]:
        if moe is None or rho == 1.0 or not set(losses) & set(moe):
            return ["", ""]
        c = compare(losses, moe)
        return [fmt_estimate(c.diff, True), verdict_word(c.verdict)]

    table = [[f"{r['rho']:.2f}", r["runs"][0]["num_routed_experts"], f"{r['runs'][0]['engram_slots']:,}", r["n"],
              fmt_estimate(Estimate(r["mean"], r["se"], r["n"])), *versus_moe(by_rho[r["rho"]], r["rho"])] for r in rows]  # fmt: skip
    verdicts = []
    for r in summarise(runs, ("capacity1",)):
        control = {x["seed"]: x["val_loss"] for x in r["runs"]}
        table.append([f"{r['rho']:.2f} (capacity-1)", r["runs"][0]["num_routed_experts"], "1 per hash column", r["n"],
                      fmt_estimate(Estimate(r["mean"], r["se"], r["n"])), *versus_moe(control)])  # fmt: skip
        real = by_rho.get(r["rho"], {})
        if not verdicts and set(real) & set(control):  # the lowest rho with both: the most memory
            c = compare(real, control)
            verdicts.append([f"the memory itself helps: Engram beats its capacity-1 control at rho {r['rho']:.2f} ({title})",
                             claim_verdict(c.verdict, "lower"), f"{regime}, {seeds_of(r['runs'])} seed(s)",
                             f"Engram - capacity-1 {fmt_estimate(c.diff, True)}"])  # fmt: skip
    lines += md_table(["rho", "routed experts", "Engram slots", "seeds", "val loss", "minus MoE (rho 1)", "call"], table)
    missing = [r for r in DEFAULT_RHOS if not any(abs(r - m) < 1e-9 for m in by_rho)]
    if missing:
        lines += ["", f"Measured {len(by_rho)} of the {len(DEFAULT_RHOS)} default rhos; not yet: "
                      f"{', '.join(f'{m:g}' for m in missing)} (the sweep trains coarse to fine, every seed of a point "
                      f"before the next; rerun `{STUDY_COMMAND}` to continue)."]  # fmt: skip
    best = min(rows, key=lambda r: r["mean"])
    ends = [e for e in (min(by_rho), max(by_rho)) if e != best["rho"]]
    calls = [compare(by_rho[best["rho"]], by_rho[e]) for e in ends]
    verdict, shape = u_shape(by_rho)
    versus = "; ".join(f"vs rho = {e:.2f}: {fmt_estimate(c.diff, True)}" for e, c in zip(ends, calls))
    opt = optimum(by_rho)
    tied = (f"rhos not called worse than it (the optimum's uncertainty; measured against the lowest of several noisy "
            f"means, so if anything too narrow): {', '.join(f'{r:g}' for r in opt.tied)}")  # fmt: skip
    lines += ["", f"Lowest mean loss at rho = {best['rho']:.2f} ({fmt_estimate(Estimate(best['mean'], best['se'], best['n']))})"
                  + (f"; {versus}" if versus else "") + f"; {tied}; each seed's own lowest rho: "
                  + ", ".join(f"{r:g}" for r in opt.per_seed.values()) + "."]  # fmt: skip
    if shape:
        lines += ["", "Picking the lowest of several noisy points and testing it on the seeds that picked it favours a call, "
                      f"so the U-shape verdict is held out: {shape}."]  # fmt: skip
    measured = ", ".join(f"{r:g}" for r in sorted(by_rho))
    verdicts.insert(0, [f"U-shape: an interior rho beats both ends ({title})", verdict, f"{regime}, {seeds_of(runs)} seed(s)",
                        "; ".join(x for x in (f"best rho {best['rho']:.2f} by mean", shape, tied, f"rhos measured: {measured}") if x)])  # fmt: skip
    return verdicts, lines + [""]


def u_shape(by_rho: dict[float, dict[int, float]]) -> tuple[str, str]:
    """An interior optimum or not, free of selection bias: per seed, the interior rho of
    lowest mean over the other seeds, scored on that seed against each end (stats.held_out_best).
    Reproduced when it beats both ends; not reproduced when an end beats it; otherwise, or
    without both ends and an interior point, inconclusive. Returns (verdict, its numbers)."""
    interior = [r for r in by_rho if 0.0 < r < 1.0]
    if not {0.0, 1.0} <= set(by_rho) or not interior:
        return "inconclusive at this scale", ""  # the interval's ends and a point between are needed to call a shape
    (low, chosen), (high, _) = (held_out_best(by_rho, interior, end) for end in (0.0, 1.0))
    if low is None or high is None:
        return "inconclusive at this scale", "held-out selection needs 2 seeds at the ends and inside"
    numbers = (f"each seed's interior optimum chosen by the other seeds ({', '.join(f'{r:g}' for r in chosen.values())}), "
               f"scored on it: minus rho 0 {fmt_estimate(low.diff, True)}, minus rho 1 {fmt_estimate(high.diff, True)}")  # fmt: skip
    if low.verdict == "lower" and high.verdict == "lower":
        return "reproduced", numbers
    if "higher" in (low.verdict, high.verdict):
        return "not reproduced", numbers
    return "inconclusive at this scale", numbers
