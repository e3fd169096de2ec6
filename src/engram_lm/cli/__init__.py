"""The `engram` command. Thin: parses flags, calls typed functions, prints text or JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from engram_lm.cli.analysis import add_analysis_commands
from engram_lm.cli.bench import add_bench_commands
from engram_lm.cli.core import add_core_commands
from engram_lm.cli.model import add_model_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Engram conditional memory for language models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_core_commands(sub)
    add_model_commands(sub)
    add_bench_commands(sub)
    add_analysis_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"engram {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    if args.json:
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        args.show(result)
    return 0
