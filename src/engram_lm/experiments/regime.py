"""`engram experiment regime` and the study's section `regime`: does table decay 10 (the
default at every length until this section; now the default for runs that read their data at
most once, training/regime.py) keep Engram level with (or ahead of) the MoE past one epoch on
corpora other than the Bible, and which regulariser does where it does not?

The quickstart MoE and its iso-parameter MoE+Engram with decay 10 (variant `engram`) and
with each candidate in its place, each trained to about 1, 2.5 and 4 epochs of a corpus:
one finished run per length, with its own schedule, as a user's `engram quickstart --steps N`
would train. The corpora differ in kind and size: a slice of the Python standard library
(code), a slice of the novels (prose; when a novels folder is given) and the built-in Bible
(~1M tokens). A slice is the corpus' first 1,000,000 characters (training/corpus.py),
about 250k tokens: 120-130 quickstart steps an epoch. The MoE has no tables, so it trains
as the study's MoE runs do (paper_optimiser). Planned smallest first, every seed of a
length before the next: a stopped sweep has whole comparisons.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from engram_lm.experiments.duration import DEFAULT_DECAY
from engram_lm.experiments.page import STUDY_COMMAND, claim_verdict, fmt_estimate, md_table, seeds_of, verdict_word
from engram_lm.experiments.regularisation import regulariser_words, with_regulariser
from engram_lm.experiments.rows import group_by
from engram_lm.experiments.runner import RunSpec, sweep, write_csv
from engram_lm.experiments.stats import compare, estimate
from engram_lm.plotting import plot_gap_curve, saved_figure, zero_and_one_epoch
from engram_lm.models.config import ModelConfig
from engram_lm.recipes import paper_optimiser, quickstart_engram, quickstart_moe
from engram_lm.training.config import TrainConfig
from engram_lm.training.run import run_metadata, write_json

REGIME_EPOCHS = (1.0, 2.5, 4.0)
# candidates for the default where it fails (on the code slice at 4 epochs: +0.081 ± 0.018, 3 seeds): the study's two
# other regularisers that held the Bible's repeated data, row dropout 0.5 (the lowest there, +0.018 single-epoch) and
# decay 30 (tied with 10 there, +0.015 single-epoch); then, as both still trailed at 4 epochs of both slices (row
# dropout +0.013 ± 0.028 on code, +0.016 ± 0.016 on the novels, 2 seeds; decay 30 +0.039 and +0.039, called worse),
# the next step up the row-dropout range the study measured, 0.7 (+0.056 single-epoch on the Bible)
REGIME_CANDIDATES = ("row_dropout_0.5", "table_wd_30.0", "row_dropout_0.7")
MARGIN = 0.02  # nats: how much worse than the MoE still counts as level (about the single-epoch costs measured)
SLICE_CHARS = 1_000_000
CSV_FIELDS = ("corpus", "epochs_target", "variant", "seed", "steps", "epochs", "val_loss")
CLAIM = f"ours: with table decay {DEFAULT_DECAY:g} Engram stays level with or ahead of the MoE past one epoch"
SINGLE_CLAIM = f"ours: with table decay {DEFAULT_DECAY:g} Engram beats the MoE at about one epoch"


def regime_corpora(novels: str | None = None) -> dict[str, str]:
    """label -> data spec, smallest first: the stdlib slice, the novels slice (if a folder is given), the Bible."""
    corpora = {"python-stdlib slice": f"first:{SLICE_CHARS}:python-stdlib"}
    if novels:
        corpora["novels slice"] = f"first:{SLICE_CHARS}:{novels}"
    return {**corpora, "bible": "bible"}


def regime_specs(*, seeds=(0,), corpora: dict[str, str] | None = None, epochs=REGIME_EPOCHS, prefix: str = "",
                 candidates: tuple[str, ...] = ()) -> list[RunSpec]:  # fmt: skip
    """Per corpus, per length (about `epochs` of its training tokens), per seed: the MoE and the
    MoE+Engram with the default decay, and with each of `candidates` (regularisers of the study,
    experiments/regularisation.py, named as there: `engram_<name>`, trained as the study trains
    them). Measures each corpus (tokenizing it once, cached)."""
    from engram_lm.training.data import prepare_data

    moe, train_cfg = quickstart_moe()
    engram, _ = quickstart_engram()
    per_step = train_cfg.tokens_per_step
    specs = []
    for label, data in (corpora or regime_corpora()).items():
        tokens = len(prepare_data(data, train_cfg.tokenizer).train)
        for target in epochs:
            steps = max(1, round(target * tokens / per_step))
            t = train_cfg.with_(data=data, steps=steps, eval_every=min(train_cfg.eval_every, steps),
                                table_weight_decay=DEFAULT_DECAY)  # `engram`: decay 10 at every length
            variants = [("moe", moe, paper_optimiser(t)), ("engram", engram, t),
                        *(candidate(engram, t, name) for name in candidates)]  # fmt: skip
            for seed in seeds:
                for variant, model, train in variants:
                    tags = {"experiment": "regime", "corpus": label, "epochs_target": target, "variant": variant,
                            "seed": seed}  # fmt: skip
                    key = f"{prefix}{_slug(label)}/epochs-{target:g}/{variant}/seed-{seed}"
                    specs.append(RunSpec(key, model, train.with_(seed=seed), tags))
    return specs


def candidate(engram: ModelConfig, train: TrainConfig, name: str) -> tuple[str, ModelConfig, TrainConfig]:
    """A regulariser of the study in place of the default decay, as the study trains it (decay 0 unless it sets one)."""
    return (f"engram_{name}", *with_regulariser(engram, train, name))


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def regime_sweep(out_dir: Path, *, progress: bool = True, device: str | None = None, **kwargs: Any) -> list[dict]:
    return sweep(out_dir, regime_specs(**kwargs), write_regime, progress=progress, device=device)


def gaps_by_length(runs: list[dict[str, Any]], variant: str = "engram") -> list[dict[str, Any]]:
    """Per (corpus, length): `variant` minus MoE paired over seeds, with both losses and the epochs trained."""
    out = []
    for (corpus, target), g in group_by(runs, "corpus", "epochs_target").items():
        engram = {r["seed"]: r["val_loss"] for r in g if r["variant"] == variant}
        moe = {r["seed"]: r["val_loss"] for r in g if r["variant"] == "moe"}
        shared = set(engram) & set(moe)
        if not shared:
            continue
        c = compare(engram, moe)
        out.append({"corpus": corpus, "variant": variant, "target": target, "epochs": g[0]["epochs"],
                    "steps": g[0]["requested"]["train"]["steps"],
                    "moe": estimate([moe[s] for s in sorted(shared)]), "engram": estimate([engram[s] for s in sorted(shared)]),
                    "gap": c.diff, "verdict": c.verdict})  # fmt: skip
    return sorted(out, key=lambda x: (list(dict.fromkeys(r["corpus"] for r in runs)).index(x["corpus"]), x["target"]))


def engram_variants(runs: list[dict[str, Any]]) -> list[str]:
    """The Engram variants present: the default first, then candidates by name."""
    names = {r["variant"] for r in runs if r["variant"] != "moe"}
    return sorted(names, key=lambda v: (v != "engram", v))


def write_regime(results: list[dict[str, Any]], out_dir: Path) -> None:
    if not results:
        return
    rows = [{**r, "steps": r["requested"]["train"]["steps"]} for r in results]
    write_csv(out_dir / "regime.csv", rows, CSV_FIELDS)
    write_json(out_dir / "regime.json", {"runs": results, **run_metadata()})
    plot_regime(results, out_dir / "regime.png")


def plot_regime(results: list[dict[str, Any]], path: Path) -> None:
    with saved_figure(path, (6.5, 4)) as (fig, ax):
        variants = engram_variants(results)  # a colour per variant, a line style per corpus
        colors = dict(zip(variants, ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")))
        corpora = list(dict.fromkeys(r["corpus"] for r in results))
        styles = dict(zip(corpora, ("-", "--", ":", "-.")))
        curves = group_by([x for v in variants for x in gaps_by_length(results, v)], "corpus", "variant")
        for (corpus, variant), g in curves.items():
            label = f"{corpus}: " + ("decay 10" if variant == "engram" else variant.removeprefix("engram_"))
            plot_gap_curve(ax, g, label, colors[variant], styles[corpus])
        zero_and_one_epoch(ax)
        ax.set_xlabel("epochs of the corpus (one finished run per length)")
        ax.set_ylabel("Engram minus MoE, nats")
        seeds = len({r["seed"] for r in results})
        ax.set_title(f"Which table regulariser holds past one epoch?\n{', '.join(corpora)}; "
                     f"{min(r['epochs'] for r in results):.2g}-{max(r['epochs'] for r in results):.2g} epochs, "
                     f"up to {seeds} seed(s)", fontsize=10)  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


# ---- the page's section ------------------------------------------------------------------------
def _candidate_claims(variant: str) -> tuple[str, str]:
    words = regulariser_words(variant.removeprefix("engram_"))
    return (f"ours: with {words} instead of decay {DEFAULT_DECAY:g} Engram beats the MoE at about one epoch",
            f"ours: with {words} instead of decay {DEFAULT_DECAY:g} Engram stays level with or ahead of the MoE past one epoch")



def level_or_ahead(past: list[dict[str, Any]]) -> str:
    """"Level with or ahead" is a claim of no harm, which a failure to call a difference does not
    show: reproduced only when no length is called worse and at each the gap's upper bound
    (mean + 2 SE) stays under MARGIN; not reproduced when a length is called worse."""
    worse = [x for x in past if x["verdict"] == "higher"]
    if worse:
        return "not reproduced: called worse at " + ", ".join(f"{x['epochs']:.2f}" for x in worse) + " epochs"
    bound = max(x["gap"].mean + 2 * x["gap"].se if x["gap"].n > 1 else math.inf for x in past)
    if bound < MARGIN:
        return f"reproduced: not called worse, every upper bound under +{MARGIN:g} nats (highest {bound:+.4f})"
    return (f"inconclusive at this scale: not called worse, but an upper bound of {bound:+.4f} nats exceeds the "
            f"+{MARGIN:g} margin")



def regime_section(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    title = "## Which table regulariser holds past one epoch beyond the Bible?"
    if not runs:
        return [], [title, "", f"Not run yet (`{STUDY_COMMAND}`; or `engram experiment regime --seeds 3`).", ""]
    rows = [x for v in engram_variants(runs) for x in gaps_by_length(runs, v)]
    lines = [title, "", f"The quickstart MoE and its iso-parameter MoE+Engram with table decay {DEFAULT_DECAY:g} "
             f"(variant `engram`, the default at every length until this section), each trained to about {', '.join(f'{e:g}' for e in REGIME_EPOCHS)} "
             f"epochs of each corpus (one finished run per length, with its own schedule), {seeds_of(runs)} seed(s). A "
             f"slice is the corpus' first {SLICE_CHARS:,} characters cut into pieces of at most 20,000 (held-out pieces: "
             "every 20th). Other `engram_*` variants are candidates for where it fails: a regulariser of the study in its "
             "place, trained as the study trains it. What these rows chose: the default now takes decay "
             f"{DEFAULT_DECAY:g} when a run reads its data at most once and whole-row dropout 0.7 with no decay when it "
             "repeats (training/regime.py; chosen on the code and novel slices, checked on the Bible). Negative: Engram better. *Level with or ahead* needs "
             f"more than no call: no length called worse and at each the gap's upper bound (mean + 2 SE) under "
             f"+{MARGIN:g} nats.", ""]  # fmt: skip
    lines += md_table(["corpus", "variant", "epochs", "steps", "seeds", "MoE", "Engram", "Engram - MoE", "call"],
                      [[x["corpus"], x["variant"], f"{x['epochs']:.2f}", x["steps"], x["gap"].n, fmt_estimate(x["moe"]),
                        fmt_estimate(x["engram"]), fmt_estimate(x["gap"], True), verdict_word(x["verdict"])] for x in rows])  # fmt: skip
    verdicts = []
    for (corpus, variant), g in group_by(rows, "corpus", "variant").items():
        numbers = ", ".join(f"{fmt_estimate(x['gap'], True)} at {x['epochs']:.2f} epochs" for x in g)
        regime = f"{corpus}, {g[0]['epochs']:.2f}-{g[-1]['epochs']:.2f} epochs, {min(x['gap'].n for x in g)} seed(s)"
        once = [x for x in g if x["epochs"] <= 1.05]
        single, claim = (SINGLE_CLAIM, CLAIM) if variant == "engram" else _candidate_claims(variant)
        if once:
            verdicts.append([f"{single} ({corpus})", claim_verdict(once[-1]["verdict"], "lower"), regime, numbers])
        past = [x for x in g if x["epochs"] > 1.05]
        if past:
            verdicts.append([f"{claim} ({corpus})", level_or_ahead(past), regime, numbers])
    return verdicts, lines + [""]
