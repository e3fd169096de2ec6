"""What every section of docs/results.md is written with: markdown tables, estimates and
calls in words, the runs of a section grouped by seed or variant, and the table of variants
against a reference (`keyed_section`) that most sections use.

A difference is called only past two standard errors of the paired per-seed difference
(experiments/stats.py); `claim_verdict` turns a call into reproduced / not reproduced /
inconclusive at this scale against the direction a claim expects.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from engram_lm.experiments.curves import falls_behind
from engram_lm.experiments.rows import group_by, natural_key
from engram_lm.experiments.stats import Estimate, compare, estimate


STUDY_COMMAND = "engram study --seeds 3 --long-data ../shared/data/gutenberg-novels --out results/study"


TRAIN_LOSS_NOTE = ("*Train loss*: the mean logged training loss over the last tenth of the run, with dropout active for "
                   "the dropout variants (which raises it); *val - train* is how much of the fit does not carry over to "
                   "held-out text. Held-out documents differ from the training ones even without repetition, so read the gap "
                   "against the MoE's and against none's: memorising tables widen it.")  # fmt: skip


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]

def epochs_range(runs: list[dict[str, Any]]) -> str:
    e = sorted({round(r["epochs"], 2) for r in runs})
    return f"{e[0]:g}" if len(e) == 1 else f"{e[0]:g}-{e[-1]:g}"

def data_name(runs: list[dict[str, Any]]) -> str:
    return Path(runs[0]["data"]).name


def seeds_of(runs: list[dict[str, Any]]) -> int:
    return len({r["seed"] for r in runs})


def fmt_estimate(e: Estimate, signed: bool = False, digits: int = 4) -> str:
    m = f"{e.mean:+.{digits}f}" if signed else f"{e.mean:.{digits}f}"
    return m if math.isnan(e.se) else f"{m} ± {e.se:.{digits}f}"


def by_seed(runs: list[dict[str, Any]], **match: Any) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in runs if all(r.get(k) == v for k, v in match.items())}


def losses_of(runs: list[dict[str, Any]], **match: Any) -> dict[int, float]:
    return {seed: r["val_loss"] for seed, r in by_seed(runs, **match).items()}


def losses_by_variant(runs: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """variant -> {seed: val loss}: the points stats.held_out_best chooses among."""
    return {v: {r["seed"]: r["val_loss"] for r in g} for (v,), g in group_by(runs, "variant").items()}


def verdict_word(verdict: str) -> str:
    return {"lower": "lower", "higher": "higher", "inconclusive": "inconclusive"}[verdict]


def claim_verdict(verdict: str, expected: str) -> str:
    if verdict == "inconclusive":
        return "inconclusive at this scale"
    return "reproduced" if verdict == expected else "not reproduced"


def keyed_section(runs: list[dict[str, Any]], title: str, key: str, reference: Any, intro: str,
                  claims: dict[Any, str], expect: str = "higher", train_columns: bool = False,
                  versus: Any = None) -> tuple[list[list[str]], list[str]]:  # fmt: skip
    """A table of variants against a reference variant (ablations, regularisers, table lr);
    `train_columns` adds each variant's end-of-run training loss and val - train gap, `versus`
    a second reference: each variant minus it, with its call (no verdict rows), and from
    which epoch on the variant's validation curve stays above it (curves.falls_behind). A claim
    is its text, or (text, expected call) where it differs from `expect`."""
    if not runs:
        return [], [f"## {title}", "", f"Not run yet (`{STUDY_COMMAND}`).", ""]
    ref = losses_of(runs, **{key: reference})
    second_runs = by_seed(runs, **{key: versus}) if versus is not None else {}
    second = {seed: r["val_loss"] for seed, r in second_runs.items()}
    lines = [f"## {title}", "", intro.format(data=data_name(runs), epochs=epochs_range(runs), seeds=seeds_of(runs)), ""]
    table, verdicts, seeds = [], [], seeds_of(runs)
    for (value,), g in sorted(group_by(runs, key).items(), key=lambda kv: natural_key(kv[0][0])):
        losses = {r["seed"]: r["val_loss"] for r in g}
        c = compare(losses, ref) if ref and value != reference else None
        partial = f" ({len(losses)} of {seeds} seeds)" if len(losses) < seeds else ""  # the intro gives the section's count
        table.append([value, fmt_estimate(estimate(list(losses.values()))) + partial, fmt_estimate(c.diff, True) if c else "",
                      verdict_word(c.verdict) if c else ""])  # fmt: skip
        if train_columns:
            trained = [r for r in g if r.get("train_loss_end") is not None]
            table[-1][2:2] = [fmt_estimate(estimate([r["train_loss_end"] for r in trained])) if trained else "",
                              fmt_estimate(estimate([r["val_loss"] - r["train_loss_end"] for r in trained]), True) if trained else ""]  # fmt: skip
        if versus is not None:
            c2 = compare(losses, second) if value != versus and set(losses) & set(second) else None
            table[-1] += [fmt_estimate(c2.diff, True) if c2 else "", verdict_word(c2.verdict) if c2 else "",
                          epochs_behind(g, second_runs) if c2 else ""]  # fmt: skip
        if c is not None and value in claims:
            claim, expected = claims[value] if isinstance(claims[value], tuple) else (claims[value], expect)
            verdicts.append([claim, claim_verdict(c.verdict, expected), f"{data_name(runs)}, {epochs_range(runs)} epochs, {c.diff.n} seed(s)",
                             f"{value} - {reference} {fmt_estimate(c.diff, True)}"])  # fmt: skip
    header = [key, "val loss", *(["train loss", "val - train"] if train_columns else []), f"minus {reference}", "call",
              *([f"minus {versus}", "call", f"above {versus} from (epochs)"] if versus is not None else [])]  # fmt: skip
    return verdicts, lines + md_table(header, table) + [""]


def epochs_behind(runs: list[dict[str, Any]], reference: dict[int, dict[str, Any]]) -> str:
    """Over seeds: from which epoch on each run's validation curve stays above the reference's
    (same seed); "never" when no seed's does, "k of n seeds" when some do."""
    paired = [falls_behind(r, reference[r["seed"]]) for r in runs if r["seed"] in reference and r.get("val_curve")]
    crossed = [e for e in paired if e is not None]
    if not paired:
        return ""
    if not crossed:
        return "never"
    text = fmt_estimate(estimate(crossed), False, 2)
    return text if len(crossed) == len(paired) else f"{text} ({len(crossed)} of {len(paired)} seeds; the others never)"
