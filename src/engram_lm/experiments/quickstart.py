"""`engram quickstart`: an MoE baseline against an iso-parameter MoE+Engram model.

Same data, steps, tokens, seed and schedule; the Engram model moves 1 - rho of the
routed experts' sparse parameters into Engram slots (models/accounting.allocate).
Writes <out>/summary.json, <out>/loss_curves.png and one run folder per model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engram_lm.plotting import saved_figure
from engram_lm.recipes import QUICKSTART_RHO, get_recipe
from engram_lm.training.loop import train
from engram_lm.training.run import run_metadata, write_json

RUNS = (("moe", "quickstart-moe"), ("moe+engram", "quickstart-engram"))


def quickstart(out_dir: Path, *, data: str | None = None, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    out_dir = Path(out_dir)
    results = []
    for name, recipe in RUNS:
        model_cfg, train_cfg = get_recipe(recipe)
        if data is not None:
            train_cfg = train_cfg.with_(data=data)
        if steps is not None:
            train_cfg = train_cfg.with_(steps=steps, eval_every=min(train_cfg.eval_every, steps))
        results.append(train(model_cfg, train_cfg, out_dir / name, name=name, progress=progress))
    runs = [r.to_dict() for r in results]
    from engram_lm.training.data import prepare_data

    train_tokens = len(prepare_data(train_cfg.data, train_cfg.tokenizer).train)
    for r in runs:
        r["epochs"] = r["tokens_seen"] / train_tokens
    summary = {
        "runs": runs,
        "engram_gain_nats": runs[0]["val_loss"] - runs[1]["val_loss"],
        "rho": QUICKSTART_RHO,
        "params_total_gap": runs[1]["params_total"] / runs[0]["params_total"] - 1,
        "params_active_gap": runs[1]["params_active"] / runs[0]["params_active"] - 1,
        "data": train_cfg.data,
        **run_metadata(),
    }
    write_json(out_dir / "summary.json", summary)
    plot_loss_curves([Path(r["run_dir"]) for r in runs], [r["name"] for r in runs], out_dir / "loss_curves.png")
    return summary


def plot_loss_curves(run_dirs: list[Path], names: list[str], path: Path) -> None:
    with saved_figure(path, (7, 4.5)) as (fig, ax):
        for run_dir, name, color in zip(run_dirs, names, ("tab:blue", "tab:red", "tab:green", "tab:purple")):
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            train = [(r["step"], r["loss"]) for r in records if "loss" in r]
            val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            ax.plot(*zip(*train), color=color, alpha=0.35, lw=1, label=f"{name} train")
            ax.plot(*zip(*val), color=color, marker="o", lw=2, label=f"{name} validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title("engram quickstart: MoE vs iso-parameter MoE+Engram")
        ax.grid(alpha=0.3)
        ax.legend()


def format_table(summary: dict[str, Any]) -> str:
    head = f"{'run':<12}{'P_tot':>11}{'P_act':>11}{'P_engram':>11}{'val loss':>10}{'tokens':>11}{'tok/s':>9}"
    lines = [head, "-" * len(head)]
    for r in summary["runs"]:
        lines.append(f"{r['name']:<12}{r['params_total']:>11,}{r['params_active']:>11,}{r['params_engram']:>11,}"
                     f"{r['val_loss']:>10.4f}{r['tokens_seen']:>11,}{r['tokens_per_s']:>9,.0f}")  # fmt: skip
    lines.append(f"Engram gain: {summary['engram_gain_nats']:+.4f} nats (P_tot gap {summary['params_total_gap']:+.2%}, "
                 f"P_act gap {summary['params_active_gap']:+.2%}, rho {summary['rho']})")  # fmt: skip
    epochs = summary["runs"][0].get("epochs")
    if epochs is not None:
        lines.append(f"Trained on {epochs:.2f} epochs of {summary['data']!r}: a single-epoch result. Past one epoch of "
                     "the built-in corpus, without table weight decay, the tables memorise it and Engram falls behind "
                     "the MoE; with the default decay (table_weight_decay=10) it stayed level with the MoE in the "
                     "study (docs/results.md).")  # fmt: skip
    return "\n".join(lines)
