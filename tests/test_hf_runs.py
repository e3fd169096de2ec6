"""`engram retrofit` runs with `engram train`'s guarantees: a save is whole or absent, a resume
after a crash anywhere in a save equals an unbroken run, the data and tokenizer are checked
by content, a stop request saves, and derived files follow what they were made from."""

import json
import signal
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram_lm.hf import train as hf_train  # noqa: E402
from engram_lm.hf.adapter import load_engram, read_adapter_config, replace_dir, save_engram  # noqa: E402
from engram_lm.hf.train import RetrofitConfig, retrofit  # noqa: E402


class Killed(BaseException):
    """A kill -9 stand-in: nothing in the code under test catches it."""


@pytest.fixture()
def base(hf_base):
    return hf_base


def _cfg(docs, **kw):
    base = dict(data=str(docs), steps=4, batch_size=4, seq_len=32, eval_batches=1, eval_every=2, save_every=2,
                table_size=997, lr=0.003)  # fmt: skip
    return RetrofitConfig(**{**base, **kw})


def _losses(run):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for line in (run / "metrics.jsonl").read_text().splitlines()
            for r in [json.loads(line)]]  # fmt: skip


def _tensors(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter.safetensors"))


def _step4(*a, **k):
    return any("step-000004" in str(x) for x in a)


# (point, module attribute patched, which call dies): the save of step 4 dies there; step 2's checkpoint is whole
SAVE_POINTS = [("adapter", "save_engram", _step4), ("optimizer file", "save_file", _step4),
               ("state.json", "write_json", _step4),
               ("rename into place", "os.replace", lambda *a, **k: str(a[0]).endswith("step-000004.tmp")),
               ("prune", "ckpt_io.prune", "second"), ("publish adapter/", "replace_dir", "second")]  # fmt: skip


@pytest.mark.parametrize("point, target, dies", SAVE_POINTS, ids=[p for p, _, _ in SAVE_POINTS])
def test_a_kill_at_any_point_of_a_save_resumes_to_the_unbroken_run(tmp_path, base, monkeypatch, point, target, dies):
    folder, docs = base
    unbroken = retrofit(folder, _cfg(docs), tmp_path / "unbroken", progress=False)
    owner = hf_train
    for part in target.split(".")[:-1]:
        owner = getattr(owner, part)
    name = target.split(".")[-1]
    real, calls = getattr(owner, name), []

    def killed(*a, **k):
        calls.append(a)
        if (len(calls) == 2) if dies == "second" else dies(*a, **k):
            raise Killed(point)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, killed)
    with pytest.raises(Killed):
        retrofit(folder, _cfg(docs), tmp_path / "run", progress=False)
    monkeypatch.undo()
    resumed = retrofit(folder, _cfg(docs), tmp_path / "run", progress=False)
    assert resumed["val_loss"] == unbroken["val_loss"]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "unbroken")
    want, got = _tensors(tmp_path / "unbroken"), _tensors(tmp_path / "run")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not list((tmp_path / "run").glob("**/*.tmp")) and not list((tmp_path / "run").glob("*.old"))


def test_resuming_on_changed_data_or_tokenizer_is_refused_unless_allowed_and_then_recorded(tmp_path, base):
    folder, docs = base
    retrofit(folder, _cfg(docs, steps=2), tmp_path / "run", progress=False)
    (docs / "00.txt").write_text("Other words entirely, about a cat and a boat. " * 12)  # same path, other content
    with pytest.raises(ValueError, match="different data or with a different tokenizer.*corpus_sha256.*--allow-data-change"):
        retrofit(folder, _cfg(docs, steps=4), tmp_path / "run", progress=False)
    retrofit(folder, _cfg(docs, steps=4), tmp_path / "run", progress=False, allow_data_change=True)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "data_changed"] == [2]
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["truncation"] = {"direction": "Right", "max_length": 100000, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(tok))  # the model folder's tokenizer edited in place
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        retrofit(folder, _cfg(docs, steps=6), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"another configuration \(lr: 0.003 -> 0.01\)"):
        retrofit(folder, _cfg(docs, steps=6, lr=0.01), tmp_path / "run", progress=False, allow_data_change=True)


