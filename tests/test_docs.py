"""The README and docs agree with the code and with each other: every `engram` command they
show parses as written, and the study's figures they quote are the generated page's."""

import re
import shlex
from pathlib import Path

import pytest

from engram_lm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(path: Path) -> list[str]:
    """`engram ...` lines inside the file's shell blocks (``` or ```bash; a trailing # comment removed)."""
    commands, block = [], None
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            block = line.strip()[3:] if block is None else None
            continue
        text = line.split(" && ")[-1].strip()
        if block in ("", "bash", "sh", "shell", "console") and text.startswith("engram "):
            commands.append(re.split(r"\s+#\s", text)[0])
    return commands


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_engram_command_the_docs_show_parses_as_written(path):
    for command in shown_commands(path):
        try:
            args = shlex.split(command)[1:]
            if args[0] == "lm-eval":  # lm-eval's own flags (engram lm-eval hands them over as they are)
                lm_eval_cli = pytest.importorskip("lm_eval._cli.harness")
                lm_eval_cli.HarnessCLI()._parser.parse_args(["run", *args[1:]])
            else:
                build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{path.name}: `{command}` does not parse (copy it and run it: argparse refuses it)")


def test_the_readme_shows_commands():
    assert len(shown_commands(ROOT / "README.md")) >= 20


def _page_figures() -> tuple[int, int]:
    page = (ROOT / "docs" / "results.md").read_text()
    rows = int(re.search(r"The verdict table below has (\d+) rows", page).group(1))
    runs = int(re.search(r"from (\d+) finished runs under", page).group(1))
    return rows, runs


def test_the_readme_quotes_the_results_pages_verdict_and_run_counts():
    rows, runs = _page_figures()
    quoted = re.findall(r"(\d+) verdicts from (\d+) (?:trained|finished) runs", (ROOT / "README.md").read_text())
    assert quoted and all((int(v), int(r)) == (rows, runs) for v, r in quoted), (quoted, rows, runs)


def test_the_results_page_counts_the_committed_runs():
    from engram_lm.experiments.report import load_results, trained_runs

    assert _page_figures()[1] == trained_runs(load_results(ROOT / "results" / "study"))  # regenerate with `engram experiment report` when runs are added
