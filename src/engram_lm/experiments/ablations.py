"""`engram experiment ablations` and the page's sections `ablations` and `branch-fusion`.

ablations (paper Figure 5): from the quickstart MoE+Engram reference, remove one piece at a
time (gating, tokenizer compression, short conv), add 4-grams at the same number of slots,
move the single module to each layer, and the capacity-1 control. On an M-branch backbone
(`branches`, the paper's mHC uses 4) one more: `no_branch_fusion`, one key projection, gate and
conv norm on the mean of the branches instead of one per branch, the same output added to
every branch (our reading of the paper's "multi-branch fusion" ablation; the paper gives no formula).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engram_lm.experiments.page import keyed_section
from engram_lm.experiments.rows import group_by
from engram_lm.experiments.runner import RunSpec, sweep, write_csv
from engram_lm.experiments.stats import estimate
from engram_lm.experiments.variants import quickstart_train, slots, with_slots
from engram_lm.models.config import ModelConfig
from engram_lm.plotting import regime_caption, saved_figure
from engram_lm.recipes import quickstart_engram, quickstart_engram_template, quickstart_moe
from engram_lm.training.run import run_metadata, write_json


ABLATION_FIELDS = ("variant", "seed", "val_loss", "params_total", "params_active", "epochs")
TWO_MODULES = (1, 2)


def ablation_configs(branches: int = 1) -> dict[str, ModelConfig]:
    ref = quickstart_engram()[0].with_(num_branches=branches)
    e = ref.engram
    four = with_slots(e.with_(max_ngram=4, table_sizes=(2, 2, 2)), slots(e))
    variants = {"reference": ref, "no_gating": ref.with_(engram=e.with_(use_gating=False)),
                "no_compression": ref.with_(engram=e.with_(compress_tokens=False)),
                "no_short_conv": ref.with_(engram=e.with_(use_short_conv=False)),
                "with_4grams": ref.with_(engram=four), "capacity1": ref.with_(engram=e.with_(single_slot=True))}  # fmt: skip
    for layer in range(ref.num_layers):
        if (layer,) != e.layer_ids:
            variants[f"layer_{layer}"] = ref.with_(engram=e.with_(layer_ids=(layer,)))
    # the paper: two modules (layers 2 and 6 of its ablation model) beat one. Here the early layer and the middle
    # one, the same number of slots split between them; each module brings its own projections, gate and conv
    variants["two_modules"] = ref.with_(engram=with_slots(e.with_(layer_ids=TWO_MODULES), slots(e)))
    if branches > 1:
        variants["no_branch_fusion"] = ref.with_(engram=e.with_(branch_fusion=False))
    return variants


def ablation_specs(*, seeds=(0,), steps: int | None = None, data: str | None = None, prefix: str = "", branches: int = 1,
                   variants: tuple[str, ...] | None = None, experiment: str = "ablations") -> list[RunSpec]:  # fmt: skip
    """Every variant of ablation_configs(branches) per seed, or only the named `variants`."""
    configs = ablation_configs(branches)
    unknown = sorted(set(variants or ()) - set(configs))
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown} at {branches} branch(es); choose from {sorted(configs)}")
    specs = []
    for seed in seeds:
        for name, cfg in configs.items():
            if variants is not None and name not in variants:
                continue
            tags = {"experiment": experiment, "variant": name, "seed": seed}
            specs.append(RunSpec(f"{prefix}{name}/seed-{seed}", cfg, quickstart_train(steps, data, seed), tags))
    return specs


def ablation_sweep(out_dir: Path, *, progress: bool = True, device: str | None = None, **kwargs: Any) -> list[dict]:
    return sweep(out_dir, ablation_specs(**kwargs), write_ablations, progress=progress, device=device)


def write_ablations(results: list[dict[str, Any]], out_dir: Path) -> None:
    if not results:
        return
    write_csv(out_dir / "ablations.csv", results, ABLATION_FIELDS)
    write_json(out_dir / "ablations.json", {"runs": results, **run_metadata()})
    _plot_ablations(results, out_dir / "ablations.png")


def _plot_ablations(results: list[dict], path: Path) -> None:
    groups = group_by(results, "variant")
    names = list(groups)
    est = [estimate([r["val_loss"] for r in groups[(n,)]]) for (n,) in names]
    with saved_figure(path, (6, 0.4 * len(names) + 1.2)) as (fig, ax):
        ax.barh([n for (n,) in names], [e.mean for e in est], xerr=[0 if e.n < 2 else e.se for e in est],
                color="tab:purple", capsize=3)  # fmt: skip
        lo = min(e.mean for e in est)
        ax.set_xlim(lo - 0.05, max(e.mean for e in est) + 0.05)
        ax.set_xlabel("validation loss, mean ± SE over seeds")
        ax.set_title(f"Ablations\n{regime_caption(results)}", fontsize=10)


# ---- the page's sections ----------------------------------------------------------------------
PLACED = quickstart_engram_template().layer_ids[0]  # the quickstart's single module; the ablations move it to each other layer
_LAYERS = quickstart_moe()[0].num_layers
PLACEMENT_CLAIM = f"ablation: moving the single module from layer {PLACED} of {_LAYERS} to layer"
PLACEMENT_CLAIMS = {f"layer_{k}": f"{PLACEMENT_CLAIM} {k} hurts (the paper: one module is best early, at layer 2)"
                    for k in range(_LAYERS) if k != PLACED}  # fmt: skip
TWO_MODULES_CLAIM = (f"ablation: two modules (layers {' and '.join(map(str, TWO_MODULES))}, the same slots split) beat one "
                     f"(at layer {PLACED}), as the paper's layers 2 and 6 beat layer 2 alone")
BRANCH_FUSION_CLAIM = ("ablation: removing multi-branch fusion hurts (M = 4: one key projection, gate and conv norm "
                       "on the mean of the branches instead of one per branch)")


def ablations_section(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    return keyed_section(
        runs, "Ablations", "variant", "reference",
        "From the quickstart MoE+Engram (one module, at layer " + str(PLACED) + "), `{data}` ({epochs} epochs), {seeds} "
        "seed(s); each variant changes one thing (docs/experiments.md): a piece removed, the module moved to "
        "`layer_k`, 4-grams or two modules at the same number of slots, or a capacity-1 table; positive = the "
        "change hurts.",
        {"no_gating": "ablation: removing gating hurts", "no_compression": "ablation: removing tokenizer compression hurts",
         "no_short_conv": "ablation: removing the short conv hurts", "capacity1": "ablation: a capacity-1 table hurts",
         "with_4grams": "ablation: adding 4-grams at a fixed budget hurts", **PLACEMENT_CLAIMS,
         "two_modules": (TWO_MODULES_CLAIM, "lower")})  # fmt: skip


def branch_fusion_section(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    return keyed_section(
        runs, "Multi-branch fusion (M = 4)", "variant", "reference",
        "The quickstart MoE+Engram on an M = 4 backbone (the paper's mHC expansion), `{data}` ({epochs} epochs), "
        "{seeds} seed(s): `reference` fuses Engram into each branch with its own key projection, gate and conv norm "
        "(the paper's design); `no_branch_fusion` has one of each, reads the mean of the branches and adds the same "
        "output to every branch (our reading of the paper's ablation, which gives no formula; it has 3 key "
        "projections fewer). Positive = removing fusion hurts.",
        {"no_branch_fusion": BRANCH_FUSION_CLAIM})  # fmt: skip
