"""The opening of docs/results.md: what the study found, in a few plain sentences computed from
its runs (every number is the one its section's table gives, rounded), and one figure of
the main result: Engram's gap to the iso-parameter MoE as the epochs of its data grow.

A sentence whose runs have not finished is left out; its words follow the calls (2 SE of
the paired per-seed difference), so a rerun that changes a call changes the sentence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engram_lm.experiments.allocation import summarise, u_shape
from engram_lm.experiments.duration import DECAYED, DEFAULT_DECAY, gaps
from engram_lm.experiments.page import losses_of
from engram_lm.experiments.regime import engram_variants, gaps_by_length, level_or_ahead
from engram_lm.experiments.rows import group_by
from engram_lm.experiments.scaling import log_linearity, scaling_rows, strongest_overencoding_gap
from engram_lm.experiments.stats import Comparison, Estimate, compare
from engram_lm.plotting import plot_gap_curve, saved_figure, zero_and_one_epoch
from engram_lm.training.regime import REPEATED_ROW_DROPOUT

Runs = dict[str, list[dict[str, Any]]]


def nats(e: Estimate) -> str:
    """-0.0354 ± 0.0020 -> "-0.035 ± 0.002" (the summary rounds; the tables keep 4 digits)."""
    return f"{e.mean:+.3f}" if e.n < 2 else f"{e.mean:+.3f} ± {e.se:.3f}"


def _said(c: dict[str, Any] | Comparison, lower: str, higher: str, level: str) -> str:
    verdict = c["verdict"] if isinstance(c, dict) else c.verdict
    return {"lower": lower, "higher": higher}.get(verdict, level)


def single_epoch(sections: Runs) -> str:
    engram, control = gaps(sections.get("duration", []), "engram"), gaps(sections.get("duration", []), "engram", "capacity1")
    if not engram:
        return ""
    first, last = engram[0], engram[-1]
    text = (f"**Where the data does not repeat, Engram {_said(last, 'helps', 'hurts', 'makes no resolved difference')}.** "
            f"At equal total and active parameters, MoE+Engram minus the MoE is {nats(first['gap'])} nats at "
            f"{first['epochs']:.2f} epochs of the novels and {nats(last['gap'])} at {last['epochs']:.2f} "
            f"({last['multiple']}x the quickstart's tokens): the gain "
            f"{_said(compare(last['per_seed'], first['per_seed']), 'grows', 'shrinks', 'holds')} as training goes on.")  # fmt: skip
    cost = sections.get("regularisation-cost", [])
    decayed, moe = losses_of(cost, variant=DECAYED), losses_of(cost, variant="moe")
    if set(decayed) & set(moe):
        c = compare(decayed, moe)
        text += (f" On the quickstart's own budget (the Bible, {cost[0]['epochs']:.2f} epochs), Engram with table "
                 f"decay {DEFAULT_DECAY:g} (the default for a run that reads its data once) minus the MoE is {nats(c.diff)}.")  # fmt: skip
    if control:
        text += (f" It is the memory that {_said(control[-1], 'helps', 'hurts', 'may help')}, not the module's dense "
                 f"parameters: against its capacity-1 control (one row per hash head) Engram is {nats(control[-1]['gap'])} "
                 f"at {control[-1]['epochs']:.2f} epochs.")  # fmt: skip
    return text


def repeated(sections: Runs) -> str:
    runs = sections.get("duration-repeated", [])
    engram, decayed = gaps(runs, "engram"), gaps(runs, DECAYED)
    if not engram:
        return ""
    last = engram[-1]
    text = (f"**Where the data repeats, the tables memorise.** On the built-in Bible with the paper's optimiser, "
            f"Engram minus the MoE goes from {nats(engram[0]['gap'])} at {engram[0]['epochs']:.2f} epochs to "
            f"{nats(last['gap'])} at {last['epochs']:.2f}.")  # fmt: skip
    control = gaps(runs, DECAYED, "capacity1")
    if decayed:
        text += (f" Table decay {DEFAULT_DECAY:g} "
                 f"{_said(decayed[-1], 'stops that', 'does not stop it', 'stops that')}: {nats(decayed[-1]['gap'])} at "
                 f"{decayed[-1]['epochs']:.2f} epochs")  # fmt: skip
        if control:
            text += (f", and against a capacity-1 control {nats(control[-1]['gap'])}: on repeated data the decay "
                     + _said(control[-1], "keeps a memory that still helps", "leaves a memory worse than one vector per head",
                             "stops the memory from hurting but does not make it help"))  # fmt: skip
        text += ". For long runs, a corpus that does not repeat is the answer."
    return text


def beyond_the_bible(sections: Runs) -> str:
    """The default decay on other corpora past one epoch (section regime), and where it falls behind, each candidate in its place."""
    runs = sections.get("regime", [])
    parts, tried = [], []
    for corpus in dict.fromkeys(r["corpus"] for r in runs):
        mine = [r for r in runs if r["corpus"] == corpus]
        past = [x for x in gaps_by_length(mine) if x["epochs"] > 1.05]
        if not past:
            continue
        last = past[-1]
        call = level_or_ahead(past)
        said = "behind" if call.startswith("not") else "level or ahead" if call.startswith("reproduced") else "not resolved"
        parts.append(f"{nats(last['gap'])} at {last['epochs']:.2f} epochs of the {corpus} ({said} past one epoch)")
        if level_or_ahead(past).startswith("not reproduced"):
            for variant in engram_variants(mine)[1:]:
                held = [x for x in gaps_by_length(mine, variant) if x["epochs"] > 1.05]
                if held and len(held) == len(past):
                    holds = level_or_ahead(held).startswith("reproduced")
                    tried.append(f"`{variant}` {nats(held[-1]['gap'])} on the {corpus}" + (" (holds)" if holds else ""))
    if not parts:
        return ""
    text = (f"**Beyond the Bible, with table decay {DEFAULT_DECAY:g}:** Engram minus the MoE is " + "; ".join(parts) + ".")
    text += " In its place, at the longest run: " + ", ".join(tried) + "." if tried else ""
    return text + _repeated_default(runs)


def _repeated_default(runs: list[dict]) -> str:
    """What the default now trains with when a run repeats its data, past one epoch of every corpus measured."""
    variant = f"engram_row_dropout_{REPEATED_ROW_DROPOUT:g}"
    held = []
    for corpus in dict.fromkeys(r["corpus"] for r in runs):
        past = [x for x in gaps_by_length([r for r in runs if r["corpus"] == corpus], variant) if x["epochs"] > 1.05]
        if past:
            call = level_or_ahead(past)
            said = "behind" if call.startswith("not") else "level or ahead" if call.startswith("reproduced") else "not resolved"
            seeds = past[-1]["gap"].n
            held.append(f"{nats(past[-1]['gap'])} at {past[-1]['epochs']:.2f} epochs of the {corpus} ({said}"
                        + (f", {seeds} seeds)" if seeds < 3 else ")"))  # fmt: skip
    if not held:
        return ""
    return (f" So a run that reads its data more than once now trains its tables with whole-row dropout "
            f"{REPEATED_ROW_DROPOUT:g} and no decay by default (training/regime.py): " + "; ".join(held) + ".")


def scaling(sections: Runs) -> str:
    strongest = strongest_overencoding_gap(sections.get("scaling", []), sections.get("oe-diagnosis", []))
    shapes = {name: log_linearity([r for r in scaling_rows(sections.get(name, [])) if r["method"] == "engram"])
              for name in ("scaling", "scaling-4x")}  # fmt: skip
    parts = []
    if strongest is not None:
        diagnosis = sections.get("oe-diagnosis", [])
        paper, moe = losses_of(diagnosis, variant="overencoding"), losses_of(diagnosis, variant="moe")
        weak = (" (the paper's own form loses to no memory here)"
                if set(paper) & set(moe) and compare(paper, moe).verdict == "higher" else "")  # fmt: skip
        parts.append(f"Against OverEncoding at equal table parameters, Engram minus the strongest OverEncoding form is "
                     f"{nats(strongest.diff)}{weak}")  # fmt: skip
    falls = [f"{_shape_words(shapes[name])} {regime}" for name, regime in
             (("scaling-4x", "at 4x the quickstart's tokens (novels)"), ("scaling", "at the quickstart's 0.86 epochs (Bible)"))
             if shapes[name] is not None]  # fmt: skip
    if falls:
        parts.append("as its table grows, its loss " + " and ".join(falls))
    return ("; ".join(parts) + ".") if parts else ""


def _shape_words(shape) -> str:
    return {"reproduced": "falls log-linearly", "not reproduced": f"falls, then {shape.shape}"}.get(
        shape.verdict, "falls, log-linearly or not (inconclusive)")


def allocation_and_ablations(sections: Runs) -> str:
    parts = []
    for name, budget in (("allocation", "the quickstart budget"), ("allocation-4x", "4x the quickstart")):
        runs = sections.get(name, [])
        if runs:
            by_rho = {r["rho"]: {x["seed"]: x["val_loss"] for x in r["runs"]} for r in summarise(runs)}
            parts.append(f"{u_shape(by_rho)[0]} at {budget}")
    text = f"The paper's U-shaped optimum when sparse parameters are split between experts and memory: {', '.join(parts)}." if parts else ""
    runs = sections.get("ablations", [])
    ref = losses_of(runs, variant="reference")
    if ref:
        calls = {v: compare({r["seed"]: r["val_loss"] for r in g}, ref) for (v,), g in group_by(runs, "variant").items()
                 if v != "reference"}  # fmt: skip
        hurt = [f"`{v}` ({nats(c.diff)})" for v, c in calls.items() if c.verdict == "higher"]
        unresolved = [f"`{v}`" for v, c in calls.items() if c.verdict == "inconclusive"]
        helped = [f"`{v}` ({nats(c.diff)})" for v, c in calls.items() if c.verdict == "lower"]
        text += (f" Of the ablations, these hurt: {', '.join(hurt) or 'none'}; not resolved at this scale: "
                 f"{', '.join(unresolved) or 'none'}" + (f"; these helped: {', '.join(helped)}" if helped else "") + ".")  # fmt: skip
    return text.strip()


def summary_lines(sections: Runs, tally_line: str) -> list[str]:
    """"## In short" and its paragraphs (empty when no section has runs)."""
    paragraphs = [p for p in (single_epoch(sections), repeated(sections), beyond_the_bible(sections), scaling(sections),
                              allocation_and_ablations(sections)) if p]  # fmt: skip
    if not paragraphs:
        return []
    return ["## In short", "", *(line for p in paragraphs for line in (p, "")),
            f"The verdict table below has {tally_line[0].lower()}{tally_line[1:]}", ""]


CURVES = (("duration", "engram", "novels: Engram minus MoE (paper optimiser)", "tab:green"),
          ("duration-repeated", "engram", "Bible: Engram minus MoE (paper optimiser)", "tab:red"),
          ("duration-repeated", DECAYED, f"Bible: Engram with table decay {DEFAULT_DECAY:g} minus MoE", "tab:blue"))  # fmt: skip


def plot_summary(sections: Runs, path: Path) -> bool:
    """The main result in one figure; False (nothing written) without the duration runs."""
    curves = [(gaps(sections.get(name, []), variant), label, color) for name, variant, label, color in CURVES]
    if not any(g for g, _, _ in curves):
        return False
    with saved_figure(path, (7, 4.2)) as (fig, ax):
        for g, label, color in curves:
            if g:
                plot_gap_curve(ax, g, label, color)
        zero_and_one_epoch(ax)
        ax.set_xscale("log")
        ax.set_xlabel("epochs of the training data (log scale; dotted: one epoch); milestones of one long run per seed")
        ax.set_ylabel("validation loss gap, nats (negative: Engram better)")
        ax.set_title("Engram vs the iso-parameter MoE: helps once, memorises when the data repeats", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return True
