import math

import pytest
import torch

from engram_lm.analysis.capture import capture, engram_zeroed
from engram_lm.analysis.cka import cka_matrix, linear_cka, soft_alignment_index
from engram_lm.analysis.gates import gates_html, gates_png
from engram_lm.analysis.logit_lens import kl_to_final, logit_lens
from engram_lm.config import EngramConfig
from engram_lm.models.config import ModelConfig
from engram_lm.models.transformer import EngramLM


def test_cka_identity_orthogonal_and_scale_invariance():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.5 * x + 2.0) == pytest.approx(1.0, abs=1e-10)  # scale and shift
    assert linear_cka(x, torch.randn(200, 16)) < 0.2


def test_soft_alignment_index_by_hand():
    cka = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.2, 0.6]])
    # top-2 of row 0: layers 0 (0.9) and 1 (0.1) -> (0*0.9 + 1*0.1) / 1.0 = 0.1
    # top-2 of row 1: layers 2 (0.6) and 0 or 1 (0.2) -> ties give (2*0.6 + i*0.2) / 0.8
    got = soft_alignment_index(cka, top_k=2)
    assert got[0].item() == pytest.approx(0.1)
    assert got[1].item() in (pytest.approx(1.2 / 0.8), pytest.approx(1.4 / 0.8))
    assert cka_matrix([torch.eye(4)], [torch.eye(4), torch.eye(4)]).shape == (1, 2)


def test_kl_identical_is_zero_and_two_class_by_hand():
    logits = torch.randn(5, 7)
    assert kl_to_final(logits, logits) == pytest.approx(0.0, abs=1e-12)
    p, q = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p = (.5,.5), q = (.75,.25)
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_to_final(p, q) == pytest.approx(want, rel=1e-9)


def _model(zero_output=False):
    torch.manual_seed(0)
    engram = EngramConfig(tokenizer="identity:64", table_sizes=(97, 89), max_ngram=3, num_heads=2, layer_ids=(1,),
                          pad_id=0, embed_per_ngram=8, zero_init_output=zero_output)  # fmt: skip
    cfg = ModelConfig(vocab_size=64, dim=16, num_layers=3, num_heads=2, max_seq_len=32, ffn_hidden=32,
                      num_branches=2, engram=engram)  # fmt: skip
    return EngramLM(cfg).eval()


def test_capture_does_not_change_outputs_and_records_gates():
    model = _model()
    ids = torch.randint(0, 64, (2, 9))
    want, _ = model(ids)
    with capture(model) as cap:
        got, _ = model(ids)
    assert torch.equal(got, want)
    assert len(cap.block_outputs) == 3 and cap.block_outputs[0].shape == (2, 9, 16)
    assert set(cap.gates) == {1} and cap.gates[1].shape == (2, 9, 2)
    assert ((cap.gates[1] > 0) & (cap.gates[1] < 1)).all()
    assert logit_lens(model, ids)[-1] == pytest.approx(0.0, abs=1e-9)


def test_engram_zeroed_equals_a_model_whose_engram_adds_nothing():
    model, silent = _model(), _model(zero_output=True)
    silent.load_state_dict({k: v for k, v in model.state_dict().items() if ".engram." not in k}, strict=False)
    ids = torch.randint(0, 64, (1, 7))
    with engram_zeroed(model):
        a, _ = model(ids)
    b, _ = silent(ids)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(model(ids)[0], a)  # the hook is removed afterwards


