"""The in-context recall probe (probes/recall.py): its instances are answerable from the context
alone (an induction oracle gets every one), nothing else is (a uniform model gets none), and
they fit the context they are scored at."""

import json
import random
import re

import torch

from engram_lm.cli import main
from engram_lm.probes.recall import PAIRS, mqar, mqar_text, needle, recall_documents, recall_probes, score_recall
from probe_util import PieceTokenizer

FILLER = ["the quick brown fox jumps over the lazy dog and runs far away into the green hills " * 6,
          "a long road winds through the valley where farmers grow wheat and barley every summer " * 6]  # fmt: skip



def _induction(vocab: int):
    """Predicts, at each position, what followed the latest earlier occurrence of the last two
    tokens (else of the last one): what copying from context can answer."""

    def logits_of(x):
        out = torch.zeros(*x.shape, vocab)
        for b, row in enumerate(x.tolist()):
            for t in range(len(row)):
                for n in (2, 1):
                    hit = next((j for j in range(t - 1, n - 2, -1) if row[j - n + 1 : j + 1] == row[t - n + 1 : t + 1]), None)
                    if hit is not None:
                        out[b, t, row[hit + 1]] = 1.0
                        break
        return out

    return logits_of


def test_a_key_value_list_states_each_pair_once_and_asks_every_key_again():
    head, queries = mqar(random.Random(0), 8)
    assert head.startswith("Pairs: ") and head.endswith(". Recall:")
    assert sorted(k for k, _, _ in queries) == sorted(re.findall(r"(\w+) \d+", head))
    for key, value, _ in queries:
        assert f" {key} {value}" in head
    text = mqar_text(random.Random(0), 8)
    assert text.startswith(head) and text.count(";") == 2 * 7 and text.endswith(".")


def test_a_needle_sits_at_its_depth_and_its_question_ends_the_text():
    text, value, key = needle(random.Random(1), "one two three four five six seven eight nine ten", 0.5)
    assert text.startswith("one two three four five The code word of " + key + " is " + value + ".")
    assert text.endswith(f"The code word of {key} is")


def test_training_documents_alternate_the_two_kinds_and_are_reproducible():
    docs = recall_documents(10, 0, FILLER)
    assert docs == recall_documents(10, 0, FILLER) and docs != recall_documents(10, 1, FILLER)
    assert all(d.startswith("Pairs:") for d in docs[::2]) and all("The code word of" in d for d in docs[1::2])
    for d in docs[1::2]:  # the answer is written out: the needle's value again at the end
        value = re.search(r"The code word of \w+ is (\d+)\.", d).group(1)
        assert d.endswith(f" is {value}.")


def test_copying_from_context_answers_every_probe_and_a_uniform_model_none():
    tok = PieceTokenizer()
    probes = recall_probes(tok, seed=0, filler=FILLER, max_tokens=96, per_cell=4)
    assert all(len(p.ids) <= 96 for _, p in probes)
    kinds = {m["kind"] for m, _ in probes}
    assert kinds == {"mqar", "needle"} and all(m["distance"] > 0 for m, _ in probes)
    assert {m["pairs"] for m, _ in probes if m["kind"] == "mqar"} == set(PAIRS)  # 16 pairs' first queries fit too
    copied = score_recall(_induction(len(tok.ids) + 1), probes, pad_id=0)
    assert copied["mqar"]["accuracy"] == 1.0 and copied["needle"]["accuracy"] == 1.0
    assert set(copied["needle"]["by_depth"]) == {"0.1", "0.5", "0.9"}
    blank = score_recall(lambda x: torch.zeros(*x.shape, len(tok.ids) + 1), probes, pad_id=0)
    assert blank["mqar"]["accuracy"] == 0.0 and blank["needle"]["accuracy"] == 0.0
    assert recall_probes(PieceTokenizer(), 0, FILLER, 96, 4) == probes and recall_probes(PieceTokenizer(), 1, FILLER, 96, 4) != probes


def test_engram_eval_probes_recall_on_runs_with_and_without_the_format(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", "recall:60:0+bible", "--steps", "4", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--probes", "recall", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["probes"]["recall"]
    assert r["trained_on_format"] is True and r["context"] == 64  # the tiny preset's seq_len
    assert r["mqar"]["queries"] > 0 and r["needle"]["probes"] > 0 and 0 <= r["mqar"]["accuracy"] <= 1
    assert main(["eval", "--checkpoint", str(run), "--probes", "recall"]) == 0
    assert "key-value recall" in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(plain), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(plain), "--probes", "recall"]) == 0
    assert "its corpus held no recall documents: the format is new to it" in capsys.readouterr().out
