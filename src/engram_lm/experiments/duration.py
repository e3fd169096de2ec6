"""`engram experiment duration`: does Engram's gain last as training goes on?

The quickstart MoE, its iso-parameter MoE+Engram and the capacity-1 control train for 8x
the quickstart's tokens, one long run per seed, evaluated on the same held-out windows
every quickstart-length (so at 1x, 2x, 4x and 8x among others). Run it on data that does
not repeat within 8x (a corpus of >= ~7M training tokens, e.g. a folder of novels) and on
the built-in corpus, which repeats (~1M tokens: 8x is ~7 epochs); every milestone reports
its epochs. One learning-rate schedule spans the whole run (warmup, then the step decay at
80% and 90% of 8x), so the 1x milestone is not a finished quickstart run.
`branches` = 4 gives the same pair on the paper's multi-branch (mHC) backbone. Every run
trains with the paper's optimiser (table rows not decayed), except `DECAYED`: the same
Engram with table decay 10 (the single-epoch default, training/regime.py; the default at
every length when this ran), which asks whether it keeps the gain where the data repeats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engram_lm.experiments.page import STUDY_COMMAND, claim_verdict, data_name, fmt_estimate, md_table, seeds_of, verdict_word
from engram_lm.experiments.runner import RunSpec, sweep, write_csv
from engram_lm.experiments.stats import compare, estimate
from engram_lm.models.accounting import allocate
from engram_lm.plotting import plot_gap_curve, regime_caption, saved_figure
from engram_lm.recipes import QUICKSTART_RHO, paper_optimiser, quickstart_engram_template, quickstart_moe
from engram_lm.training.regime import SINGLE_EPOCH_TABLE_DECAY
from engram_lm.training.run import run_metadata, write_json

MILESTONES = (1, 2, 4, 8)  # multiples of the quickstart's tokens
CSV_FIELDS = ("variant", "seed", "step", "tokens", "epochs", "val_loss")
DEFAULT_DECAY = SINGLE_EPOCH_TABLE_DECAY  # the decay a run that reads its data once takes (the default until 2026-12)
DECAYED = f"engram_table_wd_{DEFAULT_DECAY}"  # the regularisation section's name for the same Engram and decay
LABELS = {"engram": "Engram", "capacity1": "capacity-1", DECAYED: f"Engram, table decay {DEFAULT_DECAY:g}"}


def duration_specs(*, data: str = "bible", seeds=(0,), base_steps: int | None = None, branches: int = 1,
                   variants=("moe", "engram", "capacity1"), prefix: str = "") -> list[RunSpec]:  # fmt: skip
    base, train_cfg = quickstart_moe()
    base, train_cfg = base.with_(num_branches=branches), paper_optimiser(train_cfg)
    base_steps = base_steps or train_cfg.steps
    engram = allocate(base, QUICKSTART_RHO, quickstart_engram_template())
    train_cfg = train_cfg.with_(data=data, steps=base_steps * max(MILESTONES), eval_every=base_steps)
    variants_by_name = {"moe": (base, train_cfg), "engram": (engram, train_cfg),
                        "capacity1": (engram.with_(engram=engram.engram.with_(single_slot=True)), train_cfg),
                        DECAYED: (engram, train_cfg.with_(table_weight_decay=DEFAULT_DECAY))}  # fmt: skip
    specs = []
    for seed in seeds:  # every variant of seed 0 first: the first comparison is complete early
        for variant in variants:
            model, train = variants_by_name[variant]
            tags = {"experiment": "duration", "variant": variant, "seed": seed, "branches": branches,
                    "base_steps": base_steps}  # fmt: skip
            specs.append(RunSpec(f"{prefix}{variant}/seed-{seed}", model, train.with_(seed=seed), tags))
    return specs


def milestone_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, evaluation): tokens and epochs at that step."""
    rows = []
    for r in results:
        t = r["requested"]["train"]
        per_step = t["batch_size"] * t["seq_len"] * t["grad_accum"]
        for step, loss in r["val_curve"]:
            tokens = step * per_step
            rows.append({"variant": r["variant"], "seed": r["seed"], "step": step, "tokens": tokens,
                         "epochs": tokens / r["train_tokens"], "val_loss": loss, "base_steps": r["base_steps"]})  # fmt: skip
    return rows