def test_a_swapped_adapter_file_is_refused_and_the_mmap_cache_follows_the_adapter(tmp_path, word_tokenizer_file):
    from test_hf import V, perturb, tiny_model

    from engram_lm.hf import add_engram

    tok = word_tokenizer_file([f"w{i}" for i in range(V)])
    ids = torch.randint(2, V, (1, 10))
    models = []
    for seed in (0, 1):  # two adapters of one base: their tables differ
        model = tiny_model("llama")
        torch.manual_seed(seed)
        perturb(add_engram(model, tok, layers=(1,), table_size=101, num_heads=2))
        models.append(model)
    save_engram(models[0], tmp_path / "x")
    save_engram(models[1], tmp_path / "b")
    served = tiny_model("llama")
    load_engram(served, tmp_path / "x", memory="mmap")  # builds x's cache from adapter 0
    assert torch.equal(served(ids).logits, models[0](ids).logits)
    for name in ("adapter.safetensors", "adapter_config.json"):  # adapter 1 copied over by hand: the cache is stale
        (tmp_path / "x" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    again = tiny_model("llama")
    load_engram(again, tmp_path / "x", memory="mmap")
    assert torch.equal(again(ids).logits, models[1](ids).logits)  # rebuilt from adapter 1, not the old rows
    cache_meta = json.loads((tmp_path / "x" / "table-layer-1.fp32.json").read_text())
    assert cache_meta["adapter_sha256"] == read_adapter_config(tmp_path / "x")["adapter_sha256"]
    (tmp_path / "x" / "table-layer-1.fp32.bin").write_bytes(b"\0" * 64)  # truncated: remade, not misread
    third = tiny_model("llama")
    load_engram(third, tmp_path / "x", memory="mmap")
    assert torch.equal(third(ids).logits, models[1](ids).logits)
    (tmp_path / "x" / "adapter.safetensors").write_bytes(b"\0" * 8 + (tmp_path / "b" / "adapter.safetensors").read_bytes()[8:])
    with pytest.raises(ValueError, match="adapter.safetensors is not the file saved with .*adapter_config.json"):
        load_engram(tiny_model("llama"), tmp_path / "x")


def test_a_kill_inside_an_adapter_swap_leaves_a_whole_adapter_and_says_where(tmp_path, monkeypatch):
    (tmp_path / "new.tmp").mkdir()
    (tmp_path / "new.tmp" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    real, calls = hf_train.os.replace, []

    def killed_after_moving_aside(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise Killed
        return real(a, b)

    monkeypatch.setattr("engram_lm.hf.adapter.os.replace", killed_after_moving_aside)
    with pytest.raises(Killed):
        replace_dir(tmp_path / "new.tmp", tmp_path / "adapter")
    monkeypatch.undo()
    assert (tmp_path / "adapter.old" / "adapter_config.json").exists()  # the previous adapter, whole
    with pytest.raises(ValueError, match="a save was interrupted and left .*adapter.old.*rerun the command"):
        read_adapter_config(tmp_path / "adapter")


def test_sigint_during_retrofit_saves_and_exits_with_one_line(tmp_path, base):
    folder, docs = base
    out = tmp_path / "run"
    code = ("import sys; from engram_lm.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "retrofit", "--model", str(folder), "--data", str(docs),
                             "--steps", "100000", "--out", str(out), "--quiet", "--save-every", "100000",
                             "--set", "batch_size=2", "--set", "seq_len=16", "--set", "eval_every=100000",
                             "--set", "table_size=997"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        if proc.poll() is not None:
            pytest.fail(proc.stderr.read())
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and (saved[0] / "state.json").exists() and (out / "adapter" / "adapter_config.json").exists()


def test_a_model_folder_of_an_unsupported_family_names_the_supported_ones(tmp_path, base):
    folder, docs = base
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ValueError, match=r"holds a 't5' model; engram retrofit supports the decoder-only families "
                                         r"gpt2, llama, mistral, qwen2, qwen3 \(one entry"):
        retrofit(folder, _cfg(docs), tmp_path / "run", progress=False)


def test_a_truncated_optimizer_file_is_named_on_resume(tmp_path, base):
    folder, docs = base
    retrofit(folder, _cfg(docs, steps=2), tmp_path / "run", progress=False)
    opt = tmp_path / "run" / "checkpoints" / "step-000002" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read .*optimizer.safetensors.*truncated or not a safetensors file"):
        retrofit(folder, _cfg(docs, steps=4), tmp_path / "run", progress=False)


def test_retrofit_with_lora_trains_both_saves_both_and_loads_back_to_identical_logits(tmp_path, base):
    pytest.importorskip("peft")
    from engram_lm.hf.adapter import load_adapter

    folder, docs = base
    r = retrofit(folder, _cfg(docs, lora_r=4, lora_targets=("q_proj", "v_proj")), tmp_path / "run", progress=False)
    plain = retrofit(folder, _cfg(docs), tmp_path / "plain", progress=False)
    assert r["trainable_params"] > plain["trainable_params"]  # the LoRA weights train too
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "lora" / "adapter_config.json").exists() and (adapter / "adapter.safetensors").exists()
    served = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(folder), adapter)
    again = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(folder), adapter)
    ids = torch.randint(2, 300, (2, 20))
    with torch.no_grad():
        a, b = served(ids).logits, again(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, transformers.AutoModelForCausalLM.from_pretrained(folder)(ids).logits)
    # the served model is the trained one: its held-out loss is the run's
    from engram_lm.hf.train import evaluate_lm
    from engram_lm.training.data import eval_windows, prepare_data

    data = prepare_data(str(docs), str(folder / "tokenizer.json"))
    assert evaluate_lm(served, eval_windows(data.val, 4, 32, 1), "cpu") == pytest.approx(r["val_loss"], abs=1e-6)
    other = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))  # fmt: skip
    with pytest.raises(ValueError, match="was trained on base"):
        load_adapter(other, adapter)


