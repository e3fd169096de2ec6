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
