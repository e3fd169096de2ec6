"""`engram experiment allocation`: the sparsity-allocation sweep (paper Figure 3, left).

At fixed P_tot and P_act, a fraction rho of the MoE's sparse (inactive routed-expert)
budget stays in routed experts and the rest becomes Engram slots (models/accounting.py).
Every point trains with the same data, steps, seed and schedule. Writes allocation.csv
(rho, num_routed_experts, engram_slots, params_total, params_active, val_loss) and
allocation.png.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from engram_lm.models.accounting import allocate
from engram_lm.plotting import saved_figure
from engram_lm.recipes import quickstart_engram_template, quickstart_moe
from engram_lm.training.loop import train
from engram_lm.training.run import run_metadata, write_json

DEFAULT_RHOS = (0.4, 0.55, 0.7, 0.8, 0.9, 1.0)
PRESETS = {"quickstart": (quickstart_moe, quickstart_engram_template)}


def allocation_sweep(out_dir: Path, *, preset: str = "quickstart", rhos=DEFAULT_RHOS, steps: int | None = None,
                     data: str | None = None, progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    if preset not in PRESETS:
        raise ValueError(f"unknown allocation preset {preset!r}; choose one of {sorted(PRESETS)}")
    base_fn, template_fn = PRESETS[preset]
    base, train_cfg = base_fn()
    if steps is not None:
        train_cfg = train_cfg.with_(steps=steps, eval_every=min(train_cfg.eval_every, steps))
    if data is not None:
        train_cfg = train_cfg.with_(data=data)
    out_dir = Path(out_dir)
    rows = []
    for rho in sorted(rhos):
        cfg = allocate(base, rho, template_fn())
        t0 = time.time()
        result = train(cfg, train_cfg, out_dir / f"rho-{rho:.2f}", name=f"rho={rho:.2f}", progress=progress)
        slots = 0 if cfg.engram is None else result.counts["params_engram"] // cfg.engram.head_dim
        rows.append({"rho": rho, "num_routed_experts": cfg.num_routed_experts, "engram_slots": slots,
                     "params_total": result.counts["params_total"], "params_active": result.counts["params_active"],
                     "val_loss": result.val_loss, "wall_s": round(time.time() - t0, 1)})  # fmt: skip
        _write(out_dir, rows)
    write_json(out_dir / "allocation.json", {"rows": rows, "preset": preset, "train": train_cfg.to_dict(), **run_metadata()})
    plot_allocation(rows, out_dir / "allocation.png")
    return rows


def _write(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    with (out_dir / "allocation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_allocation(rows: list[dict[str, Any]], path: Path) -> None:
    with saved_figure(path, (6, 4)) as (fig, ax):
        ax.plot([r["rho"] for r in rows], [r["val_loss"] for r in rows], marker="o", color="tab:red")
        best = min(rows, key=lambda r: r["val_loss"])
        ax.axvline(best["rho"], color="grey", ls=":", lw=1)
        ax.set_xlabel("rho: fraction of the sparse budget kept in routed experts (1 = pure MoE)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"Sparsity allocation at fixed P_tot = {rows[0]['params_total']:,}")
        ax.grid(alpha=0.3)
