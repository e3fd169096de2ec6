"""The study's `probes` section: beyond loss, what Engram's memory stores and what it frees.

The quickstart MoE, its iso-parameter MoE+Engram and Engram's capacity-1 control (one row
per hash column: the module without a table) train for 3x the quickstart's tokens on novels
with two kinds of probe documents mixed in (probes/mixes.py):
- 600 synthetic people, each written 1, 2, 4 ... 32 times (probes/biographies.py): after
  training, every attribute's exact recall in a training template and as a question, against
  exposures, and the knowledge in bits (in all and per parameter); with Engram zeroed too;
- 3,000 in-context recall documents (probes/recall.py): key-value lists and needles, so the
  models learn the formats; after training, fresh instances at the training context.
Each run keeps its checkpoint; the analysis also scores next-token accuracy on the held-out
windows with Engram and with it zeroed, so that "zeroing removes facts more than language"
compares like with like. The novels slice is sized so that a run reads it about once: a
person's exposures are their documents (the page gives the epochs).
The section trains on the current code and compares only within itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engram_lm.experiments.page import STUDY_COMMAND, claim_verdict, data_name, epochs_range, fmt_estimate, md_table, seeds_of
from engram_lm.experiments.runner import RunSpec
from engram_lm.experiments.stats import compare, estimate
from engram_lm.models.accounting import allocate
from engram_lm.probes.biographies import ATTRIBUTES, EXPOSURES, POOLS
from engram_lm.probes.recall import PAIRS
from engram_lm.recipes import QUICKSTART_RHO, paper_optimiser, quickstart_engram_template, quickstart_moe

PEOPLE, RECALL_DOCS = 600, 3000
STEPS_MULTIPLE = 3  # of the quickstart's steps
NOVEL_CHARS = 7_000_000  # with the probe documents, about one epoch at 3x the quickstart's tokens
ARMS = ("moe", "engram", "capacity1")
LABELS = {"moe": "MoE", "engram": "MoE+Engram", "capacity1": "capacity-1"}
FEW = (1, 2, 4)  # "few exposures": documents per person
MEASURABLE = 0.05  # a recall probe below this for every run is at chance (1 in 90 for a two-digit value)
GUESS = sum(1 / len(POOLS[a]) for a in ATTRIBUTES) / len(ATTRIBUTES)  # recall of a model that names one value per pool

CLAIMS = {
    "bits": "knowledge: Engram stores more facts than the iso-parameter MoE (bits, equal total parameters)",
    "few": "knowledge: Engram learns a fact from fewer exposures (recall at 1-4 documents per person)",
    "table": "knowledge: the table holds the facts (Engram vs its capacity-1 control, bits)",
    "zeroed": "knowledge: zeroing Engram removes facts more than language (share kept: facts vs next tokens)",
    "mqar": "recall: with Engram, attention retrieves from context better (key-value recall)",
    "needle": "recall: with Engram, attention retrieves from context better (needle)",
}


def probe_data(long_data: str, size: str = "quickstart") -> str:
    bios = "bios-qa" if size == "qa" else "bios"
    return f"{bios}:{PEOPLE}:0+recall:{RECALL_DOCS}:0+first:{NOVEL_CHARS}:{long_data}"


# The variants, each its own study section: the quickstart; the same model at half its width (issue
# 39 asks for two sizes at least: every width halved, the head dimension and the depth kept, the same
# data and tokens, so the same epochs: only the parameters change); and the quickstart on bios-qa
# (Physics of LMs 3.3's mixed training: question-answer documents for half the people, so that the
# other half's questions, never asked in training, measure extraction).
VARIANTS = {"quickstart": "probes", "half": "probes-half", "qa": "probes-qa"}
VARIANT_WORDS = {"quickstart": "The quickstart MoE", "half": "The quickstart MoE at half its width (dim 64, 2 heads of 32, "
                                                          "expert width 64, Engram 64 per n-gram)",
              "qa": "The quickstart MoE on biographies with question-answer documents for the even half of the people "
                    "(bios-qa)"}  # fmt: skip
QUESTION_WORDS = {False: "training never read", True: "(training read the even half's questions, never the odd half's)"}
EXTRACTION = "knowledge: Engram answers questions never asked in training better (bios-qa, the held-out half)"


def probe_models(size: str = "quickstart"):
    """(the MoE, its Engram template) at `size`."""
    if size not in VARIANTS:
        raise ValueError(f"unknown probe model size {size!r}; choose from {list(VARIANTS)}")
    base, template = quickstart_moe()[0], quickstart_engram_template()
    if size == "half":  # "qa" is the quickstart's
        base = base.with_(dim=base.dim // 2, num_heads=base.num_heads // 2, ffn_hidden=base.ffn_hidden // 2,
                          expert_hidden=base.expert_hidden // 2)  # fmt: skip
        template = template.with_(embed_per_ngram=template.embed_per_ngram // 2)
    return base, template


def claims(size: str = "quickstart") -> dict[str, str]:
    """The section's claims, named for its variant (the quickstart's keep their words); bios-qa's are
    the knowledge claims and extraction (its recall documents are the quickstart section's)."""
    if size == "qa":
        return {k: f"{v} (bios-qa)" for k, v in CLAIMS.items() if k not in ("mqar", "needle")} | {"extraction": EXTRACTION}
    return CLAIMS if size == "quickstart" else {k: f"{v} (half width)" for k, v in CLAIMS.items()}


def probe_specs(*, long_data: str, seeds, prefix: str = "", size: str = "quickstart") -> list[RunSpec]:
    base, template = probe_models(size)
    train_cfg = paper_optimiser(quickstart_moe()[1])
    train_cfg = train_cfg.with_(data=probe_data(long_data, size), steps=STEPS_MULTIPLE * train_cfg.steps)
    engram = allocate(base, QUICKSTART_RHO, template)
    models = {"moe": base, "engram": engram, "capacity1": engram.with_(engram=engram.engram.with_(single_slot=True))}
    return [RunSpec(f"{prefix}{arm}/seed-{seed}", models[arm], train_cfg.with_(seed=seed),
                    {"experiment": "probes", "variant": arm, "seed": seed}, keep_checkpoint=True)
            for seed in seeds for arm in ARMS]  # fmt: skip


def analyse_probes(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Knowledge and recall probes of the run's newest checkpoint, and next-token accuracy on its
    held-out windows with Engram and zeroed."""
    from engram_lm.inference.loading import load_trained
    from engram_lm.probes.fact_recall import probe_knowledge
    from engram_lm.probes.recall import probe_recall
    from engram_lm.training.data import eval_windows, prepare_data

    t = spec.train
    model, state = load_trained(run_dir)
    data = prepare_data(t.data, str(Path(state["path"]) / "tokenizer.json"))
    windows = eval_windows(data.val, t.batch_size, t.seq_len, t.eval_batches)
    return {"checkpoint": Path(state["path"]).name,
            "knowledge": probe_knowledge(model, data.tokenizer, t.data),
            "recall": probe_recall(model, data.tokenizer, t.data, t.seq_len),
            "next_token": next_token_accuracy(model, windows)}  # fmt: skip


@torch.no_grad()
def next_token_accuracy(model, windows) -> dict[str, float | None]:
    """Held-out next-token accuracy with Engram and, where the model has it, with its output zeroed."""
    from engram_lm.analysis.capture import engram_zeroed

    def accuracy() -> float:
        right = sum(int((model(x)[0].argmax(-1) == y).sum()) for x, y in windows)
        return right / sum(y.numel() for _, y in windows)

    full = accuracy()
    if not any(b.engram is not None for b in model.blocks):
        return {"with_engram": full, "engram_zeroed": None, "retained": None}
    with engram_zeroed(model):
        zeroed = accuracy()
    return {"with_engram": full, "engram_zeroed": zeroed, "retained": zeroed / full if full else None}


# ---- the page's sections -----------------------------------------------------------------------
def _by_arm(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    analysed = [r for r in runs if "analysis" in r]
    return {arm: sorted((r for r in analysed if r["variant"] == arm), key=lambda r: r["seed"]) for arm in ARMS}


def _finished(runs: list[dict[str, Any]]):
    """(analysed runs by arm, all of them, their regime in words), or None until every arm has one."""
    arms = _by_arm(runs)
    if not all(arms.values()):
        return None
    done = [r for rs in arms.values() for r in rs]
    return arms, done, f"{data_name(done)}, {epochs_range(done)} epochs, {seeds_of(done)} seed(s)"


def _per_seed(runs: list[dict[str, Any]], value) -> dict[int, float]:
    return {r["seed"]: v for r in runs if (v := value(r["analysis"])) is not None}


def _est(runs: list[dict[str, Any]], value, digits: int = 3) -> str:
    values = list(_per_seed(runs, value).values())
    return fmt_estimate(estimate(values), digits=digits) if values else "-"


def _few(a: dict[str, Any]) -> float:
    by = a["knowledge"]["template"]["by_exposures"]
    return sum(by[str(e)] for e in FEW) / len(FEW)


def _verdict(claim: str, a: list, b: list, value, expected: str, where: str, what: str) -> list[str]:
    return _paired(claim, _per_seed(a, value), _per_seed(b, value), expected, where, f"{what}: difference ")


def _paired(claim: str, a: dict[int, float], b: dict[int, float], expected: str, where: str, what: str) -> list[str]:
    """A verdict row from two {seed: value}; where no seed has both (a share of nothing recalled), it says so."""
    if not set(a) & set(b):
        return [claim, "inconclusive at this scale", where, "no seed where both are defined (with nothing recalled there "
                                                            "is no share to keep)"]  # fmt: skip
    c = compare(a, b)
    return [claim, claim_verdict(c.verdict, expected), where, f"{what}{fmt_estimate(c.diff, True, 3)}"]


def _not_run(size: str) -> str:
    return f"Not run yet (`{STUDY_COMMAND}`; section `{VARIANTS[size]}`)."


def knowledge_section(runs: list[dict[str, Any]], size: str = "quickstart") -> tuple[list[list[str]], list[str]]:
    title = f"## What the memory stores: facts about people ({VARIANTS[size]})"
    if (found := _finished(runs)) is None:
        return [], [title, "", _not_run(size), ""]
    arms, done, where = found
    named = claims(size)
    k = lambda f: (lambda a: f(a["knowledge"]))  # noqa: E731
    lines = [title, "", f"{VARIANT_WORDS[size]}, its iso-parameter MoE+Engram and the capacity-1 control, {STEPS_MULTIPLE}x the "
             f"quickstart's tokens on `{done[0]['data']}` ({epochs_range(done)} epochs: a person written n times was read "
             f"about n x that many times), {seeds_of(done)} seed(s), trained on the current code. {PEOPLE} synthetic people "
             "(probes/biographies.py), five attributes each, person i written 1, 2, 4 ... 32 times; a fact is recalled "
             "when every token of its value is the argmax after a training template (*template*) or after a question "
             f"{QUESTION_WORDS[size == 'qa']} (*question*). *Bits*: log2 of the attribute's pool size minus the value's NLL in bits, "
             "clipped at 0, summed (a simplified form of Physics of LMs 3.3's bound; their anchor: ~2 bits per parameter "
             f"at enough exposures). *Kept*: recall with Engram's output zeroed over recall with it. Guessing one value "
             f"of each pool scores {GUESS:.1%}.", ""]  # fmt: skip
    table = [[LABELS[arm], _est(rs, lambda a: a["knowledge"]["params"]["params_total"] / 1e6, 2),
              fmt_estimate(estimate([r["val_loss"] for r in rs]), digits=3),
              _est(rs, k(lambda q: q["template"]["recall"])), _est(rs, k(lambda q: q["question"]["recall"])),
              *(_est(rs, k(lambda q, e=e: q["template"]["by_exposures"][str(e)])) for e in EXPOSURES),
              _est(rs, k(lambda q: q["bits"]), 0), _est(rs, k(lambda q: q["bits_per_param"]), 4),
              _est(rs, k(lambda q: q.get("retained_recall")))] for arm, rs in arms.items()]  # fmt: skip
    lines += md_table(["model", "P_tot (M)", "val loss", "recall, template", "recall, question",
                       *(f"{e} docs" for e in EXPOSURES), "bits", "bits / param", "kept, Engram zeroed"], table)  # fmt: skip
    e, m, c = arms["engram"], arms["moe"], arms["capacity1"]
    loss = compare({r["seed"]: r["val_loss"] for r in e}, {r["seed"]: r["val_loss"] for r in m})
    recall = compare(_per_seed(e, k(lambda q: q["template"]["recall"])), _per_seed(m, k(lambda q: q["template"]["recall"])))
    gap = " A lower loss is not, here, more facts recalled." if loss.verdict == "lower" and recall.verdict != "higher" else ""
    lines += ["", f"Read: Engram's held-out loss is {fmt_estimate(loss.diff, True, 3)} against the MoE's ({loss.verdict}), "
              f"its fact recall {fmt_estimate(recall.diff, True, 3)} ({recall.verdict}).{gap} P_tot of the capacity-1 "
              "control is its own (one row per hash column: fewer parameters, the same active ones), so its bits per "
              "parameter are not a like-for-like comparison."]  # fmt: skip
    verdicts = [
        _verdict(named["bits"], e, m, k(lambda q: q["bits"]), "higher", where, "bits, Engram minus MoE"),
        _verdict(named["few"], e, m, _few, "higher", where, "template recall at 1-4 documents, Engram minus MoE"),
        _verdict(named["table"], e, c, k(lambda q: q["bits"]), "higher", where, "bits, Engram minus capacity-1"),
        _zeroed_verdict(e, where, named["zeroed"]),
    ]  # fmt: skip
    if size == "qa":
        lines += _extraction_lines(arms)
        verdicts.append(_verdict(named["extraction"], e, m, k(lambda q: q["question_held_out_people"]["recall"]), "higher",
                                 where, "question recall of the never-asked half, Engram minus MoE"))  # fmt: skip
    return verdicts, lines + [""]


def _extraction_lines(arms: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Question recall of the half whose questions training asked, and of the half it never asked, by arm."""
    k = lambda f: (lambda a: f(a["knowledge"]))  # noqa: E731
    table = [[LABELS[arm], _est(rs, k(lambda q: q["question"]["recall"])),
              _est(rs, k(lambda q: q["question_held_out_people"]["recall"]))] for arm, rs in arms.items()]  # fmt: skip
    return ["", "Extraction (Physics of LMs 3.1/3.3): training read question-answer documents for the even half of the "
            "people only; the never-asked half's questions test whether a fact stored from biographies can be "
            "retrieved in a form training never paired with it.", "",
            *md_table(["model", "question recall, all people", "question recall, the never-asked half"], table)]  # fmt: skip


def _zeroed_verdict(engram: list[dict[str, Any]], where: str, claim: str) -> list[str]:
    facts = _per_seed(engram, lambda a: a["knowledge"].get("retained_recall"))
    tokens = _per_seed(engram, lambda a: a["next_token"]["retained"])
    row = _paired(claim, facts, tokens, "lower", where,
                  f"share kept with Engram zeroed: fact recall {_est(engram, lambda a: a['knowledge'].get('retained_recall'))}, "
                  f"next-token accuracy {_est(engram, lambda a: a['next_token']['retained'])}; difference ")  # fmt: skip
    return row[:3] + [row[3] + " (paper: 29-44% of factual QA kept, 81-93% of reading comprehension)"]


def recall_section(runs: list[dict[str, Any]], size: str = "quickstart") -> tuple[list[list[str]], list[str]]:
    title = f"## What the memory frees: in-context recall ({VARIANTS[size]})"
    if (found := _finished(runs)) is None:
        return [], [title, "", _not_run(size), ""]
    arms, done, where = found
    r_ = lambda f: (lambda a: f(a["recall"]))  # noqa: E731
    context = done[0]["analysis"]["recall"]["context"]
    lines = [title, "", f"The same runs as the facts above. Trained with {RECALL_DOCS:,} recall documents mixed in, scored on "
             f"fresh instances of at most {context} tokens (the training context): *key-value*: multi-query associative "
             "recall in words (a list of pairs, then every key again; Zoology), accuracy per query by the number of pairs; "
             "*needle*: a code word in held-out novel text at depth 0.1, 0.5 or 0.9, asked at the end. The paper's claim "
             "(needle-in-a-haystack 84.2 -> 97.0) is at 32k tokens; this asks it at the models' context.", ""]  # fmt: skip
    table = [[LABELS[arm], _est(rs, r_(lambda q: q["mqar"]["accuracy"])),
              *(_est(rs, r_(lambda q, n=n: q["mqar"]["by_pairs"][str(n)])) for n in PAIRS),
              _est(rs, r_(lambda q: q["needle"]["accuracy"]))] for arm, rs in arms.items()]  # fmt: skip
    lines += md_table(["model", "key-value recall", *(f"{n} pairs" for n in PAIRS), "needle"], table)
    best = max(r["analysis"]["recall"][kind]["accuracy"] or 0 for r in done for kind in ("mqar", "needle"))
    if best < MEASURABLE:
        lines += ["", f"Not measurable at this scale: no run answers more than {best:.1%} of either probe, chance for a "
                  "two-digit value (1 in 90); the models did not learn to retrieve from context. The smallest change that "
                  "would make it measurable: far more recall documents (Zoology trains on hundreds of thousands of "
                  "instances), or a model large and long-trained enough to form induction heads on novels."]  # fmt: skip
    e, m = arms["engram"], arms["moe"]
    verdicts = [_verdict(claims(size)["mqar"], e, m, r_(lambda q: q["mqar"]["accuracy"]), "higher", where,
                         "key-value recall, Engram minus MoE"),
                _verdict(claims(size)["needle"], e, m, r_(lambda q: q["needle"]["accuracy"]), "higher", where,
                         "needle accuracy, Engram minus MoE")]  # fmt: skip
    if best < MEASURABLE:  # a difference between chance-level scores is no call, however small its error bar
        verdicts = [[v[0], "inconclusive at this scale", v[2], f"not measurable: every model at chance (best {best:.1%}); "
                     + v[3]] for v in verdicts]  # fmt: skip
    return verdicts, lines + [""]


PROBE_FIELDS = ("variant", "seed", "val_loss", "epochs", "recall_template", "recall_question", *(f"recall_{e}_docs" for e in EXPOSURES),
                "bits", "bits_per_param", "recall_kept_zeroed", "next_token_kept_zeroed", "mqar", "needle")  # fmt: skip


def probe_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per analysed run (the CSV's)."""
    rows = []
    for r in results:
        if "analysis" not in r:
            continue
        k, c, n = r["analysis"]["knowledge"], r["analysis"]["recall"], r["analysis"]["next_token"]
        rows.append({"variant": r["variant"], "seed": r["seed"], "val_loss": r["val_loss"], "epochs": r["epochs"],
                     "recall_template": k["template"]["recall"], "recall_question": k["question"]["recall"],
                     **{f"recall_{e}_docs": k["template"]["by_exposures"][str(e)] for e in EXPOSURES},
                     "bits": k["bits"], "bits_per_param": k["bits_per_param"], "recall_kept_zeroed": k.get("retained_recall"),
                     "next_token_kept_zeroed": n["retained"], "mqar": c["mqar"]["accuracy"], "needle": c["needle"]["accuracy"]})  # fmt: skip
    return rows


def write_probes(results: list[dict[str, Any]], out_dir: Path) -> None:
    from engram_lm.experiments.runner import write_csv
    from engram_lm.training.run import run_metadata, write_json

    if not results:
        return
    write_csv(out_dir / "probes.csv", probe_rows(results), PROBE_FIELDS)
    write_json(out_dir / "probes.json", {"runs": results, **run_metadata()})
    if any("analysis" in r for r in results):
        plot_recall_by_exposures(results, out_dir / "probes.png")


def plot_recall_by_exposures(results: list[dict[str, Any]], path: Path) -> None:
    """Fact recall (training template) against documents per person, one line per arm, mean ± SE over seeds."""
    from engram_lm.plotting import regime_caption, saved_figure

    arms = {arm: rs for arm, rs in _by_arm(results).items() if rs}
    with saved_figure(path, (6, 4)) as (fig, ax):
        for arm, rs in arms.items():
            est = [estimate([r["analysis"]["knowledge"]["template"]["by_exposures"][str(e)] for r in rs]) for e in EXPOSURES]
            ax.errorbar(EXPOSURES, [e.mean for e in est], yerr=[0 if e.n < 2 else e.se for e in est], marker="o",
                        capsize=3, label=LABELS[arm])  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("documents per person (each read about once an epoch)")
        ax.set_ylabel("facts recalled (training template)")
        ax.set_title(f"What the memory stores, by exposures\n{regime_caption([r for rs in arms.values() for r in rs])}",
                     fontsize=9)  # fmt: skip
        ax.legend()
