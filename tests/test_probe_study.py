"""The study's probes section (experiments/probes.py): its plan, a trained and analysed run of
each arm, and the page's verdicts from hand-made results."""

import csv
from dataclasses import replace

import pytest

from engram_lm.experiments import probes as P
from engram_lm.experiments.runner import run_specs
from engram_lm.experiments.study import analyse, study_plan

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. {i} Winston Smith slipped quickly "
        "through the glass doors of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust. ")  # fmt: skip


def test_the_section_needs_long_data_and_plans_three_arms_per_seed():
    assert "probes" not in study_plan(seeds=2, sections=("probes",))
    specs = study_plan(seeds=2, long_data="novels", sections=("probes",))["probes"]
    assert [s.key for s in specs] == ["probes/moe/seed-0", "probes/engram/seed-0", "probes/capacity1/seed-0",
                                      "probes/moe/seed-1", "probes/engram/seed-1", "probes/capacity1/seed-1"]  # fmt: skip
    assert all(s.keep_checkpoint and s.train.data == "bios:600:0+recall:3000:0+first:7000000:novels" for s in specs)
    assert specs[2].model.engram.single_slot and specs[0].model.engram is None
    assert len({s.train.steps for s in specs}) == 1 and specs[0].train.steps == 3 * 400


def test_the_second_size_halves_every_width_and_keeps_the_data_steps_and_parameter_match():
    from engram_lm.models.accounting import count_config

    full = study_plan(seeds=1, long_data="novels", sections=("probes",))["probes"]
    half = study_plan(seeds=1, long_data="novels", sections=("probes-half",))["probes-half"]
    assert [s.key for s in half] == ["probes-half/moe/seed-0", "probes-half/engram/seed-0", "probes-half/capacity1/seed-0"]
    assert [s.train for s in half] == [s.train for s in full]  # same data, steps and seeds: same epochs
    moe, engram = half[0].model, half[1].model
    assert (moe.dim, moe.num_heads, moe.expert_hidden, moe.num_layers) == (64, 2, 64, 4)
    assert moe.dim // moe.num_heads == full[0].model.dim // full[0].model.num_heads  # head dim kept
    assert engram.engram.embed_per_ngram == 64
    counts = [count_config(s.model) for s in half]
    # iso-parameter at this size too: total within 0.1%, active equal; about a quarter of the quickstart's
    assert abs(counts[1].total / counts[0].total - 1) < 1e-3 and counts[1].active == counts[0].active
    assert 0.2 < counts[0].total / count_config(full[0].model).total < 0.3
    assert P.claims("half")["bits"] == P.CLAIMS["bits"] + " (half width)"
    qa = study_plan(seeds=1, long_data="novels", sections=("probes-qa",))["probes-qa"]
    assert [s.model for s in qa] == [s.model for s in full] and qa[0].key == "probes-qa/moe/seed-0"
    assert qa[0].train.data == "bios-qa:600:0+recall:3000:0+first:7000000:novels"
    assert "mqar" not in P.claims("qa") and P.claims("qa")["extraction"] == P.EXTRACTION
    with pytest.raises(ValueError, match="unknown probe model size 'huge'"):
        P.probe_models("huge")