def test_a_lora_retrofit_resumes_to_the_unbroken_run(tmp_path, base):
    pytest.importorskip("peft")
    folder, docs = base
    unbroken = retrofit(folder, _cfg(docs, lora_r=4), tmp_path / "unbroken", progress=False)
    retrofit(folder, _cfg(docs, lora_r=4, steps=2), tmp_path / "run", progress=False)
    resumed = retrofit(folder, _cfg(docs, lora_r=4), tmp_path / "run", progress=False)
    assert resumed["val_loss"] == unbroken["val_loss"] and _losses(tmp_path / "run") == _losses(tmp_path / "unbroken")
    with pytest.raises(ValueError, match="choose LoRA or --train-base"):
        _cfg(docs, lora_r=4, train_base=True)


def _retrofit_config_from_cli(monkeypatch, argv):
    """The RetrofitConfig `engram retrofit ARGV` would train with (training replaced by capturing it)."""
    from engram_lm.cli import main
    from engram_lm.hf import train as hf_train

    seen = {}

    def capture(model, cfg, out, **kw):
        seen["cfg"] = cfg
        return {"base_val_loss": 1.0, "val_loss": 1.0, "val_tokens": 1, "trainable_params": 1, "total_params": 1,
                "adapter": str(out)}  # fmt: skip

    monkeypatch.setattr(hf_train, "retrofit", capture)
    code = main(["retrofit", "--model", "m", *argv])
    return code, seen.get("cfg")


def test_lora_targets_are_honoured_with_a_rank_from_either_flag_and_refused_without_one(monkeypatch, capsys):
    code, cfg = _retrofit_config_from_cli(monkeypatch, ["--set", "lora_r=4", "--lora-targets", "q_proj"])
    assert code == 0 and cfg.lora_r == 4 and cfg.lora_targets == ("q_proj",)  # was: () -> LoRA on every linear layer
    code, cfg = _retrofit_config_from_cli(monkeypatch, ["--lora-r", "8", "--lora-targets", "q_proj,v_proj"])
    assert code == 0 and cfg.lora_targets == ("q_proj", "v_proj")
    code, cfg = _retrofit_config_from_cli(monkeypatch, ["--lora-targets", "q_proj"])
    assert code == 2 and cfg is None  # was: trained no LoRA, said nothing
    assert "--lora-targets" in capsys.readouterr().err
