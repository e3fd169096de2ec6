"""`engram study`: every experiment of the evidence, in one resumable plan, then the report.

Sections, in the order that answers the most important questions first (after the
regularisers, the short quickstart-budget sections that answer paper claims come before the
long runs):
  sanity        the no-memory MoE, OverEncoding and Engram at the largest table budget
                (seed 0 of the scaling sweep): does the baseline beat no memory?
  oe-diagnosis  OverEncoding at its largest size, paper form vs the token embedding kept at
                full scale vs a 5x table lr: why it loses to no memory here (it did)
  duration      MoE vs iso-parameter MoE+Engram vs capacity-1, 8x the quickstart's tokens,
                on data that does not repeat (--long-data)
  scaling       fixed backbone, Engram vs OverEncoding at equal table parameters
  sensitivity   the quickstart MoE+Engram per seed, its checkpoint kept: with Engram zeroed,
                how much accuracy is kept on copyable vs recallable next tokens
  allocation-4x the rho sweep at 4x the quickstart's tokens on --long-data
  regularisation  table weight decay, dropout on the retrieved vectors (element-wise or
                whole rows) or on the module's output vs none, 4x on the built-in corpus
                (it repeats: 3.45 epochs)
  regularisation-control  the memory of the default regulariser (table weight decay 10) and of
                the best on repeated data (whole-row dropout 0.5), each against its capacity-1
                control on the same repeated data: does the memory still contribute, or does
                Engram just do less?
  regularisation-cost  the same regularisers at the quickstart budget (0.86 epochs): what
                each costs where nothing repeats, the test for making one the default, and
                whether Engram with it still beats the MoE there (the MoE runs are reused)
  ablations     one piece removed at a time, at the quickstart budget
  branch-fusion the quickstart MoE+Engram on an M = 4 backbone (the paper's mHC expansion), with
                multi-branch fusion (a key, gate and conv norm per branch) and without (one of
                each on the mean of the branches): the paper's multi-branch ablation
  table-lr      Engram table learning-rate multiplier 0.5x .. 10x at the quickstart budget
  scaling-4x    Engram at the smallest, middle and largest table budget, 4x the quickstart's
                tokens on --long-data: does the shape seen at 0.86 epochs of the built-in corpus
                (log-linear or flattening) hold with more tokens? (the MoE is allocation-4x's rho 1)
  duration-repeated  the duration study on the built-in corpus (repeats: up to ~7 epochs), with
                the default's Engram (table decay 10) as well: does the default keep the gain?
  mhc           the duration pair (MoE, Engram) with M = 4 residual branches, --long-data
  allocation    the rho sweep at the quickstart budget (0.8 epochs of the built-in corpus)
  probes        beyond loss: MoE vs MoE+Engram vs capacity-1 at 3x the quickstart's tokens on
                --long-data with synthetic biographies and in-context recall documents mixed
                in; facts recalled against exposures, in bits and with Engram zeroed, and
                key-value recall and needles (experiments/probes.py)
  probes-half   the same at half the quickstart's width (the second model size)
  probes-qa     the same (quickstart size) on bios-qa: question-answer documents for half the people,
                so that the other half's questions measure extraction
Sections that need --long-data are skipped without it (and the plan says so). Runs are
folders under --out; a folder with result.json is finished and reused.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from engram_lm.experiments.ablations import ablation_specs, write_ablations
from engram_lm.experiments.allocation import allocation_specs, write_allocation
from engram_lm.experiments.curves import write_curves
from engram_lm.experiments.duration import DECAYED, duration_specs, write_duration
from engram_lm.experiments.oe_diagnosis import oe_diagnosis_specs
from engram_lm.experiments.probes import VARIANTS, analyse_probes, probe_specs, write_probes
from engram_lm.experiments.regime import REGIME_CANDIDATES, regime_corpora, regime_specs, write_regime
from engram_lm.experiments.regularisation import regularisation_control_specs, regularisation_specs
from engram_lm.experiments.runner import RunSpec, hms, load_result, run_specs
from engram_lm.experiments.scaling import SCALING_TABLE_PARAMS, scaling_specs, write_scaling
from engram_lm.experiments.sensitivity import analyse_run, sensitivity_specs
from engram_lm.experiments.table_lr import table_lr_specs
from engram_lm.recipes import quickstart_moe

SECTIONS = ("sanity", "oe-diagnosis", "duration", "scaling", "sensitivity", "allocation-4x", "regularisation",
            "regularisation-control", "regularisation-cost", "ablations", "branch-fusion", "table-lr", "scaling-4x", "duration-repeated", "mhc", "allocation", "regime",
            "probes", "probes-half", "probes-qa")  # fmt: skip
NEEDS_LONG_DATA = ("duration", "allocation-4x", "mhc", "scaling-4x", "probes", "probes-half", "probes-qa")


def study_plan(*, seeds: int = 3, long_data: str | None = None, sections=SECTIONS) -> dict[str, list[RunSpec]]:
    """section -> its runs, in the order they train."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown study section(s) {unknown}; choose from {list(SECTIONS)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds} (every run is trained with seeds 0..K-1; 3 for error bars)")
    seed_list = tuple(range(seeds))
    quick = 4 * quickstart_moe()[1].steps  # "4x": steps where the experts are trained
    plan: dict[str, list[RunSpec]] = {}
    scaling = scaling_specs(seeds=seed_list, prefix="scaling/")
    top = max(SCALING_TABLE_PARAMS)
    builders = {
        "sanity": lambda: [s for s in scaling if s.tags["seed"] == 0 and s.tags.get("budget", top) == top],
        "oe-diagnosis": lambda: oe_diagnosis_specs(seeds=seed_list, prefix="oe-diagnosis/"),
        "duration": lambda: duration_specs(data=long_data, seeds=seed_list, prefix="duration/"),
        "scaling": lambda: scaling,
        "sensitivity": lambda: sensitivity_specs(seeds=seed_list, prefix="sensitivity/"),
        "allocation-4x": lambda: allocation_specs(seeds=seed_list, steps=quick, data=long_data, prefix="allocation-4x/"),
        "regularisation": lambda: regularisation_specs(seeds=seed_list, steps=quick, prefix="regularisation/"),
        "regularisation-control": lambda: regularisation_control_specs(seeds=seed_list, steps=quick,
                                                                      prefix="regularisation-control/"),
        "regularisation-cost": lambda: regularisation_specs(seeds=seed_list, steps=quick // 4, experiment="regularisation-cost",
                                                            prefix="regularisation-cost/"),  # its MoE: oe-diagnosis', reused
        "duration-repeated": lambda: duration_specs(data="bible", seeds=seed_list, variants=("moe", "engram", "capacity1", DECAYED),
                                                    prefix="duration-repeated/"),
        "mhc": lambda: duration_specs(data=long_data, seeds=seed_list, branches=4, variants=("moe", "engram"), prefix="mhc/"),
        "allocation": lambda: allocation_specs(seeds=seed_list, prefix="allocation/"),
        "table-lr": lambda: table_lr_specs(seeds=seed_list, prefix="table-lr/"),
        "ablations": lambda: ablation_specs(seeds=seed_list, prefix="ablations/"),
        "branch-fusion": lambda: ablation_specs(seeds=seed_list, branches=4, variants=("reference", "no_branch_fusion"),
                                                experiment="branch-fusion", prefix="branch-fusion/"),
        # measures its corpora to size the runs: the novels slice only where the folder is there
        "regime": lambda: regime_specs(seeds=seed_list, prefix="regime/", candidates=REGIME_CANDIDATES,
                                       corpora=regime_corpora(long_data if long_data and Path(long_data).exists() else None)),
        "probes": lambda: probe_specs(long_data=long_data, seeds=seed_list, prefix="probes/"),
        "probes-half": lambda: probe_specs(long_data=long_data, seeds=seed_list, prefix="probes-half/", size="half"),
        "probes-qa": lambda: probe_specs(long_data=long_data, seeds=seed_list, prefix="probes-qa/", size="qa"),
        "scaling-4x": lambda: scaling_specs(budgets=SCALING_TABLE_PARAMS[::2], seeds=seed_list, steps=quick, data=long_data,
                                            methods=("engram",), prefix="scaling-4x/"),
    }
    for name in SECTIONS:
        if name in sections and not (name in NEEDS_LONG_DATA and long_data is None):
            plan[name] = builders[name]()
    return plan