def gaps(results: list[dict[str, Any]], variant: str = "engram", baseline: str = "moe") -> list[dict[str, Any]]:
    """Per milestone: variant minus baseline, paired over seeds (negative = variant better)."""
    rows = milestone_rows(results)
    out = []
    base_steps = results[0]["base_steps"] if results else 1
    for mult in MILESTONES:
        step = mult * base_steps
        a = {r["seed"]: r["val_loss"] for r in rows if r["variant"] == variant and r["step"] == step}
        b = {r["seed"]: r["val_loss"] for r in rows if r["variant"] == baseline and r["step"] == step}
        shared = set(a) & set(b)  # both columns and the gap over the same seeds
        if not shared:
            continue
        a, b = {k: a[k] for k in shared}, {k: b[k] for k in shared}
        c = compare(a, b)
        epochs = next(r["epochs"] for r in rows if r["step"] == step)
        out.append({"multiple": mult, "step": step, "epochs": epochs, "gap": c.diff, "verdict": c.verdict,
                    "variant": estimate(list(a.values())), "baseline": estimate(list(b.values())),
                    "per_seed": {s: a[s] - b[s] for s in sorted(shared)}})  # fmt: skip
    return out


def duration_study(out_dir: Path, *, progress: bool = True, device: str | None = None, **kwargs: Any) -> list[dict]:
    return sweep(out_dir, duration_specs(**kwargs), write_duration, progress=progress, device=device)


def write_duration(results: list[dict[str, Any]], out_dir: Path) -> None:
    if not results:
        return
    write_csv(out_dir / "duration.csv", milestone_rows(results), CSV_FIELDS)
    write_json(out_dir / "duration.json", {"runs": results, **run_metadata()})
    plot_duration(results, out_dir / "duration.png")


