"""Argument types shared by the subcommands: comma-separated lists with a clear error."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """'1,15' -> [1, 15]; counts may be written 1e6."""
    try:
        return [int(float(x)) if "e" in x.lower() else int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
