"""Validation curves of a section's variants against epochs of their data: where a memory
starts to memorise repeated data, its curve flattens while the MoE's keeps falling, and
falls behind it (`falls_behind`).

`mean_curves` is pure (mean ± SE over seeds at each evaluated step); `write_curves` writes
the section's curves.csv (one row per run and evaluation) and curves.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engram_lm.experiments.runner import write_csv
from engram_lm.experiments.stats import Estimate, estimate
from engram_lm.experiments.rows import group_by, natural_key

CSV_FIELDS = ["variant", "seed", "step", "epochs", "val_loss"]


def curve_rows(runs: list[dict[str, Any]], key: str = "variant") -> list[dict[str, Any]]:
    """One row per (run, evaluation); a run's epochs at step s are its final epochs * s / its last step
    (steps consume a fixed number of tokens each)."""
    rows = []
    for r in runs:
        curve = r.get("val_curve") or []
        last = curve[-1][0] if curve else 0
        for step, loss in curve:
            rows.append({"variant": r[key], "seed": r["seed"], "step": step, "epochs": r["epochs"] * step / last,
                         "val_loss": loss})  # fmt: skip
    return rows


def falls_behind(run: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """Epochs from which `run`'s validation loss stays above `reference`'s (the same seed, at the
    steps both evaluated) to the end of the run; None when it ends at or below it. With a
    step-decay schedule a memorising curve plateaus rather than rises, so the lowest point
    is no test; where it falls behind a model without tables is."""
    ref = dict(reference.get("val_curve") or [])
    curve = run.get("val_curve") or []
    behind = [(step, loss > ref[step]) for step, loss in curve if step in ref]
    if not behind or not behind[-1][1]:
        return None
    k = len(behind)
    while k > 0 and behind[k - 1][1]:
        k -= 1
    return run["epochs"] * behind[k][0] / curve[-1][0]


def mean_curves(runs: list[dict[str, Any]], key: str = "variant") -> dict[Any, list[tuple[float, Estimate]]]:
    """variant -> [(epochs, val loss over seeds)] at the steps every seed of it evaluated."""
    out = {}
    for (value,), g in group_by(curve_rows(runs, key), "variant").items():
        seeds = {r["seed"] for r in g}
        by_step = group_by(g, "step")
        out[value] = [(rs[0]["epochs"], estimate([r["val_loss"] for r in rs]))
                      for (step,), rs in sorted(by_step.items()) if {r["seed"] for r in rs} == seeds]  # fmt: skip
    return out


def write_curves(runs: list[dict[str, Any]], out_dir: Path, title: str, key: str = "variant") -> None:
    runs = [r for r in runs if r.get("val_curve")]
    if not runs:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "curves.csv", curve_rows(runs, key), CSV_FIELDS)
    plot_curves(runs, out_dir / "curves.png", title, key)


FAMILY_COLORMAPS = ("Greens", "Oranges", "Purples", "Reds", "PuRd", "YlOrBr")  # not blue or grey: none and the MoE


def curve_styles(values: list[Any]) -> dict[Any, dict[str, Any]]:
    """value -> matplotlib line style: the MoE black and dashed, a variant without a strength
    (engram_none) blue, and the strengths of one family ("engram_dropout_0.1", "..._0.3") shades of
    one colour map, darker for stronger, so a dozen curves stay readable. Pure: no drawing."""
    import matplotlib

    families: dict[str, list[tuple[float, Any]]] = {}
    styles: dict[Any, dict[str, Any]] = {}
    for value in values:
        name = str(value)
        family, _, strength = name.rpartition("_")
        try:
            level = float(strength)
        except ValueError:  # no strength suffix
            styles[value] = {"color": "black", "ls": "--"} if name == "moe" else {"color": "tab:blue", "ls": "-"}
        else:
            families.setdefault(family, []).append((level, value))
    for i, (family, members) in enumerate(sorted(families.items())):
        cmap = matplotlib.colormaps[FAMILY_COLORMAPS[i % len(FAMILY_COLORMAPS)]]
        members.sort(key=lambda m: m[0])
        for k, (_, value) in enumerate(members):
            shade = 0.55 if len(members) == 1 else 0.4 + 0.5 * k / (len(members) - 1)
            styles[value] = {"color": cmap(shade), "ls": "-"}
    return styles


def plot_curves(runs: list[dict[str, Any]], path: Path, title: str, key: str = "variant") -> None:
    from engram_lm.plotting import regime_caption, saved_figure

    curves = mean_curves(runs, key)
    styles = curve_styles(list(curves))
    with saved_figure(path, (8.5, 4.5)) as (fig, ax):
        for value, points in sorted(curves.items(), key=lambda kv: natural_key(kv[0])):
            x = [e for e, _ in points]
            mean = [m.mean for _, m in points]
            se = [0.0 if m.n < 2 else m.se for _, m in points]
            style = styles[value]
            ax.plot(x, mean, label=str(value), lw=1.2, **style)
            ax.fill_between(x, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)], alpha=0.15,
                            color=style["color"])  # fmt: skip
        x_max = max(e for pts in curves.values() for e, _ in pts)
        if x_max > 1:
            ax.axvline(1.0, color="grey", lw=0.8, ls=":")
            ax.text(1.0, 0.98, " data repeats from here", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        late = [m.mean for pts in curves.values() for e, m in pts if e >= 0.25 * x_max]
        if late:  # the differences lie late in training: the first quarter's steep fall would flatten them
            pad = 0.1 * (max(late) - min(late)) + 1e-3
            ax.set_ylim(min(late) - pad, max(late) + pad)
        ax.set_xlabel("epochs of the training data (y axis zoomed on the last three quarters)")
        ax.set_ylabel("validation loss (mean ± SE over seeds)")
        ax.set_title(f"{title}\n{regime_caption(runs, up_to=True)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves end together
