"""Synthetic biographies and the knowledge probe (probes/): people, documents, the corpus mix,
scoring and bits, against hand-computed values and an oracle model."""

import json
import math

import pytest
import torch

from engram_lm.cli import main
from engram_lm.probes.biographies import (ATTRIBUTES, EXPOSURES, POOLS, QUESTIONS, TRAIN_TEMPLATES, biography_documents,
                                          knowledge_bits, people)  # fmt: skip
from engram_lm.probes.fact_recall import score_facts
from engram_lm.probes.mixes import base_corpus, find_mix, mix_documents, mixed_corpus, parse_mix
from engram_lm.probes.scoring import Probe, answer_scores
from probe_util import PieceTokenizer


def test_people_are_reproducible_distinct_and_cycle_through_the_exposure_counts():
    a, b = people(120, seed=3), people(120, seed=3)
    assert a == b and a != people(120, seed=4)
    assert len({p.name for p in a}) == 120
    assert [p.exposures for p in a[:7]] == [1, 2, 4, 8, 16, 32, 1]
    for p in a:
        assert [k for k, _ in p.attributes] == list(ATTRIBUTES)
        assert all(v in POOLS[k] for k, v in p.attributes)
    assert len(POOLS["birth_date"]) == 100 * 12 * 28


def test_each_person_is_written_as_often_as_their_exposures_every_attribute_once_a_document():
    persons = people(12, seed=0)
    docs = biography_documents(persons, seed=0)
    assert len(docs) == 2 * sum(EXPOSURES)
    for p in persons:
        mine = [d for d in docs if d.startswith(p.name) or f" {p.name} " in f" {d} "]
        assert len(mine) == p.exposures
        for d in mine:
            for attribute, value in p.attributes:
                said = [t.format(n=p.name, a=value) for t in TRAIN_TEMPLATES[attribute]]
                assert sum(d.count(s) for s in said) == 1  # once, in a training template
            assert not any(q.split("{n}")[0] in d for q in QUESTIONS.values() for q in q)  # never the question form


def test_the_mix_holds_out_the_corpus_own_held_out_text_and_trains_on_everything_else():
    corpus = [f"doc {i} " + " ".join(f"w{i}-{j}" for j in range(40)) for i in range(50)]
    bios = [f"bio {i}" for i in range(300)]
    is_val = lambda i: i % 10 == 3  # noqa: E731
    mixed = mix_documents(corpus, bios, is_val)
    held = [d for i, d in enumerate(mixed) if is_val(i)]
    assert " ".join(held) == " ".join(corpus[3::10])  # the same held-out text, cut into the split's 35 places
    assert len(held) == sum(is_val(i) for i in range(len(mixed)))
    trained = [d for i, d in enumerate(mixed) if not is_val(i)]
    assert [d for d in trained if d.startswith("doc")] == [d for i, d in enumerate(corpus) if not is_val(i)]
    assert sorted(d for d in trained if d.startswith("bio")) == sorted(bios)
    spread = [i for i, d in enumerate(mixed) if d.startswith("bio")]
    assert spread[0] < 5 and spread[-1] > len(mixed) - 5  # spread over the whole corpus, not bunched
    with pytest.raises(ValueError, match="use fewer or a larger corpus"):
        mix_documents(corpus[:5], bios * 10, is_val)  # one held-out document of 42 words: too little for 300 places
    with pytest.raises(ValueError, match="none held out"):
        mix_documents(corpus[:3], bios, is_val)


def test_composed_mixes_keep_every_probe_document_out_of_the_validation_split():
    """One pass over the base corpus for every mix (mixed one after the other, the outer mix's
    insertions moved the inner one's documents onto validation places: 411 of 483 held-out
    documents were recall documents)."""
    is_val = lambda i: i % 20 == 10  # noqa: E731  (training/data.py's split)
    novel = [" ".join(f"word{i}-{j}" for j in range(400)) for i in range(12)]  # one held out (index 10)
    docs = mixed_corpus("bios:30:0+recall:200:1+novels", lambda name: novel, is_val)
    bios = set(biography_documents(people(30, 0), 0))
    probe = lambda d: d in bios or d.startswith("Pairs:") or "The code word of" in d  # noqa: E731
    assert sum(probe(d) for d in docs) == len(bios) + 200
    held_out = [d for i, d in enumerate(docs) if is_val(i)]
    assert " ".join(held_out) == novel[10]  # the novels' own held-out document (index 10), cut in pieces
    trained = [d for i, d in enumerate(docs) if not is_val(i) and not probe(d)]
    assert trained == novel[:10] + novel[11:]  # every other novel document trains, whole
    needles = [d for d in docs if "The code word of" in d]
    assert all(len(n.split()) > 20 for n in needles)  # a needle in training text
    assert not any("word10-" in n for n in needles)  # never in held-out text
    assert mixed_corpus("recall:200:1+bios:30:0+novels", lambda name: novel, is_val) == docs  # the order of the mixes is no matter