def analyse(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """What a kept checkpoint is asked after training: the probes section's probes, or the
    sensitivity section's token classes."""
    if spec.tags.get("experiment") == "probes":
        return analyse_probes(spec, run_dir)
    return analyse_run(spec, run_dir)


def planned_runs(plan: dict[str, list[RunSpec]]) -> list[RunSpec]:
    """Every run of the plan once, in plan order ("sanity" repeats three scaling runs)."""
    return list({s.key: s for specs in plan.values() for s in specs}.values())


def run_study(out: Path, *, seeds: int = 3, long_data: str | None = None, sections=SECTIONS, device: str | None = None,
              progress: bool = True, dry_run: bool = False, report: Path | None = None) -> dict[str, Any]:  # fmt: skip
    out = Path(out)
    plan = study_plan(seeds=seeds, long_data=long_data, sections=sections)
    skipped = [s for s in sections if s not in plan]
    if skipped:
        print(f"skipped (pass --long-data FOLDER, a corpus that does not repeat within 8x the quickstart): {skipped}")
    ordered = planned_runs(plan)
    for name, specs in plan.items():
        done = sum(load_result(out, s) is not None for s in specs)
        print(f"  {name:<18} {len(specs):>3} runs, {done:>3} finished")
    results = run_specs(out, ordered, device=device, progress=progress, dry_run=dry_run, analyse=analyse)
    if dry_run:  # a plan prints; it never rewrites what is committed
        from engram_lm.experiments.report import load_results, trained_runs

        print(f"{trained_runs(load_results(out))} runs trained under {out} in all (the count docs/results.md gives; a "
              "run reused in a second section counts once); the plan above counts only the sections it plans")  # fmt: skip
    else:
        write_study_outputs(out)
    if report is not None:
        from engram_lm.experiments.report import build_report

        build_report(out, Path(report))
    return {"planned": len(ordered), "finished": len(results), "sections": {k: len(v) for k, v in plan.items()}}


def run_study_in_workers(out: Path, *, workers: int, seeds: int = 3, long_data: str | None = None,
                         sections: tuple[str, ...] | list[str] | None = None, device: str | None = None,
                         report: Path | None = None, every_s: float = 60.0) -> dict[str, Any]:  # fmt: skip
    """The study in `workers` processes of one thread each (experiments/workers.py), then
    the section outputs and the report from whatever finished. Raises StudyStopped after
    writing them when a SIGINT/SIGTERM stopped the workers."""
    from engram_lm.experiments.workers import StudyStopped, report_command, run_workers, worker_command, worker_env

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = tuple(sections) if sections else SECTIONS
    run_study(out, seeds=seeds, long_data=long_data, sections=chosen, progress=False, dry_run=True)  # plan + estimate
    print(f"{workers} workers of one thread each: on {workers} free cores the wall time is about 1/{workers} of that")
    specs = planned_runs(study_plan(seeds=seeds, long_data=long_data, sections=chosen))
    started = time.monotonic()

    def progress() -> str:
        done = sum(load_result(out, s) is not None for s in specs)
        return f"[{hms(time.monotonic() - started)}] {done} of {len(specs)} planned runs finished"

    cmd = worker_command(seeds=seeds, out=out, long_data=long_data, sections=sections, device=device)
    logs = [out / f"worker-{k + 1}.log" for k in range(workers)]
    codes, stopped = run_workers([cmd] * workers, logs, progress=progress, every_s=every_s, env=worker_env())
    summary = run_study(out, seeds=seeds, long_data=long_data, sections=chosen, progress=False, dry_run=True)
    if report is None:  # else the report command writes them
        write_study_outputs(out)
    if report is not None and subprocess.run(report_command(out, report)).returncode != 0:
        raise ValueError(f"writing {report} failed (its error is above); every finished run is kept: fix the cause "
                         f"and run `engram experiment report --runs {out} --out {report}`")  # fmt: skip
    if stopped:
        raise StudyStopped(stopped_message(codes, logs, summary["finished"]))
    failed = [f"worker {k + 1} (exit code {c}, log {log})" for k, (c, log) in enumerate(zip(codes, logs)) if c != 0]
    if failed:
        raise ValueError(f"{', '.join(failed)} failed; read the log, fix the cause and rerun the same command")
    return summary


def write_study_outputs(out: Path) -> None:
    """Every section's outputs from every finished run under `out`, whether planned now or not
    (a run without --long-data does not plan the novels slices, whose rows must stay)."""
    from engram_lm.experiments.runner import read_result

    write_outputs(out, [read_result(p) for p in sorted(Path(out).glob("*/**/result.json"))])


def write_outputs(out: Path, results: list[dict[str, Any]]) -> None:
    """Per section: CSV (one row per run or milestone), JSON and the figure, rows in the
    order of their run folders, whoever calls (the plan or `experiment report`): the same
    runs always write the same files."""
    def section(prefix: str) -> list[dict[str, Any]]:
        return sorted((r for r in results if str(r.get("key", "")).startswith(prefix + "/")), key=lambda r: r["key"])

    write_scaling(section("scaling"), out / "scaling")
    write_scaling(section("scaling-4x"), out / "scaling-4x")
    write_allocation(section("allocation"), out / "allocation")
    write_allocation(section("allocation-4x"), out / "allocation-4x")
    write_ablations(section("ablations"), out / "ablations")
    write_ablations(section("branch-fusion"), out / "branch-fusion")
    for name in ("duration", "duration-repeated", "mhc"):
        write_duration(section(name), out / name)
    write_regime(section("regime"), out / "regime")
    for name in VARIANTS.values():
        write_probes(section(name), out / name)
    write_curves(section("regularisation"), out / "regularisation", "Validation loss as the built-in corpus repeats")
    write_curves(section("regularisation-cost"), out / "regularisation-cost", "Validation loss where nothing repeats")
    write_curves(section("regularisation-control"), out / "regularisation-control",
                 "Repeated data: the decayed memory against its capacity-1 control")


def stopped_message(codes: list[int], logs: list[Path], finished: int) -> str:
    """What a stopped study says: only a worker that exited on its own (0, or 130 after saving)
    is said to have saved; one killed by a signal (a negative code) resumes from its run's
    last checkpoint."""
    killed = [f"worker {k + 1} (killed by signal {-c}; log {log})" for k, (c, log) in enumerate(zip(codes, logs)) if c < 0]
    saved = "every worker saved a checkpoint of its run" if not killed else (
        f"{', '.join(killed)} did not save: its run resumes from its last checkpoint")  # fmt: skip
    return f"stopped; {saved}; {finished} runs are finished; rerun the same command to continue"