def test_gate_page_and_picture(tmp_path):
    tokens, rows = ["Alexander", " the", " Great<"], {"layer 1 branch 0": [0.1, 0.5, 0.95]}
    page = gates_html(tokens, rows, "gates")
    assert "Great&lt;" in page and "rgb(255,12,12)" in page and "layer 1 branch 0" in page
    gates_png(tokens, rows, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_analyze_commands_end_to_end(tmp_path, capsys):
    import json

    from engram_lm.cli import main

    for name in ("a", "b"):
        assert main(["train", "--preset", "tiny", "--steps", "3", "--out", str(tmp_path / name), "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert main(["analyze", "gates", "--checkpoint", str(tmp_path / "a"), "--text", "In the beginning",
                 "--out", str(tmp_path / "g.html"), "--json"]) == 0  # fmt: skip
    g = json.loads(capsys.readouterr().out)
    assert len(g["tokens"]) == len(g["gates"]["layer 1 branch 0"]) >= 2
    assert "<span" in (tmp_path / "g.html").read_text() and (tmp_path / "g.png").exists()
    assert main(["analyze", "logit-lens", "--checkpoint", str(tmp_path / "a"), "--baseline", str(tmp_path / "b"),
                 "--out", str(tmp_path / "ll"), "--json"]) == 0  # fmt: skip
    ll = json.loads(capsys.readouterr().out)
    assert ll["curves"]["engram"][-1] == pytest.approx(0.0, abs=1e-9) and (tmp_path / "ll.csv").exists()
    assert main(["analyze", "cka", "--checkpoint", str(tmp_path / "a"), "--baseline", str(tmp_path / "a"),
                 "--out", str(tmp_path / "cka"), "--json"]) == 0  # fmt: skip
    c = json.loads(capsys.readouterr().out)
    assert all(c["cka"][i][i] == pytest.approx(1.0, abs=1e-9) for i in range(len(c["cka"])))


def test_sensitivity_probes_and_zeroing():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from engram_lm.analysis.sensitivity import copy_probe, factual_probe, sensitivity

    facts, copies = factual_probe(), copy_probe(8)
    assert len(facts) > 200 and ("The capital of France is", " Paris") in facts
    assert all(answer.strip() in prompt for prompt, answer in copies)  # the answer is in the context
    words = sorted({w for p, a in facts[:5] + copies for w in (p + a).split()})
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["<unk>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    model = _model()
    result = sensitivity(model, tok)
    assert result["factual"]["items"] == len(facts) and result["copy"]["items"] == 64
    assert result["copy"]["with_engram"]["mean_logprob"] != result["copy"]["engram_zeroed"]["mean_logprob"]


def test_class_sensitivity_counts_each_class_and_zeroing_is_exact_for_a_silent_module():
    import numpy as np

    from engram_lm.analysis.sensitivity import class_sensitivity
    from engram_lm.analysis.token_classes import BigramContinuations, token_classes

    g = torch.Generator().manual_seed(1)
    train = np.tile(np.array([3, 4, 5, 6, 7]), 20)
    stats = BigramContinuations(train, vocab_size=64)
    prefix = torch.tensor([[3, 4, 5, 6, 7, 20, 21, 22, 20, 21, 22]]).repeat(2, 1)
    windows = [torch.cat([prefix, torch.randint(1, 64, (2, 6), generator=g)], 1)]
    want = {k: sum(int(token_classes(w, stats)[k].sum()) for w in windows[0]) for k in ("copyable", "recallable")}
    silent = class_sensitivity(_model(zero_output=True), windows, stats)
    assert {k: silent[k]["tokens"] for k in want} == want and silent["all"]["tokens"] == 2 * 16
    assert want["copyable"] >= 2 and want["recallable"] >= 6  # "20 21 -> 22" repeats in each window; "3 4 5 6 7" is training's
    for k in ("copyable", "recallable", "all"):  # Engram's output is zero at initialisation: zeroing changes nothing
        assert silent[k]["retained_accuracy"] == 1.0 or silent[k]["accuracy_with_engram"] == 0.0
        assert silent[k]["loss_engram_zeroed"] == pytest.approx(silent[k]["loss_with_engram"], abs=1e-12)
    live = class_sensitivity(_model(), windows, stats)
    assert live["all"]["loss_engram_zeroed"] != pytest.approx(live["all"]["loss_with_engram"], abs=1e-6)


def test_sensitivity_command_scores_token_classes_of_a_trained_run(tmp_path, capsys):
    import json

    from engram_lm.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--steps", "4", "--quiet"]) == 0
    out = tmp_path / "s.json"
    assert main(["analyze", "sensitivity", "--checkpoint", str(run), "--token-classes", "--out", str(out)]) == 0
    classes = json.loads(out.read_text())["token_classes"]
    assert set(classes) == {"copyable", "recallable", "all"} and classes["all"]["tokens"] == 2 * 8 * 64
    assert "recallable" in capsys.readouterr().out
