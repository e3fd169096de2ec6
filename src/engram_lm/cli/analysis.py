"""`engram experiment ...` and `engram analyze ...`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engram_lm.cli.args import float_list, int_list


def cmd_allocation(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.allocation import allocation_sweep

    rows = allocation_sweep(Path(args.out), preset=args.preset, rhos=args.rhos, steps=args.steps, data=args.data,
                            progress=not args.quiet)  # fmt: skip
    return {"rows": rows, "csv": str(Path(args.out) / "allocation.csv"), "png": str(Path(args.out) / "allocation.png")}


def _print_allocation(r: dict[str, Any]) -> None:
    print(f"{'rho':>5}{'experts':>9}{'slots':>9}{'P_tot':>11}{'P_act':>10}{'val loss':>10}")
    for row in r["rows"]:
        print(f"{row['rho']:>5.2f}{row['num_routed_experts']:>9}{row['engram_slots']:>9,}{row['params_total']:>11,}"
              f"{row['params_active']:>10,}{row['val_loss']:>10.4f}")  # fmt: skip
    print(f"written: {r['csv']}, {r['png']}")


def cmd_scaling(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.variants import SCALING_SLOTS, scaling_sweep

    rows = scaling_sweep(Path(args.out), slots=args.slots or SCALING_SLOTS, steps=args.steps, progress=not args.quiet)
    return {"rows": rows, "csv": str(Path(args.out) / "scaling.csv")}


def _print_scaling(r: dict[str, Any]) -> None:
    print(f"{'slots':>9}{'Engram':>10}{'OverEnc.':>10}")
    for row in r["rows"]:
        print(f"{row['slots']:>9,}{row['engram_val_loss']:>10.4f}{row['overencoding_val_loss']:>10.4f}")
    print(f"written: {r['csv']}")


def cmd_ablations(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.variants import ablation_sweep

    rows = ablation_sweep(Path(args.out), steps=args.steps, progress=not args.quiet)
    return {"rows": rows, "csv": str(Path(args.out) / "ablations.csv")}


def _print_ablations(r: dict[str, Any]) -> None:
    for row in r["rows"]:
        print(f"{row['variant']:<16}{row['val_loss']:>9.4f}{row['delta_vs_reference']:>+9.4f}")
    print(f"written: {r['csv']}")


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.report import build_report

    text = build_report(Path(args.runs), Path(args.out))
    return {"path": args.out, "chars": len(text)}


def cmd_gates(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from engram_lm.analysis.gates import gate_values, gates_html, gates_png
    from engram_lm.training.loop import load_trained

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
    from engram_lm.training.loop import load_trained

    model, state = load_trained(args.checkpoint)
    tokenizer = Tokenizer.from_file(str(Path(state["path"]) / "tokenizer.json"))
    result = {"checkpoint": state["path"], **sensitivity(model, tokenizer)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def _print_sensitivity(r: dict[str, Any]) -> None:
    for name in ("factual", "copy"):
        p = r[name]
        print(f"{name:<8} accuracy {p['with_engram']['accuracy']:.3f} -> {p['engram_zeroed']['accuracy']:.3f} "
              f"with Engram zeroed (retained {p['retained_accuracy']:.1%}); log-prob "
              f"{p['with_engram']['mean_logprob']:.3f} -> {p['engram_zeroed']['mean_logprob']:.3f}")  # fmt: skip


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
    p = sub.add_parser("experiment", help="paper experiments at laptop scale")
    exp = p.add_subparsers(dest="experiment", required=True)
    e = exp.add_parser("allocation", help="sparsity allocation sweep over rho at fixed P_tot and P_act")
    e.add_argument("--preset", default="quickstart")
    e.add_argument("--rhos", type=float_list, default=[0.4, 0.55, 0.7, 0.8, 0.9, 1.0])
    e.add_argument("--steps", type=int)
    e.add_argument("--data")
    e.add_argument("--out", default="runs/allocation")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(run=cmd_allocation, show=_print_allocation)

    for name, run, show, helptext in (("scaling", cmd_scaling, _print_scaling, "fixed backbone, Engram vs OverEncoding over slot counts"),
                                      ("ablations", cmd_ablations, _print_ablations, "remove one Engram piece at a time")):  # fmt: skip
        e = exp.add_parser(name, help=helptext)
        if name == "scaling":
            e.add_argument("--slots", type=int_list)
        e.add_argument("--steps", type=int)
        e.add_argument("--out", default=f"runs/{name}")
        e.add_argument("--quiet", action="store_true")
        e.add_argument("--json", action="store_true")
        e.set_defaults(run=run, show=show)

    e = exp.add_parser("report", help="write docs/results.md from the experiments' result folders")
    e.add_argument("--runs", default="runs")
    e.add_argument("--out", default="docs/results.md")
    e.add_argument("--json", action="store_true")
    e.set_defaults(run=cmd_report, show=lambda r: print(f"written: {r['path']}"))

    p = sub.add_parser("analyze", help="look inside trained models")
    ana = p.add_subparsers(dest="analysis", required=True)
    a = ana.add_parser("gates", help="tokens coloured by Engram gate value (HTML + PNG)")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--text", required=True)
    a.add_argument("--out", default="gates.html")
    a.add_argument("--json", action="store_true")
    a.set_defaults(run=cmd_gates, show=_print_gates)
    a = ana.add_parser("sensitivity", help="factual recall vs in-context copying with Engram zeroed")
    a.add_argument("--checkpoint", required=True, help="ideally trained with --data bible+facts")
    a.add_argument("--out", default="sensitivity.json")
    a.add_argument("--json", action="store_true")
    a.set_defaults(run=cmd_sensitivity, show=_print_sensitivity)
    for name, run, show, helptext in (("logit-lens", cmd_logit_lens, _print_logit_lens, "KL of early exits to the final prediction"),
                                      ("cka", cmd_cka, _print_cka, "linear CKA between two models' layers")):  # fmt: skip
        a = ana.add_parser(name, help=helptext)
        a.add_argument("--checkpoint", required=True, help="the Engram model")
        a.add_argument("--baseline", required=True, help="the baseline model")
        a.add_argument("--out", default=name)
        if name == "cka":
            a.add_argument("--top-k", type=int, default=5, help="layers averaged in the soft alignment index (paper: 5)")
        a.add_argument("--json", action="store_true")
        a.set_defaults(run=run, show=show)
