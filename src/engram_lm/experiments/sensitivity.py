"""The study's sensitivity section (paper section 6 at laptop scale): train the quickstart
MoE+Engram per seed, keep its checkpoint, and on the held-out windows it was evaluated on
score the next tokens the context lets it copy and those only the training data's n-gram
statistics give (analysis/token_classes.py), with Engram and with its output zeroed.
The paper's claim, restated for tokens: zeroing Engram keeps less of the recallable
tokens' accuracy than of the copyable ones'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engram_lm.experiments.page import STUDY_COMMAND, claim_verdict, data_name, epochs_range, fmt_estimate, md_table, seeds_of
from engram_lm.experiments.runner import RunSpec
from engram_lm.experiments.stats import Estimate, compare, estimate
from engram_lm.recipes import paper_optimiser, quickstart_engram
from engram_lm.training.config import TrainConfig

CLASS_OPTIONS = {"n": 2, "min_count": 5, "min_share": 0.5}


def sensitivity_specs(*, seeds, prefix: str = "") -> list[RunSpec]:
    model, train_cfg = quickstart_engram()
    train_cfg = paper_optimiser(train_cfg)
    return [RunSpec(f"{prefix}engram/seed-{seed}", model, train_cfg.with_(seed=seed),
                    {"experiment": "sensitivity", "variant": "engram", "seed": seed}, keep_checkpoint=True)
            for seed in seeds]  # fmt: skip


def analyse_run(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Token-class sensitivity of the run's newest checkpoint on its own evaluation windows."""
    return token_class_analysis(spec.train, run_dir)


def token_class_analysis(t: TrainConfig, checkpoint: Path) -> dict[str, Any]:
    """Token-class sensitivity of a checkpoint (or a run folder's newest) on the evaluation
    windows of its training config `t`, with the n-gram statistics of `t`'s training split."""
    from engram_lm.analysis.sensitivity import class_sensitivity
    from engram_lm.analysis.token_classes import BigramContinuations
    from engram_lm.inference.loading import load_trained
    from engram_lm.training.data import eval_windows, prepare_data

    data = prepare_data(t.data, t.tokenizer)
    windows = [torch.cat([x, y[:, -1:]], dim=1) for x, y in eval_windows(data.val, t.batch_size, t.seq_len, t.eval_batches)]
    model, state = load_trained(checkpoint)
    stats = BigramContinuations(data.train, data.vocab_size)
    return {"checkpoint": Path(state["path"]).name, "class_options": CLASS_OPTIONS,
            "classes": class_sensitivity(model, windows, stats, **CLASS_OPTIONS)}  # fmt: skip


# ---- the page's section ------------------------------------------------------------------------
def sensitivity_section(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    title = "## Zeroing Engram: how much of copying and of recall is kept"
    analysed = [r for r in runs if "analysis" in r]
    if not analysed:
        return [], [title, "", f"Not run yet (`{STUDY_COMMAND}`).", ""]
    options = analysed[0]["analysis"]["class_options"]
    per_class = {c: [r["analysis"]["classes"][c] for r in analysed] for c in ("copyable", "recallable", "all")}
    lines = [title, "", f"The quickstart MoE+Engram, `{data_name(analysed)}` ({epochs_range(analysed)} epochs), "
             f"{seeds_of(analysed)} seed(s), scored on the held-out windows it was evaluated on, with Engram and with its "
             "output zeroed at inference. The paper's probe (factual QA vs reading comprehension: 29-44% vs 81-93% "
             "kept) needs a model that knows facts; at this scale it is asked of next tokens instead. *Copyable*: the "
             f"last {options['n']} tokens occurred earlier in the window and were followed there by the target (the "
             f"answer is in the context). *Recallable*: the training data follows the last two tokens with the target in "
             f"at least {options['min_share']:.0%} of at least {options['min_count']} occurrences (the answer is an "
             "n-gram statistic of the training data, what the table can hold). A token that is both belongs to neither.", ""]  # fmt: skip

    def est(c: str, field: str) -> Estimate:
        return estimate([x[field] for x in per_class[c]])

    table = [[c, f"{sum(x['tokens'] for x in per_class[c]) // len(analysed):,}", fmt_estimate(est(c, "accuracy_with_engram")),
              fmt_estimate(est(c, "accuracy_engram_zeroed")), fmt_estimate(est(c, "retained_accuracy")),
              fmt_estimate(est(c, "loss_with_engram")), fmt_estimate(est(c, "loss_engram_zeroed"))] for c in per_class]  # fmt: skip
    lines += md_table(["next tokens", "tokens per seed", "accuracy", "accuracy, Engram zeroed", "kept",
                       "loss", "loss, Engram zeroed"], table)  # fmt: skip
    kept = {c: {r["seed"]: r["analysis"]["classes"][c]["retained_accuracy"] for r in analysed} for c in ("recallable", "copyable")}
    c = compare(kept["recallable"], kept["copyable"])
    verdicts = [["zeroing Engram hurts recall more than copying (token level: recallable vs copyable next tokens)",
                 claim_verdict(c.verdict, "lower"), f"{data_name(analysed)}, {epochs_range(analysed)} epochs, {c.diff.n} seed(s)",
                 f"accuracy kept: recallable {fmt_estimate(est('recallable', 'retained_accuracy'))}, copyable "
                 f"{fmt_estimate(est('copyable', 'retained_accuracy'))}; difference {fmt_estimate(c.diff, True)}"]]  # fmt: skip
    return verdicts, lines + [""]
