"""Slow end-to-end checks: `python -m pytest -q -m slow`."""

import json

import pytest

from engram_lm.cli import main


@pytest.mark.slow
def test_quickstart_command_writes_summary_and_plot(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path), "--steps", "10", "--quiet"]) == 0
    assert "Engram gain" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["moe", "moe+engram"]
    for run in summary["runs"]:
        assert {"name", "params_total", "params_active", "params_engram", "val_loss", "tokens_seen", "tokens_per_s"} <= set(run)
    assert abs(summary["params_total_gap"]) < 0.02 and abs(summary["params_active_gap"]) < 0.02
    assert summary["runs"][0]["tokens_seen"] == summary["runs"][1]["tokens_seen"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_gutenberg_folder_as_user_data(tmp_path):
    from pathlib import Path

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg-novels"
    if not corpus.is_dir():
        pytest.skip("../shared/data/gutenberg-novels is not present (it exists in this project's CI, not for users)")
    folder = tmp_path / "novels"
    folder.mkdir()
    for book in sorted(corpus.glob("*.txt"))[:12]:
        (folder / book.name).write_text(book.read_text(encoding="utf-8", errors="replace"))
    assert main(["train", "--preset", "tiny", "--data", str(folder), "--steps", "3", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "run" / "metrics.jsonl").exists()
