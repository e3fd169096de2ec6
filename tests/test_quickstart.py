"""`engram quickstart`: the steps it chooses for a corpus, and the regime it reports (no timing)."""

import json

import pytest

from engram_lm.experiments.quickstart import format_table, plan_steps, regime, regime_summary, steps_line

PER_STEP = 16 * 128  # the quickstart's tokens per step


def test_the_default_steps_stay_when_they_read_the_corpus_at_most_once():
    # the built-in Bible: ~950k training tokens, 400 x 2048 = 819,200 of them: 0.86 epochs
    assert plan_steps(950_000, PER_STEP, 400) == (400, "default")
    assert plan_steps(400 * PER_STEP, PER_STEP, 400) == (400, "default")  # exactly one epoch still reads nothing twice


def test_a_corpus_the_default_would_repeat_gets_one_epoch_and_steps_override():
    # 320,000 tokens (the corpus): 400 steps read it 2.56 times; one epoch is 320,000 // 2048 = 156 steps
    assert plan_steps(320_000, PER_STEP, 400) == (156, "one epoch")
    assert plan_steps(1_000, PER_STEP, 400) == (1, "one epoch")  # smaller than one step: one step, not zero
    assert plan_steps(320_000, PER_STEP, 400, steps=400) == (400, "--steps")  # the user's choice, even if it repeats


def test_the_line_before_training_names_the_repetition_and_the_steps_chosen():
    line = steps_line("docs/", 320_000, PER_STEP, 400, 156, "one epoch")
    assert "'docs/' has 320,000 training tokens: the default 400 steps would read it 2.56 times" in line
    assert "training 156 steps (single-epoch (1.00 epochs)) instead. Pass --steps 400" in line
    forced = steps_line("docs/", 320_000, PER_STEP, 400, 400, "--steps")
    assert forced.startswith("--steps 400 reads 'docs/' (320,000 training tokens) 2.56 times: a repeated-data result")
    assert steps_line("bible", 950_000, PER_STEP, 400, 400, "default") is None  # nothing repeats: nothing to say
    assert steps_line("docs/", 320_000, PER_STEP, 400, 100, "--steps") is None  # the user's steps do not repeat it


def test_the_summary_states_the_real_regime_never_a_fixed_string():
    assert regime(0.96) == "single-epoch (0.96 epochs)" and regime(1.0) == "single-epoch (1.00 epochs)"
    assert regime(2.57) == "repeated data (2.57 epochs)"
    once = regime_summary("docs/", 0.998, 156, "one epoch")
    assert once.startswith("Regime: single-epoch (1.00 epochs) of 'docs/'; 156 steps, one epoch of the corpus")
    twice = regime_summary("docs/", 2.57, 400, "--steps")
    assert twice.startswith("Regime: repeated data (2.57 epochs) of 'docs/'; 400 steps, set by --steps.")
    assert "single-epoch" not in twice.split(".")[0]
    run = {"name": "moe", "params_total": 1, "params_active": 1, "params_engram": 0, "val_loss": 5.0, "tokens_seen": 1,
           "tokens_per_s": 1.0, "epochs": 2.57}
    table = format_table({"runs": [run, {**run, "name": "moe+engram"}], "engram_gain_nats": 0.0, "params_total_gap": 0.0,
                          "params_active_gap": 0.0, "rho": 0.75, "data": "docs/", "steps": 400, "steps_chosen_by": "--steps"})
    assert table.splitlines()[-1] == twice


@pytest.mark.slow
def test_quickstart_on_a_small_corpus_trains_one_epoch_and_records_who_chose_it(tmp_path, capsys):
    from engram_lm.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):  # ~40 x 150 words: a few quickstart steps' worth of tokens
        (docs / f"{i:02d}.txt").write_text(" ".join(f"word{(i * 7 + k) % 300} is here." for k in range(50)))
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--data", str(docs), "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["steps_chosen_by"] == "one epoch" and summary["steps"] == summary["train_tokens"] // PER_STEP
    assert summary["regime"] == "single-epoch" and summary["epochs"] <= 1.0
    assert "would read it" in captured.err and f"training {summary['steps']} steps" in captured.err
