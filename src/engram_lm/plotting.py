"""One way to make a figure file: headless (Agg), tight layout, closed after saving."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def saved_figure(path: Path, figsize: tuple[float, float] = (6, 4)):
    """`with saved_figure(path) as (fig, ax): ...` draws, then writes `path` at 120 dpi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def regime_caption(runs: list[dict[str, Any]], up_to: bool = False) -> str:
    """"data, E epochs, K seed(s)" of finished runs: every figure says which regime it shows
    (`up_to`: E is where runs evaluated along the way ended)."""
    data = {Path(str(r.get("data", "?"))).name for r in runs}
    epochs = sorted({round(r["epochs"], 2) for r in runs if "epochs" in r})
    parts = [" + ".join(sorted(data))]
    if epochs:
        span = f"{epochs[-1]:g}" if len(epochs) == 1 or up_to else f"{epochs[0]:g}-{epochs[-1]:g}"
        parts.append(f"{'up to ' if up_to else ''}{span} epochs")
    parts.append(f"{len({r.get('seed') for r in runs})} seed(s)")
    return ", ".join(parts)


def plot_gap_curve(ax, points: list[dict[str, Any]], label: str, color: str, ls: str = "-") -> None:
    """A variant-minus-baseline curve against epochs: `points` carry "epochs" and "gap" (an
    Estimate over seeds), drawn with standard-error bars and the seed count in the label."""
    n = points[-1]["gap"].n
    ax.errorbar([x["epochs"] for x in points], [x["gap"].mean for x in points],
                yerr=[0 if x["gap"].n < 2 else x["gap"].se for x in points], marker="o", color=color, capsize=3, ls=ls,
                label=f"{label} ({n} seed{'s' * (n > 1)})")  # fmt: skip


def zero_and_one_epoch(ax) -> None:
    """The reference lines of a gap-against-epochs figure: no difference, and one epoch."""
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(1, color="grey", lw=0.8, ls=":")
