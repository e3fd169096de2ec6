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

from engram_lm.experiments.runner import RunSpec
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
