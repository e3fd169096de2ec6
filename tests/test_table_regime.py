"""The table regulariser a run takes from how often it reads its data (training/regime.py)."""

import json
from pathlib import Path

import pytest

from engram_lm.checkpoint import store as ckpt_io
from engram_lm.recipes import paper_optimiser, tiny
from engram_lm.training import loop
from engram_lm.training.data import prepare_data
from engram_lm.training.regime import TableRegime, choose_table_regime, planned_epochs


def test_the_choice_by_hand():
    # the quickstart on the Bible: 400 steps x 2048 tokens of ~950k training tokens
    assert planned_epochs(400, 2048, 950_000) == pytest.approx(0.8623, abs=1e-4)
    assert choose_table_regime(0.86, None, 0.0) == TableRegime(0.86, 10.0, 0.0, "single-epoch")
    assert choose_table_regime(1.0, None, 0.0).chosen == "single-epoch"  # exactly once still repeats nothing
    assert choose_table_regime(2.5, None, 0.0) == TableRegime(2.5, 0.0, 0.7, "repeated data")
    assert choose_table_regime(4.0, None, 0.3) == TableRegime(4.0, 0.0, 0.3, "repeated data")  # the model's own dropout
    assert choose_table_regime(4.0, 30.0, 0.0) == TableRegime(4.0, 30.0, 0.0, "set")  # a named decay is used as named
    assert choose_table_regime(4.0, 0.0, 0.0).chosen == "set"  # the paper's optimiser is never switched
    with pytest.raises(ValueError, match="training split is empty"):
        planned_epochs(10, 2048, 0)


def _docs(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(24):
        (folder / f"{i:02d}.txt").write_text(f"chapter {i} " * 40 + "and so the story goes on.\n")
    return str(folder)


@pytest.fixture
def optimiser_configs(monkeypatch):
    """The OptimConfig each run builds its optimizers with."""
    seen = []
    original = loop.build_optimizers

    def spy(model, cfg):
        seen.append(cfg)
        return original(model, cfg)

    monkeypatch.setattr(loop, "build_optimizers", spy)
    return seen


def test_a_run_that_repeats_its_data_drops_rows_instead_of_decaying_them_and_keeps_that_when_extended(
        tmp_path, optimiser_configs):  # fmt: skip
    model, cfg = tiny()
    cfg = cfg.with_(data=_docs(tmp_path / "docs"), steps=6, eval_every=6, save_every=6)
    train_tokens = len(prepare_data(cfg.data, cfg.tokenizer).train)
    epochs = 6 * 8 * 64 / train_tokens
    assert epochs > 1  # the precondition: this run reads its corpus more than once
    run = tmp_path / "run"
    loop.train(model, cfg, run, progress=False)
    recorded = json.loads((run / "config.json").read_text())["table_regime"]
    assert recorded == {"planned_epochs": pytest.approx(epochs), "table_weight_decay": 0.0, "row_dropout": 0.7,
                        "chosen": "repeated data"}  # fmt: skip
    assert optimiser_configs[-1].table_weight_decay == 0.0
    state = ckpt_io.read_state(ckpt_io.latest_checkpoint(run))
    assert state["model_config"]["engram"]["row_dropout"] == 0.7 and state["table_regime"] == recorded
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["event"] == "table_regime" and first["chosen"] == "repeated data"
    assert json.loads((run / "config.json").read_text())["requested"]["train"]["table_weight_decay"] is None

    loop.train(model, cfg.with_(steps=12), run, progress=False)  # extended: twice the epochs, the same choice
    assert json.loads((run / "config.json").read_text())["table_regime"] == recorded
    assert optimiser_configs[-1].table_weight_decay == 0.0
    events = [json.loads(x).get("event") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("table_regime") == 1 and "steps_changed" in events


def test_a_single_epoch_run_decays_its_tables_and_a_named_decay_is_kept(tmp_path, optimiser_configs):
    model, cfg = tiny()
    cfg = cfg.with_(steps=2, eval_every=2)  # the built-in Bible: 2 x 512 tokens of ~950k
    loop.train(model, cfg, tmp_path / "once", progress=False)
    once = json.loads((tmp_path / "once" / "config.json").read_text())["table_regime"]
    assert once["chosen"] == "single-epoch" and once["table_weight_decay"] == 10.0 and once["row_dropout"] == 0.0
    assert optimiser_configs[-1].table_weight_decay == 10.0
    loop.train(model, paper_optimiser(cfg.with_(data=_docs(tmp_path / "docs"), steps=6, eval_every=6)),
               tmp_path / "paper", progress=False)  # fmt: skip
    paper = json.loads((tmp_path / "paper" / "config.json").read_text())["table_regime"]
    assert paper["chosen"] == "set" and paper["table_weight_decay"] == 0.0 and paper["row_dropout"] == 0.0
    assert optimiser_configs[-1].table_weight_decay == 0.0
