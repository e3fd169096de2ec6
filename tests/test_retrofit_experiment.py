"""`engram experiment retrofit` (experiments/retrofit.py) and its fact probes (experiments/knowledge.py)."""

import math

import pytest
import torch

from engram_lm.experiments.knowledge import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, Fact, country_facts, probes, score_probes

transformers = pytest.importorskip("transformers")


def _tokenizer():
    from engram_lm.training.data import prepare_data

    return prepare_data("bible", "bpe:4096").tokenizer


def test_facts_and_probes_put_the_answer_at_the_end():
    facts = country_facts()
    france = {f.relation: f.answer for f in facts if f.country == "France"}
    assert france == {"capital": "Paris", "region": "Western Europe", "demonym": "French", "population": "66 million"}
    assert {f.relation for f in facts} == set(TRAIN_TEMPLATES) == set(HELD_OUT_TEMPLATES)
    assert not set(TRAIN_TEMPLATES["capital"]) & set(HELD_OUT_TEMPLATES["capital"])  # paraphrases are never trained
    tok = _tokenizer()
    probe = probes(tok, [Fact("France", "capital", "Paris")], {"capital": ("The capital of {c} is {a}.",)})[0]
    assert tok.decode(probe.ids[probe.answer_start:]) == " Paris"
    assert tok.decode(probe.ids[: probe.answer_start]) == "The capital of France is"


class _Oracle(torch.nn.Module):
    """Logits that put all weight on each probe's true next token (or on token 0: `know=False`)."""

    def __init__(self, vocab, know):
        super().__init__()
        self.vocab, self.know = vocab, know

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.know:
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 50.0)
        return type("Out", (), {"logits": logits})()


def test_score_probes_against_a_model_that_knows_and_one_that_does_not():
    tok = _tokenizer()
    plist = probes(tok, [Fact("France", "capital", "Paris"), Fact("Peru", "capital", "Lima")], TRAIN_TEMPLATES)
    vocab = tok.get_vocab_size()
    knows = score_probes(_Oracle(vocab, True), plist, pad_id=0, batch=3)  # batches of uneven, right-padded probes
    assert knows["accuracy"] == 1.0 and knows["answer_nll"] < 1e-6
    blank = score_probes(_Oracle(vocab, False), plist, pad_id=0)
    assert blank["accuracy"] == 0.0 and math.isclose(blank["answer_nll"], math.log(vocab), rel_tol=1e-5)


def test_the_sweep_measures_every_method_resumes_and_renders_its_section(tmp_path):
    pytest.importorskip("peft")
    from engram_lm.experiments.retrofit import (
        METHODS, RetrofitSettings, base_model, retrofit_section, retrofit_sweep, run_method,
    )  # fmt: skip
    from engram_lm.hf.pretrain import PretrainConfig

    base_cfg = PretrainConfig(steps=3, hidden_size=32, intermediate_size=64, layers=2, heads=2)
    base = base_model(tmp_path, base_cfg, progress=False)
    settings = RetrofitSettings(steps=2, domain_rows=2, fact_rows=2, seq_len=32, eval_batches=1, table_size=1000)
    methods = tuple(m for m in METHODS if m.name in ("frozen", "engram", "lora8"))
    for seed in (0, 1):
        for m in methods:
            run_method(base, m, seed, settings, tmp_path / "retrofit" / m.name / f"seed{seed}" / "result.json")
    (base / "model.safetensors").unlink()  # as in a fresh clone: the base's weights are not kept
    runs = retrofit_sweep(tmp_path, seeds=(0, 1), methods=methods, settings=settings, progress=False,
                          base_config=base_cfg)  # every run finished: read back, nothing retrained (no process started)
    assert len(runs) == 6 and not (base / "model.safetensors").exists()  # and no base pretrained for nothing
    by = {(r["variant"], r["seed"]): r for r in runs}
    frozen, engram, lora = by[("frozen", 0)], by[("engram", 0)], by[("lora8", 0)]
    assert frozen["steps"] == 0 and frozen["val_loss"] == frozen["base_val_loss"] and frozen["adapter_bytes"] == 0
    assert frozen["forget_loss"] == frozen["base_forget_loss"] and frozen["trainable_params"] == 0
    assert engram["steps"] == 2 and engram["trainable_params"] > lora["trainable_params"] > 0
    assert engram["adapter_bytes"] > 4 * 1000 * 0.9 and lora["adapter_bytes"] > 0  # the tables are on disk
    assert engram["base_val_loss"] == frozen["val_loss"]  # every method starts from the same base
    assert 0 <= engram["facts_held_out_accuracy"] <= 1 and engram["peak_rss_mb"] > 0
    verdicts, lines = retrofit_section(runs)
    assert any(line.startswith("| engram | ") for line in lines) and len(verdicts) == 3  # engram vs lora8: the others need lora8+engram or full
    assert all(v[1] in ("reproduced", "not reproduced", "inconclusive at this scale") for v in verdicts)


def test_a_resumed_sweep_refuses_settings_that_differ_from_its_finished_runs(tmp_path):
    """Resumed with another --steps, the sweep averaged seeds of 2 and 6 steps into one row."""
    import json

    from engram_lm.experiments.retrofit import METHODS, RetrofitSettings, retrofit_sweep

    settings = RetrofitSettings(steps=2, domain_rows=2, fact_rows=2, seq_len=32, eval_batches=1, table_size=1000)
    done = tmp_path / "retrofit" / "frozen" / "seed0" / "result.json"
    done.parent.mkdir(parents=True)
    from dataclasses import asdict

    done.write_text(json.dumps({"seed": 0, "val_loss": 3.0, "variant": "frozen", "settings": asdict(settings),
                                "method": asdict(METHODS[0])}))  # fmt: skip
    frozen = tuple(m for m in METHODS if m.name == "frozen")
    assert len(retrofit_sweep(tmp_path, seeds=(0,), methods=frozen, settings=settings, progress=False)) == 1
    with pytest.raises(ValueError, match=r"frozen seed 0 .*steps 2, now 6.*--steps 2.*another --out"):
        retrofit_sweep(tmp_path, seeds=(0,), methods=frozen, settings=RetrofitSettings(**{**asdict(settings), "steps": 6}),
                       progress=False)  # fmt: skip


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads 0: give 1 or more"),
    (["--steps", "0"], "--steps 0: give 1 or more"),
])  # fmt: skip
def test_experiment_retrofit_flags_out_of_range_are_one_line(tmp_path, capsys, argv, message):
    from engram_lm.cli import main

    assert main(["experiment", "retrofit", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_base_folder_without_its_record_or_with_truncated_weights_is_refused_before_training(tmp_path, capsys):
    from engram_lm.cli import main
    from engram_lm.experiments.retrofit import base_model
    from engram_lm.hf.pretrain import PretrainConfig

    base_cfg = PretrainConfig(steps=2, hidden_size=32, intermediate_size=64, layers=2, heads=2)
    base = base_model(tmp_path, base_cfg, progress=False)
    (base / "pretrain.json").rename(base / "pretrain.json.bak")
    argv = ["experiment", "retrofit", "--out", str(tmp_path), "--seeds", "1", "--methods", "frozen", "--quiet"]
    assert main(argv) == 2
    assert "no pretrain.json" in capsys.readouterr().err
    (base / "pretrain.json.bak").rename(base / "pretrain.json")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "truncated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "retrofit" / "frozen").exists()  # nothing ran