def plot_duration(results: list[dict[str, Any]], path: Path) -> None:
    with saved_figure(path, (6, 4)) as (fig, ax):
        by_variant = {v: gaps(results, v) for v in ("engram", "capacity1", DECAYED)}
        for (variant, g), color in zip(by_variant.items(), ("tab:red", "tab:grey", "tab:blue")):
            if g:
                plot_gap_curve(ax, g, f"{LABELS[variant]} minus MoE", color)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ticks = by_variant["engram"] or by_variant["capacity1"]
        ax.set_xticks([x["epochs"] for x in ticks], [f"{x['multiple']}x\n{x['epochs']:.2g} ep" for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel("tokens: multiples of the quickstart's, and epochs of the data")
        ax.set_ylabel("validation loss gap (negative: better than MoE)")
        ax.set_title(f"Does the gain last?\n{regime_caption(results, up_to=True)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()


# ---- the page's section ------------------------------------------------------------------------
DECAYED_CLAIM = f"ours: with table decay {DEFAULT_DECAY:g} Engram beats the iso-parameter MoE"
DECAYED_CONTROL_CLAIM = f"ours: with table decay {DEFAULT_DECAY:g} the memory itself still helps: Engram beats the capacity-1 control"


def duration_section(runs: list[dict[str, Any]], title: str, regime: str) -> tuple[list[list[str]], list[str]]:
    if not runs:
        return [], [f"## {title}", "", f"Not run yet (`{STUDY_COMMAND}`).", ""]
    lines = [f"## {title}", "", f"Data: `{data_name(runs)}` ({regime}); {seeds_of(runs)} seed(s); one long run per seed, "
             "evaluated on the same held-out windows at each multiple of the quickstart's 819,200 tokens. One "
             "learning-rate schedule spans the 8x run (step decay at 80% and 90% of it), so the 1x-4x milestones are "
             "taken at the peak learning rate and only 8x after the decay; a milestone is not a finished shorter run.",
             ""]  # fmt: skip
    if any(r["variant"] == DECAYED for r in runs):
        lines[-2] += (f" Every run trains with the paper's optimiser (table rows not decayed) except `{DECAYED}`: the same "
                      f"Engram with table weight decay {DEFAULT_DECAY:g} (the default at every length when it ran; "
                      "now the default only where a run reads its data at most once).")  # fmt: skip
    rows, verdicts = [], []
    for variant in ("engram", "capacity1", DECAYED):
        for g in gaps(runs, variant):
            rows.append([variant, f"{g['multiple']}x", f"{g['epochs']:.2f}", g["gap"].n, fmt_estimate(g["baseline"]),
                         fmt_estimate(g["variant"]), fmt_estimate(g["gap"], True), verdict_word(g["verdict"])])  # fmt: skip
    lines += md_table(["variant", "tokens", "epochs", "seeds", "MoE", "variant", "variant - MoE", "call"], rows)
    engram = gaps(runs, "engram")
    if engram:
        first, last = engram[0], engram[-1]
        verdict = claim_verdict(last["verdict"], "lower")
        verdicts.append([f"Engram beats the iso-parameter MoE ({regime})", verdict,
                         f"{data_name(runs)}, {last['epochs']:.2f} epochs, {last['gap'].n} seed(s)",
                         f"gap {fmt_estimate(first['gap'], True)} at {first['multiple']}x, {fmt_estimate(last['gap'], True)} at {last['multiple']}x"])  # fmt: skip
        if last is not first and set(first["per_seed"]) & set(last["per_seed"]):
            change = compare(last["per_seed"], first["per_seed"])  # > 0: the gap closed (the gain shrank)
            holds = {"higher": "not reproduced", "lower": "reproduced"}.get(change.verdict, "inconclusive at this scale")
            verdicts.append([f"ours: the gain holds from {first['multiple']}x to {last['multiple']}x tokens ({regime})", holds,
                             f"{data_name(runs)}, {first['epochs']:.2f}-{last['epochs']:.2f} epochs, {change.diff.n} seed(s)",
                             f"gap at {last['multiple']}x minus gap at {first['multiple']}x {fmt_estimate(change.diff, True)} "
                             "(> 0: the gain shrank)"])  # fmt: skip
    cap = {g["multiple"]: g for g in gaps(runs, "engram", "capacity1")}
    if cap:
        last = cap[max(cap)]
        verdicts.append([f"the memory itself helps: Engram beats its capacity-1 control ({regime})",
                         claim_verdict(last["verdict"], "lower"), f"{data_name(runs)}, {last['epochs']:.2f} epochs, {last['gap'].n} seed(s)",
                         f"Engram - capacity-1 {fmt_estimate(last['gap'], True)} at {last['multiple']}x"])  # fmt: skip
    def every_milestone(claim: str, milestones: list[dict[str, Any]]) -> list[str]:
        """A verdict row called at the last milestone, with the gap at each."""
        last = milestones[-1]
        return [claim, claim_verdict(last["verdict"], "lower"), f"{data_name(runs)}, {last['epochs']:.2f} epochs, {last['gap'].n} seed(s)",
                ", ".join(f"{fmt_estimate(g['gap'], True)} at {g['multiple']}x" for g in milestones)]  # fmt: skip

    decayed = gaps(runs, DECAYED)
    control = gaps(runs, DECAYED, "capacity1")  # worth more than one vector per head, or level with the MoE by doing less?
    if decayed:
        verdicts.append(every_milestone(f"{DECAYED_CLAIM} ({regime})", decayed))
    if decayed and control:
        verdicts.append(every_milestone(f"{DECAYED_CONTROL_CLAIM} ({regime}; the control trained with the paper's optimiser)",
                                        control))  # fmt: skip
    return verdicts, lines + [""]