def test_the_corpus_spec_is_parsed_and_bad_ones_say_how_to_write_it():
    assert parse_mix("bios:600:0+bible") == ("bios", 600, 0, "bible")
    assert parse_mix("recall:10:2+first:1000:python-stdlib") == ("recall", 10, 2, "first:1000:python-stdlib")
    composed = "bios:600:3+recall:4000:1+first:1000:bible"
    assert find_mix(composed, "recall") == (4000, 1) and find_mix(composed, "bios") == (600, 3)
    assert find_mix("bible", "bios") is None and base_corpus(composed) == "first:1000:bible"
    for bad in ("bios:600+bible", "bios:x:0+bible", "bios:600:0", "bios:600:0+"):
        with pytest.raises(ValueError, match="bios:PEOPLE:SEED\\+CORPUS"):
            parse_mix(bad)
    with pytest.raises(ValueError, match="recall:DOCS:SEED\\+CORPUS"):
        parse_mix("recall:1:2:3+bible")


def test_knowledge_bits_by_hand():
    assert knowledge_bits(0.0, "field") == pytest.approx(math.log2(20))  # certain of the value: all of its pool's bits
    assert knowledge_bits(math.log(20), "field") == pytest.approx(0.0, abs=1e-12)  # as good as guessing from the pool
    assert knowledge_bits(10.0, "birth_city") == 0.0  # worse than guessing: clipped
    assert knowledge_bits(math.log(2), "university") == pytest.approx(math.log2(40) - 1)


def test_answer_scores_by_hand_on_a_uniform_model():
    uniform = lambda x: torch.zeros(*x.shape, 5)  # noqa: E731  (argmax: token 0)
    scores = answer_scores(uniform, [Probe([3, 1, 0, 0], 2), Probe([2, 4, 0], 1), Probe([1, 2], 1)], pad_id=0, batch=2)
    assert scores == [(True, pytest.approx(2 * math.log(5)), 2), (False, pytest.approx(2 * math.log(5)), 2),
                      (False, pytest.approx(math.log(5)), 1)]  # fmt: skip



def test_an_oracle_knows_every_fact_and_holds_every_bit_a_uniform_model_none():
    persons, tok = people(12, seed=1), PieceTokenizer()
    score_facts(lambda x: torch.zeros(*x.shape, 4096), tok, persons, pad_id=0)  # fills the vocabulary

    def oracle(x):  # puts everything on the token that actually follows
        out = torch.full((*x.shape, 4096), -30.0)
        out[:, :-1].scatter_(-1, x[:, 1:, None], 30.0)
        return out

    known = score_facts(oracle, tok, persons, pad_id=0)
    assert known["template"]["recall"] == known["question"]["recall"] == 1.0
    assert known["bits"] == pytest.approx(12 * sum(math.log2(len(POOLS[a])) for a in ATTRIBUTES), rel=1e-6)
    assert set(known["template"]["by_exposures"]) == {str(e) for e in EXPOSURES}
    guess = score_facts(lambda x: torch.zeros(*x.shape, 4096), tok, persons, pad_id=0)
    assert guess["template"]["recall"] == 0.0 and guess["bits"] == 0.0  # 4096 ids: worse than the pool's prior


def test_engram_eval_probes_knowledge_on_a_run_trained_mix_documents(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", "bios:24:0+bible", "--steps", "6", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--probes", "knowledge", "--json"]) == 0
    k = json.loads(capsys.readouterr().out)["probes"]["knowledge"]
    assert k["people"] == 24 and k["facts"] == 120
    assert 0 <= k["template"]["recall"] <= 1 and k["bits"] >= 0 and k["params"]["params_total"] > 0
    assert "engram_zeroed" in k  # the tiny preset has Engram
    assert main(["eval", "--checkpoint", str(run), "--probes", "knowledge"]) == 0
    assert "documents per person: 1:" in capsys.readouterr().out
    other = tmp_path / "other"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(other), "--quiet"]) == 0
    assert main(["eval", "--checkpoint", str(other), "--probes", "knowledge"]) == 2
    assert "holds no biographies; train with --data bios:" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--probes", "facts"]) == 2
    assert "unknown probe; available: knowledge, recall" in capsys.readouterr().err


def test_bios_qa_adds_question_answer_documents_for_half_the_people_and_the_probe_scores_the_other_half(tmp_path, capsys):
    from engram_lm.probes.biographies import qa_documents, qa_people

    persons = people(10, seed=0)
    qa = qa_documents(persons, seed=0)
    assert len(qa) == 5 and qa_people(persons) == persons[::2]
    for p, doc in zip(persons[::2], sorted(qa, key=lambda d: [p.name in d for p in persons[::2]].index(True))):
        for attribute, value in p.attributes:  # every question, answered
            assert QUESTIONS[attribute][0].format(n=p.name, a=value) in doc
    assert not any(p.name in d for p in persons[1::2] for d in qa)  # the held-out half is never asked
    is_val = lambda i: i % 20 == 10  # noqa: E731
    novel = [" ".join(f"word{i}-{j}" for j in range(400)) for i in range(30)]
    docs = mixed_corpus("bios-qa:10:0+novels", lambda name: novel, is_val)
    assert sum(d in set(qa) for d in docs) == 5
    with pytest.raises(ValueError, match="bios and bios-qa in one --data"):
        mixed_corpus("bios:10:0+bios-qa:10:0+novels", lambda name: novel, is_val)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", "bios-qa:12:0+bible", "--steps", "3", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--probes", "knowledge", "--json"]) == 0
    k = json.loads(capsys.readouterr().out)["probes"]["knowledge"]
    assert k["people"] == 12 and 0 <= k["question_held_out_people"]["recall"] <= 1
    assert sum(k["question_held_out_people"]["by_exposures"][str(e)] is not None for e in EXPOSURES) == 3  # odd people: 2, 8, 32
