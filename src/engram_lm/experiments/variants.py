"""`engram experiment scaling` and `engram experiment ablations`: sweeps of one backbone.

scaling (paper Figure 3, right): the backbone stays fixed (the quickstart MoE) and only the
memory grows: Engram with 5 table sizes spanning 16x, against OverEncoding (hashed n-gram
embeddings of model width averaged into the input) with the same slot counts.
ablations (paper Figure 5): from the quickstart MoE+Engram reference, remove one piece at a
time (gating, tokenizer compression, short conv), add 4-grams at the same number of slots,
and move the single module to each layer. Multi-branch fusion is not ablated: the
quickstart backbone has one residual branch, where single fusion is the design itself.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

from engram_lm.config import EngramConfig
from engram_lm.hashing.layout import build_layout
from engram_lm.models.accounting import engram_with_rows
from engram_lm.models.config import ModelConfig
from engram_lm.plotting import saved_figure
from engram_lm.recipes import quickstart_engram, quickstart_moe
from engram_lm.training.loop import train
from engram_lm.training.run import run_metadata, write_json

SCALING_SLOTS = (16_384, 32_768, 65_536, 131_072, 262_144)


def _with_slots(engram: EngramConfig, slots: int) -> EngramConfig:
    columns = len(engram.layer_ids) * engram.num_hash_columns
    return engram_with_rows(engram, slots, max(2, slots // columns))


def scaling_configs(slots: int) -> dict[str, ModelConfig]:
    base, _ = quickstart_moe()
    engram = quickstart_engram()[0].engram
    oe = EngramConfig(tokenizer=engram.tokenizer, table_sizes=(2, 2), max_ngram=3, num_heads=engram.num_heads,
                      layer_ids=(0,), pad_id=engram.pad_id, embed_per_ngram=engram.num_heads * base.dim)  # fmt: skip
    return {"engram": base.with_(engram=_with_slots(engram, slots)),
            "overencoding": base.with_(overencoding=_with_slots(oe, slots))}


def ablation_configs() -> dict[str, ModelConfig]:
    ref, _ = quickstart_engram()
    e = ref.engram
    four = _with_slots(e.with_(max_ngram=4, table_sizes=(2, 2, 2)), build_layout(e, 1, 0).total_rows)
    variants = {"reference": ref, "no_gating": ref.with_(engram=e.with_(use_gating=False)),
                "no_compression": ref.with_(engram=e.with_(compress_tokens=False)),
                "no_short_conv": ref.with_(engram=e.with_(use_short_conv=False)),
                "with_4grams": ref.with_(engram=four)}  # fmt: skip
    for layer in range(ref.num_layers):
        if (layer,) != e.layer_ids:
            variants[f"layer_{layer}"] = ref.with_(engram=e.with_(layer_ids=(layer,)))
    return variants


def _train_all(configs: dict[str, ModelConfig], out_dir: Path, steps: int | None, progress: bool) -> dict[str, Any]:
    _, train_cfg = quickstart_moe()
    if steps is not None:
        train_cfg = train_cfg.with_(steps=steps, eval_every=min(train_cfg.eval_every, steps))
    results = {}
    for name, cfg in configs.items():
        t0 = time.time()
        r = train(cfg, train_cfg, out_dir / name, name=name, progress=progress)
        results[name] = {**r.counts, "val_loss": r.val_loss, "wall_s": round(time.time() - t0, 1)}
    return results


def scaling_sweep(out_dir: Path, *, slots=SCALING_SLOTS, steps: int | None = None, progress: bool = True) -> list[dict]:
    out_dir = Path(out_dir)
    rows = []
    for s in slots:
        results = _train_all(scaling_configs(s), out_dir / f"slots-{s}", steps, progress)
        rows.append({"slots": s, "engram_val_loss": results["engram"]["val_loss"],
                     "overencoding_val_loss": results["overencoding"]["val_loss"],
                     "engram_params": results["engram"]["params_engram"],
                     "overencoding_params": results["overencoding"]["params_engram"]})  # fmt: skip
        _write_csv(out_dir / "scaling.csv", rows)
    write_json(out_dir / "scaling.json", {"rows": rows, **run_metadata()})
    _plot_scaling(rows, out_dir / "scaling.png")
    return rows


def ablation_sweep(out_dir: Path, *, steps: int | None = None, progress: bool = True) -> list[dict]:
    out_dir = Path(out_dir)
    results = _train_all(ablation_configs(), out_dir, steps, progress)
    ref = results["reference"]["val_loss"]
    rows = [{"variant": k, "val_loss": v["val_loss"], "delta_vs_reference": v["val_loss"] - ref,
             "params_total": v["params_total"], "params_active": v["params_active"]} for k, v in results.items()]  # fmt: skip
    _write_csv(out_dir / "ablations.csv", rows)
    write_json(out_dir / "ablations.json", {"rows": rows, **run_metadata()})
    _plot_ablations(rows, out_dir / "ablations.png")
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b log10(x)."""
    lx = [math.log10(x) for x in xs]
    mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ys)) / max(sum((u - mx) ** 2 for u in lx), 1e-12)
    return my - b * mx, b


def _plot_scaling(rows: list[dict], path: Path) -> None:
    with saved_figure(path, (6, 4)) as (fig, ax):
        xs = [r["slots"] for r in rows]
        for key, color, label in (("engram_val_loss", "tab:red", "Engram"), ("overencoding_val_loss", "tab:blue", "OverEncoding")):
            ys = [r[key] for r in rows]
            a, b = _fit(xs, ys)
            ax.scatter(xs, ys, color=color)
            ax.plot(xs, [a + b * math.log10(x) for x in xs], color=color, label=f"{label}: {b:+.3f} per decade")
        ax.set_xscale("log")
        ax.set_xlabel("memory slots (table rows)")
        ax.set_ylabel("validation loss")
        ax.set_title("Fixed backbone, growing memory")
        ax.grid(alpha=0.3)
        ax.legend()


def _plot_ablations(rows: list[dict], path: Path) -> None:
    with saved_figure(path, (6, 0.4 * len(rows) + 1.2)) as (fig, ax):
        ax.barh([r["variant"] for r in rows], [r["delta_vs_reference"] for r in rows], color="tab:purple")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("validation loss minus reference (positive = worse)")
