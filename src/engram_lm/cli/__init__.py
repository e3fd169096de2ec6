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


def os_error_line(exc: OSError) -> str:
    """One line for a file system error: what is wrong with which path, and the fix for that cause."""
    import errno

    path = getattr(exc, "filename", None) or "a file"
    fixes = {
        errno.ENOSPC: "no space left on the device: free space or choose a folder on another disk (--out, "
                      "$ENGRAM_CACHE_DIR)",
        errno.EDQUOT: "the disk quota is used up: free space or choose another folder (--out, $ENGRAM_CACHE_DIR)",
        errno.EACCES: "permission denied: choose a folder you may read and write, or change its permissions",
        errno.EPERM: "operation not permitted: choose a folder you may read and write",
        errno.EROFS: "the file system is read-only: choose a writable folder (--out, $ENGRAM_CACHE_DIR)",
        errno.ELOOP: "a symbolic link that leads back to itself: fix or remove the link",
        errno.EISDIR: "is a folder where a file is expected: give the file inside it",
        errno.ENOTDIR: "is a file where a folder is expected: give a folder, or move the file",
        errno.EEXIST: "is a file where a folder is expected: give a folder, or move the file",
        errno.ENOENT: "does not exist: check the path",
    }  # fmt: skip
    fix = fixes.get(exc.errno, f"{exc.strerror or exc}: check the path and the disk")
    return f"{path}: {fix}; nothing already saved was changed"


COMMON_HELP = {"--json": "print the result as JSON", "--quiet": "no progress line"}


class _DefaultsShown(argparse.HelpFormatter):
    """Help that ends with the flag's default, where it has one worth saying and does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS  # 0 is a value
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every command and subcommand: defaults shown, and --json / --quiet explained in one place."""
    parser.formatter_class = _DefaultsShown
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _finish(sub)
        elif not action.help and action.option_strings and action.option_strings[-1] in COMMON_HELP:
            action.help = COMMON_HELP[action.option_strings[-1]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Engram conditional memory for language models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_core_commands(sub)
    add_model_commands(sub)
    add_bench_commands(sub)
    add_analysis_commands(sub)
    _finish(parser)
    return parser


def lm_eval_main(argv: Sequence[str]) -> int:
    """`engram lm-eval ...`: lm-eval's own command line, with the model "engram-lm" registered first."""
    try:
        import engram_lm.inference.harness  # noqa: F401  (registers "engram-lm")
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        print(f"engram lm-eval: error: needs lm-eval ({err}); install the extra: pip install 'engram-lm[eval]'",
              file=sys.stderr)  # fmt: skip
        return 2
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as exc:
        print(f"engram lm-eval: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # a hub task's data, offline
        print(f"engram lm-eval: error: {exc}: the task's data comes from the Hugging Face hub; run it once where the hub "
              "is reachable (later runs read the datasets cache, HF_DATASETS_OFFLINE=1), or write a task YAML over local "
              "files and pass its folder with --include_path (docs/model.md)", file=sys.stderr)  # fmt: skip
        return 2
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # its flags are lm-eval's: handed over as they are
        return lm_eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"engram {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only folder, a link loop...: the path, the cause and its own fix
        print(f"engram {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ in ("TrainingInterrupted", "StudyStopped"):
            print(f"engram {args.command}: {exc}", file=sys.stderr)
            return 130
        if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
            print(f"engram {args.command}: error: out of memory ({exc}); use a smaller --set batch_size, table "
                  "sizes or preset, or --memory mmap for inference", file=sys.stderr)  # fmt: skip
            return 2
        raise
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    try:
        if args.json:
            json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
            print()
        else:
            args.show(result)
        sys.stdout.flush()
    except BrokenPipeError:  # `engram ... --json | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
