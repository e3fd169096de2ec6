"""One way to make a figure file: headless (Agg), tight layout, closed after saving."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


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
