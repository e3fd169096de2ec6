import json

import pytest
import torch

from engram_lm.cli import main
from engram_lm.cli.model import apply_overrides
from engram_lm.inference.generate import SamplingConfig, generate, sample_next
from engram_lm.recipes import get_recipe
from engram_lm.inference.loading import load_trained


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert main(["train", "--preset", "tiny", "--steps", "6", "--out", str(out), "--quiet", "--json"]) == 0
    return out


def test_train_writes_run_folder(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["requested"]["train"]["steps"] == 6 and "git_revision" in config and "versions" in config
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(set(r) == {"step", "loss", "lr", "tokens"} for r in steps)
    assert any("val_loss" in r for r in records)


def test_eval_and_generate_commands(tiny_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny_run), "--batches", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["step"] == 6 and r["val_loss"] > 0
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "In the beginning", "--prompt", "And God",
                 "--max-new-tokens", "5", "--json"]) == 0  # fmt: skip
    g = json.loads(capsys.readouterr().out)
    assert len(g["completions"]) == 2 and all(1 <= len(c["ids"]) <= 5 for c in g["completions"])


def test_greedy_generation_equals_argmax_of_full_recompute(tiny_run):
    model, _ = load_trained(tiny_run)
    prompt = [17, 250, 31, 9]
    new = generate(model, [prompt, [5, 6, 7, 8]], SamplingConfig(max_new_tokens=6))[0]
    seq = list(prompt)
    for _ in range(6):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert new == seq[len(prompt) :]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(50)}
    assert draws <= {2, 3}
    draws = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)) for _ in range(50)}
    assert draws == {2}


def test_overrides_route_to_the_right_config():
    model, train = get_recipe("tiny")
    m, t = apply_overrides(model, train, ["steps=3", "dim=32", "engram.num_heads=4", "engram.embed_per_ngram=32",
                                          "data=python-stdlib"])  # fmt: skip
    assert t.steps == 3 and t.data == "python-stdlib" and m.dim == 32 and m.engram.num_heads == 4
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        apply_overrides(model, train, ["nope=1"])
    with pytest.raises(ValueError, match="invalid TrainConfig.steps"):
        apply_overrides(model, train, ["steps=0"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "tiny", "--data", "/no/such/path"], "does not exist"),
        (["train", "--preset", "tiny", "--set", "lr=-1"], "lr"),
        (["eval", "--checkpoint", "/no/such/ckpt"], "not an engram-lm checkpoint"),
    ],
)
def test_cli_errors(argv, message, capsys, tmp_path):
    argv = argv + ["--out", str(tmp_path)] if argv[0] == "train" else argv
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "gpt5"])


@pytest.mark.parametrize("memory", ["device", "ram", "mmap", "ssd", "tiered"])
def test_prefetch_and_the_cache_work_with_every_tier_or_say_once_why_not(tiny_run, memory, capsys):
    prompt = ["--checkpoint", str(tiny_run), "--prompt", "In the beginning", "--max-new-tokens", "6", "--json"]
    capsys.readouterr()
    assert main(["generate", *prompt]) == 0
    expected = json.loads(capsys.readouterr().out)["completions"][0]["ids"]
    assert main(["generate", *prompt, "--memory", memory, "--prefetch", "--cache-rows", "64"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["completions"][0]["ids"] == expected
    if memory == "device":  # rows already on the compute device: nothing to fetch ahead or cache, said once
        assert err.count("--prefetch") == 1 and err.count("--cache-rows") == 1 and "running without" in err
    else:
        assert "--prefetch" not in err and "--cache-rows" not in err


def test_eval_repeats_the_runs_logged_validation_loss_and_says_so(tiny_run, capsys):
    capsys.readouterr()
    logged = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    last = [r["val_loss"] for r in logged if "val_loss" in r][-1]
    assert main(["eval", "--checkpoint", str(tiny_run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["batches"] == r["run_batches"] and r["logged_val_loss"] == last
    assert r["val_loss"] == pytest.approx(last, abs=1e-6)  # the same windows and weights
    assert main(["eval", "--checkpoint", str(tiny_run), "--batches", "1"]) == 0
    assert "without --batches eval repeats that figure" in capsys.readouterr().out


@pytest.mark.parametrize("with_engram", [True, False])
def test_cached_generation_equals_full_recompute_with_engram_or_overencoding(with_engram):
    """Decoding hashes the model's own tokens incrementally (no range check after the prompt): the
    tokens equal recomputing the whole sequence, for Engram's hasher and for OverEncoding's."""
    from engram_lm.models.overencoding import OverEncodingConfig
    from engram_lm.models.transformer import EngramLM

    model_cfg, _ = get_recipe("tiny")
    if not with_engram:
        model_cfg = model_cfg.with_(engram=None, overencoding=OverEncodingConfig(slots=101, table_dim=16, max_ngram=3,
                                                                                 num_splits=1))  # fmt: skip
    torch.manual_seed(0)
    model = EngramLM(model_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # Engram's zero-initialised value rows: make them count
    prompt = [17, 250, 0, 31, 9]  # the end-of-document id inside the prompt
    new = generate(model, [prompt], SamplingConfig(max_new_tokens=8))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert new == seq[len(prompt):]