def test_each_arm_trains_is_probed_and_the_page_renders(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "PEOPLE", 12)
    monkeypatch.setattr(P, "RECALL_DOCS", 30)
    monkeypatch.setattr(P, "NOVEL_CHARS", 400_000)
    novels = tmp_path / "novels"
    novels.mkdir()
    for f in range(20):
        (novels / f"{f:02d}.txt").write_text("".join(TEXT.format(i=f * 100 + i) for i in range(100)))
    specs = [replace(s, train=s.train.with_(steps=2, eval_every=2, eval_batches=1))
             for s in P.probe_specs(long_data=str(novels), seeds=(0,))]  # fmt: skip
    results = run_specs(tmp_path / "runs", specs, progress=False, analyse=analyse)
    for r in results:
        a = r["analysis"]
        assert a["knowledge"]["people"] == 12 and 0 <= a["knowledge"]["template"]["recall"] <= 1
        assert a["recall"]["trained_on_format"] and a["recall"]["context"] == specs[0].train.seq_len
        assert 0 <= a["next_token"]["with_engram"] <= 1
        assert (a["next_token"]["engram_zeroed"] is None) == (r["variant"] == "moe")
    verdicts, lines = P.knowledge_section(results)
    assert [v[0] for v in verdicts] == [P.CLAIMS[k] for k in ("bits", "few", "table", "zeroed")]
    assert all(v[1] == "inconclusive at this scale" for v in verdicts)  # one seed calls nothing
    assert any(line.startswith("| MoE+Engram |") for line in lines)
    verdicts, _ = P.recall_section(results)
    assert [v[0] for v in verdicts] == [P.CLAIMS["mqar"], P.CLAIMS["needle"]]
    P.write_probes(results, tmp_path / "out")
    assert (tmp_path / "out" / "probes.png").stat().st_size > 0
    with (tmp_path / "out" / "probes.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["moe", "engram", "capacity1"]
    assert rows[0]["next_token_kept_zeroed"] == "" and rows[1]["next_token_kept_zeroed"] != ""  # the MoE has no Engram


def _run(variant: str, seed: int, bits: float, few: float, kept: float, tokens_kept: float, mqar: float) -> dict:
    by = {str(e): few for e in (1, 2, 4)} | {str(e): 0.5 for e in (8, 16, 32)}
    knowledge = {"params": {"params_total": 3e6}, "template": {"recall": 0.3, "by_exposures": by}, "question": {"recall": 0.1},
                 "question_held_out_people": {"recall": few / 2},
                 "bits": bits, "bits_per_param": bits / 3e6, "retained_recall": kept if variant != "moe" else None}  # fmt: skip
    recall = {"context": 128, "mqar": {"accuracy": mqar, "by_pairs": {str(n): mqar for n in (2, 4, 8, 16)}},
              "needle": {"accuracy": mqar / 2}}  # fmt: skip
    return {"variant": variant, "seed": seed, "data": "bios:600:0+recall:3000:0+first:7000000:novels", "epochs": 1.02,
            "val_loss": 4.0, "analysis": {"knowledge": knowledge, "recall": recall,
                                          "next_token": {"retained": tokens_kept if variant != "moe" else None}}}  # fmt: skip


def test_the_verdicts_are_paired_over_seeds_by_hand():
    runs = [_run("moe", s, 1000 + s, 0.10, 0, 0, 0.20) for s in range(3)]
    runs += [_run("engram", s, [1300, 1250, 1320][s], [0.2, 0.25, 0.22][s], [0.3, 0.4, 0.35][s], 0.9, [0.2, 0.21, 0.19][s])
             for s in range(3)]  # fmt: skip
    runs += [_run("capacity1", s, 1000, 0.1, 0.9, 0.9, 0.2) for s in range(3)]
    verdicts, _ = P.knowledge_section(runs)
    bits, few, table, zeroed = verdicts
    # Engram minus MoE bits per seed: 300, 249, 318 -> mean 289, sd sqrt(2562 / 2) = 35.79, se 20.664
    assert bits[1] == "reproduced" and "difference +289.000 ± 20.664" in bits[3]
    assert few[1] == "reproduced" and table[1] == "reproduced"
    # kept facts minus kept next tokens: -0.6, -0.5, -0.55 -> -0.55 ± 0.029
    assert zeroed[1] == "reproduced" and "difference -0.550 ± 0.029" in zeroed[3]
    verdicts, _ = P.recall_section(runs)
    assert verdicts[0][1] == "inconclusive at this scale"  # 0, +0.01, -0.01: nothing to call
    chance = [dict(r, analysis=dict(r["analysis"], recall=dict(r["analysis"]["recall"], mqar={
        "accuracy": 0.006 if r["variant"] == "engram" else 0.005, "by_pairs": {str(n): 0.005 for n in (2, 4, 8, 16)}},
        needle={"accuracy": 0.0}))) for r in runs]  # fmt: skip
    verdicts, _ = P.recall_section(chance)  # +0.001 on every seed: a call by the rule, but both at chance
    assert verdicts[0][1] == "inconclusive at this scale" and verdicts[0][3].startswith("not measurable: every model at chance")
    assert P.knowledge_section(runs[:3])[0] == []  # an arm missing: not rendered yet
    half, lines = P.knowledge_section(runs, size="half")  # the same numbers under the second size's names
    assert [v[1:] for v in half] == [v[1:] for v in (bits, few, table, zeroed)] and half[0][0].endswith("(half width)")
    assert lines[0].endswith("(probes-half)") and "half its width" in lines[2]
    qa, lines = P.knowledge_section(runs, size="qa")  # bios-qa: the same four, then extraction
    assert [v[0] for v in qa] == [P.claims("qa")[k] for k in ("bits", "few", "table", "zeroed", "extraction")]
    # never-asked half's recall, Engram minus MoE: 0.1 - 0.05, 0.125 - 0.05, 0.11 - 0.05 -> 0.0617 ± 0.0073
    assert qa[4][1] == "reproduced" and "difference +0.062 ± 0.007" in qa[4][3]
    assert any(line.startswith("| MoE+Engram |") for line in lines[lines.index("Extraction (Physics of LMs 3.1/3.3): "
                                                                               "training read question-answer documents "
                                                                               "for the even half of the people only; the "
                                                                               "never-asked half's questions test whether a "
                                                                               "fact stored from biographies can be retrieved "
                                                                               "in a form training never paired with it."):])
