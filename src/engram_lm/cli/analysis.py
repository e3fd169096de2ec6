"""`engram experiment ...` and `engram analyze ...`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engram_lm.cli.args import float_list, int_list


def _seeds(args: argparse.Namespace) -> tuple[int, ...]:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    return tuple(range(args.seeds))


def cmd_allocation(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.allocation import summarise, allocation_sweep

    runs = allocation_sweep(Path(args.out), preset=args.preset, rhos=args.rhos, seeds=_seeds(args), steps=args.steps,
                            data=args.data, progress=not args.quiet, device=args.device)  # fmt: skip
    rows = [{k: v for k, v in r.items() if k != "runs"} for r in summarise(runs)]
    capacity1 = [{k: v for k, v in r.items() if k != "runs"} for r in summarise(runs, ("capacity1",))]
    return {"rows": rows, "capacity1": capacity1, "runs": len(runs),
            "csv": str(Path(args.out) / "allocation.csv"), "png": str(Path(args.out) / "allocation.png")}  # fmt: skip


def _print_allocation(r: dict[str, Any]) -> None:
    print(f"{'rho':>5}  {'val loss (mean ± SE)':<22}{'seeds':>6}")
    for row in r["rows"]:
        print(f"{row['rho']:>5.2f}  {_pm(row):<22}{row['n']:>6}")
    for row in r["capacity1"]:
        print(f"capacity-1 control at rho {row['rho']:.2f}: {_pm(row)}")
    best = min(r["rows"], key=lambda x: x["mean"])
    print(f"lowest mean loss at rho = {best['rho']:.2f} ({_pm(best)})")
    print(f"written: {r['csv']}, {r['png']}")


def _pm(row: dict[str, Any]) -> str:
    return f"{row['mean']:.4f}" if row["se"] != row["se"] else f"{row['mean']:.4f} ± {row['se']:.4f}"


def _summary(runs: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    from engram_lm.experiments.stats import estimate
    from engram_lm.experiments.rows import group_by

    return [{**dict(zip(keys, k)), "mean": (e := estimate([r["val_loss"] for r in g])).mean, "se": e.se, "n": e.n}
            for k, g in group_by(runs, *keys).items()]  # fmt: skip


def cmd_scaling(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.scaling import SCALING_TABLE_PARAMS, scaling_sweep

    rows = scaling_sweep(Path(args.out), budgets=args.budgets or SCALING_TABLE_PARAMS, seeds=_seeds(args),
                         steps=args.steps, data=args.data, progress=not args.quiet, device=args.device)  # fmt: skip
    return {"rows": _summary(rows, "method", "table_params"), "csv": str(Path(args.out) / "scaling.csv")}


def _print_scaling(r: dict[str, Any]) -> None:
    print(f"{'method':<22}{'table params':>14}  val loss (mean ± SE)")
    for row in sorted(r["rows"], key=lambda x: (x["method"], x["table_params"])):
        print(f"{row['method']:<22}{row['table_params']:>14,}  {_pm(row)}")
    print(f"written: {r['csv']}")


def cmd_ablations(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.ablations import ablation_sweep

    runs = ablation_sweep(Path(args.out), seeds=_seeds(args), steps=args.steps, data=args.data, branches=args.branches,
                          progress=not args.quiet, device=args.device)  # fmt: skip
    return {"rows": _summary(runs, "variant"), "csv": str(Path(args.out) / "ablations.csv")}


def _print_ablations(r: dict[str, Any]) -> None:
    for row in r["rows"]:
        print(f"{row['variant']:<16}{_pm(row):>22}")
    print(f"written: {r['csv']}")


def cmd_duration(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.duration import duration_study, gaps

    runs = duration_study(Path(args.out), data=args.data, seeds=_seeds(args), base_steps=args.steps,
                          branches=args.branches, progress=not args.quiet, device=args.device)  # fmt: skip
    out = []
    for variant in ("engram", "capacity1"):
        for g in gaps(runs, variant):
            out.append({"variant": variant, "multiple": g["multiple"], "epochs": g["epochs"], "gap": g["gap"].mean,
                        "gap_se": g["gap"].se, "seeds": g["gap"].n, "verdict": g["verdict"]})  # fmt: skip
    return {"gaps": out, "csv": str(Path(args.out) / "duration.csv"), "png": str(Path(args.out) / "duration.png")}


def _print_duration(r: dict[str, Any]) -> None:
    print(f"{'variant':<10}{'x':>3}{'epochs':>8}  gap vs MoE (mean ± SE)   verdict")
    for g in r["gaps"]:
        print(f"{g['variant']:<10}{g['multiple']:>3}{g['epochs']:>8.2f}  {g['gap']:+.4f} ± {g['gap_se']:.4f}"
              f"{'':>6}{g['verdict']}")  # fmt: skip
    print(f"written: {r['csv']}, {r['png']}")


def cmd_regime(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.regime import REGIME_EPOCHS, regime_corpora, regime_section, regime_sweep

    corpora = regime_corpora(args.novels)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(label.startswith(w) for label in corpora)]
        if unknown:
            raise ValueError(f"--only {','.join(unknown)}: no such corpus; choose from {', '.join(corpora)} (their first word)")
        corpora = {label: data for label, data in corpora.items() if any(label.startswith(w) for w in wanted)}
    for data in args.data or []:
        corpora[Path(data).name or data] = data
    candidates = tuple(c.strip() for c in (args.candidates or "").split(",") if c.strip())
    runs = regime_sweep(Path(args.out), seeds=_seeds(args), corpora=corpora, candidates=candidates,
                        epochs=tuple(args.epochs or REGIME_EPOCHS), progress=not args.quiet, device=args.device)  # fmt: skip
    verdicts, lines = regime_section(runs)
    return {"verdicts": [{"claim": v[0], "verdict": v[1], "regime": v[2], "numbers": v[3]} for v in verdicts],
            "table": lines, "csv": str(Path(args.out) / "regime.csv"), "png": str(Path(args.out) / "regime.png")}  # fmt: skip


def _print_regime(r: dict[str, Any]) -> None:
    print("\n".join(r["table"]))
    for v in r["verdicts"]:
        print(f"{v['claim']}: {v['verdict']} ({v['numbers']})")
    print(f"written: {r['csv']}, {r['png']}")


def cmd_retrofit_experiment(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from engram_lm.experiments.retrofit import METHODS, RetrofitSettings, retrofit_section, retrofit_sweep
    except ImportError as err:
        raise ValueError(f"engram experiment retrofit needs transformers and peft ({err}); install the extra: "
                         "pip install 'engram-lm[hf]'") from None  # fmt: skip
    methods = METHODS
    if args.methods:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(names) - {m.name for m in METHODS})
        if unknown:
            raise ValueError(f"--methods {','.join(unknown)}: no such method; choose from {', '.join(m.name for m in METHODS)}")
        methods = tuple(m for m in METHODS if m.name in names)
    for flag, value in (("--threads", args.threads), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: give 1 or more")
    settings = RetrofitSettings(**({"steps": args.steps} if args.steps is not None else {}), threads=args.threads)
    runs = retrofit_sweep(Path(args.out), seeds=_seeds(args), methods=methods, settings=settings, progress=not args.quiet)
    verdicts, lines = retrofit_section(runs)
    return {"verdicts": [{"claim": v[0], "verdict": v[1], "regime": v[2], "numbers": v[3]} for v in verdicts],
            "table": lines}  # fmt: skip


def _print_section(r: dict[str, Any]) -> None:
    print("\n".join(r["table"]))
    for v in r["verdicts"]:
        print(f"{v['claim']}: {v['verdict']} ({v['numbers']})")


def cmd_study(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.study import SECTIONS, run_study, run_study_in_workers

    sections = args.sections.split(",") if args.sections else SECTIONS
    report = None if args.plan or not args.report else Path(args.report)
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give 1 or more (one per free CPU core, or 1 on a GPU)")
    if args.workers > 1 and not args.plan:
        return run_study_in_workers(Path(args.out), workers=args.workers, seeds=args.seeds, long_data=args.long_data,
                                    sections=sections if args.sections else None, device=args.device,
                                    report=report)  # fmt: skip
    return run_study(Path(args.out), seeds=args.seeds, long_data=args.long_data, sections=sections,
                     device=args.device, progress=not args.quiet, dry_run=args.plan, report=report)  # fmt: skip


def _print_study(r: dict[str, Any]) -> None:
    print(f"{r['finished']} of {r['planned']} planned runs finished")


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.report import build_report
    from engram_lm.experiments.study import write_study_outputs

    root = Path(args.runs)
    if not root.is_dir():
        raise ValueError(f"--runs {root} is not a folder; give the study's --out folder (results/study)")
    if not any(root.glob("*/**/result.json")):
        raise ValueError(f"--runs {root} holds no finished run (no */result.json): give the study's --out folder "
                         f"(results/study); {args.out} was not touched")  # fmt: skip
    write_study_outputs(root)  # per-section CSV, JSON and figure from every finished run
    text = build_report(root, Path(args.out))
    return {"path": args.out, "chars": len(text)}


def cmd_gates(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from engram_lm.analysis.gates import gate_values, gates_html, gates_png
    from engram_lm.inference.loading import load_trained

    model, state = load_trained(args.checkpoint)
    tokenizer = Tokenizer.from_file(str(Path(state["path"]) / "tokenizer.json"))
    tokens, rows = gate_values(model, tokenizer, args.text)
    out = Path(args.out)
    out.with_suffix(".html").write_text(gates_html(tokens, rows, f"Engram gates: {state['path']}"), encoding="utf-8")
    gates_png(tokens, rows, out.with_suffix(".png"))
    return {"tokens": tokens, "gates": rows, "html": str(out.with_suffix(".html")), "png": str(out.with_suffix(".png"))}


def _print_gates(r: dict[str, Any]) -> None:
    for name, values in r["gates"].items():
        print(name + ": " + " ".join(f"{t.strip() or repr(t)}({g:.2f})" for t, g in zip(r["tokens"], values)))
    print(f"written: {r['html']}, {r['png']}")


def cmd_sensitivity(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from tokenizers import Tokenizer

    from engram_lm.analysis.sensitivity import sensitivity
    from engram_lm.inference.loading import load_trained

    model, state = load_trained(args.checkpoint)
    tokenizer = Tokenizer.from_file(str(Path(state["path"]) / "tokenizer.json"))
    result = {"checkpoint": state["path"], **sensitivity(model, tokenizer)}
    if args.token_classes:
        from engram_lm.experiments.sensitivity import token_class_analysis
        from engram_lm.training.config import TrainConfig

        config = Path(state["path"]).parent.parent / "config.json"  # run/checkpoints/step-N -> run/config.json
        if not config.is_file():
            raise ValueError(f"--token-classes needs the run's config.json (its data and evaluation windows); "
                             f"{config} is missing: pass a checkpoint inside a run folder made by `engram train`")  # fmt: skip
        train_cfg = TrainConfig.from_dict(json.loads(config.read_text())["requested"]["train"])
        result["token_classes"] = token_class_analysis(train_cfg, Path(state["path"]))["classes"]
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def _print_sensitivity(r: dict[str, Any]) -> None:
    for name in ("factual", "copy"):
        p = r[name]
        print(f"{name:<8} accuracy {p['with_engram']['accuracy']:.3f} -> {p['engram_zeroed']['accuracy']:.3f} "
              f"with Engram zeroed (retained {p['retained_accuracy']:.1%}); log-prob "
              f"{p['with_engram']['mean_logprob']:.3f} -> {p['engram_zeroed']['mean_logprob']:.3f}")  # fmt: skip
    for name, c in r.get("token_classes", {}).items():
        print(f"{name:<10} {c['tokens']:>6} next tokens: accuracy {c['accuracy_with_engram']:.3f} -> "
              f"{c['accuracy_engram_zeroed']:.3f} with Engram zeroed (kept {c['retained_accuracy']:.1%})")  # fmt: skip


def cmd_logit_lens(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.analysis.compare import logit_lens_compare

    return logit_lens_compare(Path(args.checkpoint), Path(args.baseline), Path(args.out))


def _print_logit_lens(r: dict[str, Any]) -> None:
    for name, curve in r["curves"].items():
        print(f"{name:<9}" + " ".join(f"{v:7.3f}" for v in curve))
    print(f"written: {r['csv']}, {r['png']}")


def cmd_cka(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.analysis.compare import cka_compare

    return cka_compare(Path(args.checkpoint), Path(args.baseline), Path(args.out), top_k=args.top_k)


def _print_cka(r: dict[str, Any]) -> None:
    for i, (row, a) in enumerate(zip(r["cka"], r["soft_alignment_index"])):
        print(f"layer {i}: " + " ".join(f"{v:.3f}" for v in row) + f"   soft alignment index {a:.2f}")
    print(f"written: {r['csv']}")


def add_analysis_commands(sub) -> None:
    _add_experiment_commands(sub)
    _add_study_command(sub)
    _add_analyze_commands(sub)


def _experiment_flags(e, name: str, data_help: str = "built-in corpus name or a path (default: bible)") -> None:
    """The flags every `engram experiment` sweep takes."""
    e.add_argument("--seeds", type=int, default=1, help="train every point with seeds 0..K-1 (report: mean ± SE)")
    e.add_argument("--steps", type=int, help="training steps of every run (default: the experiment's own)")
    e.add_argument("--data", help=data_help)
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--out", default=f"runs/{name}", help="folder for the runs and the section's outputs")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", action="store_true")


def _add_experiment_commands(sub) -> None:
    p = sub.add_parser("experiment", help="paper experiments at laptop scale")
    exp = p.add_subparsers(dest="experiment", required=True)
    common = _experiment_flags
    e = exp.add_parser("allocation", help="sparsity allocation sweep over rho at fixed P_tot and P_act")
    e.add_argument("--preset", default="quickstart", help="the model size the budgets are taken from")
    e.add_argument("--rhos", type=float_list, default=[0.0, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 1.0],
                   help="shares of the sparse budget left to the routed experts (1: the pure MoE)")
    common(e, "allocation")
    e.set_defaults(run=cmd_allocation, show=_print_allocation)
    e = exp.add_parser("scaling", help="fixed backbone: Engram vs OverEncoding at equal table parameters")
    e.add_argument("--budgets", type=int_list, help="table parameters per point (default 2^19 .. 2^23)")
    common(e, "scaling")
    e.set_defaults(run=cmd_scaling, show=_print_scaling)
    e = exp.add_parser("ablations", help="remove one Engram piece at a time")
    e.add_argument("--branches", type=int, default=1,
                   help="residual branches (mHC; the paper uses 4); above 1 adds the variant no_branch_fusion")
    common(e, "ablations")
    e.set_defaults(run=cmd_ablations, show=_print_ablations)
    e = exp.add_parser("duration", help="MoE vs MoE+Engram vs capacity-1 trained to 1x..8x the quickstart's tokens")
    e.add_argument("--branches", type=int, default=1, help="residual branches (mHC); the paper uses 4")
    common(e, "duration", "a corpus that does not repeat within 8x (a folder), or bible to see repetition")
    e.set_defaults(run=cmd_duration, show=_print_duration, data="bible")

    e = exp.add_parser("regime", help="MoE vs MoE+Engram (default table decay) at about 1, 2.5 and 4 epochs of several corpora")
    e.add_argument("--seeds", type=int, default=1, help="train every point with seeds 0..K-1 (report: mean ± SE)")
    e.add_argument("--novels", help="a folder of long texts to slice too (e.g. ../shared/data/gutenberg-novels)")
    e.add_argument("--data", action="append", help="another corpus, whole (repeatable; a slice: first:N:CORPUS)")
    e.add_argument("--only", help="comma-separated corpora to train, by their first word: python-stdlib, novels, bible")
    e.add_argument("--candidates", help="comma-separated regularisers of the study to try in the default's place "
                                        "(e.g. row_dropout_0.5,table_wd_30.0)")
    e.add_argument("--epochs", type=float_list, help="lengths in epochs (default 1,2.5,4)")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--out", default="runs/regime", help="folder for the runs and the section's outputs")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(run=cmd_regime, show=_print_regime)

    e = exp.add_parser("retrofit", help="adapt a locally pretrained Llama: frozen, Engram, LoRA 8/64, LoRA+Engram, full "
                                        "fine-tuning (held-out loss, facts, forgetting, cost)")  # fmt: skip
    e.add_argument("--seeds", type=int, default=3, help="train every method with seeds 0..K-1 (report: mean ± SE)")
    e.add_argument("--steps", type=int, help="fine-tuning steps (default 400)")
    e.add_argument("--methods", help="comma-separated subset of: frozen, engram, lora8, lora64, lora8+engram, full")
    e.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: s/step comparable)")
    e.add_argument("--out", default="results/study", help="runs go to OUT/retrofit/ (the base model to OUT/retrofit/base)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(run=cmd_retrofit_experiment, show=_print_section)

    e = exp.add_parser("report", help="write docs/results.md from the study's result folders")
    e.add_argument("--runs", default="results/study", help="the study's --out folder")
    e.add_argument("--out", default="docs/results.md", help="the page to write (its figures go beside it, in figures/)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(run=cmd_report, show=lambda r: print(f"written: {r['path']}"))


def _add_study_command(sub) -> None:
    p = sub.add_parser("study", help="every experiment with seeds and error bars, resumable, then docs/results.md")
    p.add_argument("--seeds", type=int, default=3, help="train every run with seeds 0..K-1 (report: mean ± SE)")
    p.add_argument("--long-data", help="a corpus that does not repeat within 8x the quickstart (a folder of text)")
    p.add_argument("--sections", help="comma-separated subset, in plan order (default: all)")
    p.add_argument("--out", default="results/study", help="folder for every run (a finished run is reused)")
    p.add_argument("--report", default="docs/results.md", help="the page to write at the end ('' to skip)")
    p.add_argument("--workers", type=int, default=1,
                   help="N processes of one thread each on the same --out (CPU: one per free core); logs in OUT/worker-K.log")
    p.add_argument("--plan", action="store_true", help="print the plan and the time estimate, train nothing")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_study, show=_print_study)


def _add_analyze_commands(sub) -> None:
    p = sub.add_parser("analyze", help="look inside trained models")
    ana = p.add_subparsers(dest="analysis", required=True)
    a = ana.add_parser("gates", help="tokens coloured by Engram gate value (HTML + PNG)")
    a.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (newest checkpoint)")
    a.add_argument("--text", required=True, help="the text whose tokens are coloured")
    a.add_argument("--out", default="gates.html", help="the HTML page (the PNG goes beside it)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(run=cmd_gates, show=_print_gates)
    a = ana.add_parser("sensitivity", help="factual recall vs in-context copying with Engram zeroed")
    a.add_argument("--checkpoint", required=True, help="ideally trained with --data bible+facts")
    a.add_argument("--out", default="sensitivity.json", help="where the scores are written")
    a.add_argument("--token-classes", action="store_true",
                   help="also score copyable vs recallable next tokens on the run's evaluation windows (docs/experiments.md)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(run=cmd_sensitivity, show=_print_sensitivity)
    for name, run, show, helptext in (("logit-lens", cmd_logit_lens, _print_logit_lens, "KL of early exits to the final prediction"),
                                      ("cka", cmd_cka, _print_cka, "linear CKA between two models' layers")):  # fmt: skip
        a = ana.add_parser(name, help=helptext)
        a.add_argument("--checkpoint", required=True, help="the Engram model")
        a.add_argument("--baseline", required=True, help="the baseline model")
        a.add_argument("--out", default=name, help="folder for the figure and its numbers")
        if name == "cka":
            a.add_argument("--top-k", type=int, default=5, help="layers averaged in the soft alignment index (paper: 5)")
        a.add_argument("--json", action="store_true")
        a.set_defaults(run=run, show=show)
