"""Nothing lost, nothing silently wrong: one test per class of fault a user can cause."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engram_lm.cli import main
from engram_lm.recipes import tiny
from engram_lm.checkpoint import store as ckpt_io
from engram_lm.training.loop import train
from engram_lm.training.run import RunLock


def _tiny(steps=4, **changes):
    model, cfg = tiny()
    return model, cfg.with_(steps=steps, eval_every=steps, **changes)


def _docs(folder: Path, word: str, n: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:02d}.txt").write_text(f"{word} {i} " * 40 + "and so the story goes on.\n")
    return folder


# ---- ownership -------------------------------------------------------------------------
def test_a_run_folder_has_one_owner_and_a_dead_owner_leaves_no_lock(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(ValueError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path / "run").__enter__()
        model, cfg = _tiny()
        with pytest.raises(ValueError, match="in use by pid"):
            train(model, cfg, tmp_path / "run", progress=False)
    code = f"from engram_lm.training.run import RunLock; import os; RunLock({str(tmp_path / 'run2')!r}).__enter__(); os._exit(9)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9  # the owner crashed holding the lock
    with RunLock(tmp_path / "run2"):
        pass  # not stuck


# ---- data identity on resume ---------------------------------------------------------------
def test_resume_on_changed_data_is_refused_unless_allowed_and_then_recorded(tmp_path):
    a = _docs(tmp_path / "a", "apple")
    model, cfg = _tiny(steps=2, data=str(a), tokenizer="bpe:300")
    train(model, cfg, tmp_path / "run", progress=False)
    b_cfg = cfg.with_(steps=4)  # same path, new contents below
    for f in a.iterdir():
        f.write_text(f.read_text().replace("apple", "plum"))
    with pytest.raises(ValueError, match="different data or with a different tokenizer.*corpus_sha256.*--allow-data-change"):
        train(model, b_cfg, tmp_path / "run", progress=False)
    train(model, b_cfg, tmp_path / "run", progress=False, allow_data_change=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    events = [r for r in map(json.loads, lines) if "event" in r]
    assert [e["event"] for e in events] == ["table_regime", "steps_changed", "data_changed"] and events[2]["step"] == 2


def test_a_resumed_bpe_run_survives_the_pruning_of_the_checkpoint_it_resumed_from(tmp_path):
    # found in the study: the resumed run read its tokenizer from step-N/tokenizer.json; once
    # that checkpoint was pruned, the next save failed (FileNotFoundError) and the run died
    a = _docs(tmp_path / "a", "apple")
    model, cfg = _tiny(steps=1, data=str(a), tokenizer="bpe:300", save_every=1)
    train(model, cfg, tmp_path / "run", progress=False)
    r = train(model, cfg.with_(steps=6), tmp_path / "run", progress=False)  # saves 2..6, prunes step 1
    assert r.tokens_seen == 6 * cfg.batch_size * cfg.seq_len
    steps = sorted(d.name for d in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["step-000004", "step-000005", "step-000006"]
    first = (tmp_path / "run" / "checkpoints" / "step-000006" / "tokenizer.json").read_bytes()
    train(model, cfg.with_(steps=8), tmp_path / "run", progress=False)  # and resumes again
    assert (tmp_path / "run" / "checkpoints" / "step-000008" / "tokenizer.json").read_bytes() == first


# ---- interrupted and extended runs -------------------------------------------------------
def test_steps_can_grow_a_finished_run_and_other_changes_name_the_key(tmp_path):
    model, cfg = _tiny(steps=2)
    train(model, cfg, tmp_path / "run", progress=False)
    r = train(model, cfg.with_(steps=4), tmp_path / "run", progress=False)
    assert r.tokens_seen == 4 * cfg.batch_size * cfg.seq_len
    assert ckpt_io.read_state(tmp_path / "run")["step"] == 4
    with pytest.raises(ValueError, match=r"train.lr: 0.003 -> 0.01"):
        train(model, cfg.with_(steps=4, lr=0.01), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="below the checkpoint's step"):
        train(model, cfg.with_(steps=3), tmp_path / "run", progress=False)
    first = ckpt_io.checkpoint_dir(tmp_path / "run", 2)
    if first.exists():  # resume from a chosen (older) checkpoint
        r = train(model, cfg.with_(steps=4), tmp_path / "run", progress=False, resume_from=first)
        assert r.tokens_seen == 4 * cfg.batch_size * cfg.seq_len


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "engram_lm", "train", "--preset", "tiny", "--steps", "100000",
                             "--save-every", "0", "--out", str(out), "--quiet"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        if proc.poll() is not None:
            pytest.fail(proc.stderr.read())
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1]
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    step = ckpt_io.read_state(out)["step"]
    assert step >= 1 and not list((out / "checkpoints").glob("*.tmp"))


def test_a_diverged_run_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import engram_lm.training.loop as loop

    model, cfg = _tiny(steps=3)
    train(model, cfg, tmp_path / "run", progress=False)
    real = loop._train_step
    monkeypatch.setattr(loop, "_train_step", lambda *a, **k: float("nan") if a[6] == 4 else real(*a, **k))
    with pytest.raises(ValueError, match="loss became nan at step 5.*last good checkpoint: .*step-000004"):
        train(model, cfg.with_(steps=8, save_every=1), tmp_path / "run", progress=False)
    assert ckpt_io.read_state(tmp_path / "run")["step"] == 4  # step 4 was fine and saved; nothing after
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in records) and not any("NaN" in line for line in records)


# ---- bad values at the boundary ------------------------------------------------------------
@pytest.mark.parametrize("pair, message", [("steps=true", "TrainConfig.steps=True"), ("lr=\"x\"", "TrainConfig.lr"),
                                           ("num_heads=2.5", "ModelConfig.num_heads"),
                                           ("num_kv_heads=3", "num_kv_heads=3: must divide num_heads=4"),
                                           ("attention_head_dim=7", "attention_head_dim=7: must be even"),
                                           ("engram.table_sizes=[1e30, 5]", "EngramConfig.table_sizes")])  # fmt: skip
def test_wrong_types_and_ranges_are_refused_with_the_field_named(tmp_path, capsys, pair, message):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", pair]) == 2
    assert message in capsys.readouterr().err


def test_sampling_parameters_and_eval_batches_are_checked(tmp_path, capsys):
    from engram_lm.inference.generate import SamplingConfig

    for bad in ({"temperature": math.nan}, {"top_p": math.nan}, {"temperature": math.inf}, {"top_k": True}):
        with pytest.raises(ValueError, match="sampling|SamplingConfig"):
            SamplingConfig(**bad)
    model, cfg = _tiny(steps=1)
    train(model, cfg, tmp_path / "run", progress=False)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--batches", "0"]) == 2
    assert "--batches 0: evaluate at least 1 batch" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "a", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_damaged_run_files_name_the_file_and_field(tmp_path, capsys):
    model, cfg = _tiny(steps=1)
    train(model, cfg, tmp_path / "run", progress=False)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "run")
    state = json.loads((ckpt / "state.json").read_text())
    del state["model_config"]
    (ckpt / "state.json").write_text(json.dumps(state))
    assert main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert "lacks the field(s) ['model_config']" in capsys.readouterr().err
    (tmp_path / "run" / "config.json").write_text("{\"requested\": ")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        train(model, cfg, tmp_path / "run", progress=False)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run" / "config.json")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    model, cfg = _tiny(steps=2)
    train(model, cfg, tmp_path / "run", progress=False)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    train(model, cfg.with_(steps=3), tmp_path / "run", progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_a_failed_save_leaves_no_partial_folder_and_earlier_checkpoints_intact(tmp_path, monkeypatch):
    model, cfg = _tiny(steps=2, save_every=1)
    train(model, cfg, tmp_path / "run", progress=False)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_io, "save_file", disk_full)
    with pytest.raises(OSError):
        train(model, cfg.with_(steps=3), tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_json_into_a_closed_pipe_is_not_an_error(tmp_path):
    code = ("import sys; from engram_lm.cli import main; sys.exit(main(['layout', '--preset', 'paper-demo', '--json']))")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -c 10", shell=True, capture_output=True, text=True)
    assert "BrokenPipe" not in proc.stderr and "Traceback" not in proc.stderr


# ---- offloaded tables are checked ----------------------------------------------------------
def test_a_flipped_byte_in_an_exported_table_is_caught_and_verification_is_paid_once(tmp_path, capsys, monkeypatch):
    from engram_lm.memory import export as export_mod

    model, cfg = _tiny(steps=1)
    train(model, cfg, tmp_path / "run", progress=False)
    manifest = export_mod.export_memory(ckpt_io.latest_checkpoint(tmp_path / "run"), tmp_path / "mem", "fp32")
    entry = manifest["layers"]["1"]
    hashed = []
    real = export_mod.verify_file
    monkeypatch.setattr(export_mod, "verify_file", lambda *a, **k: hashed.append(real(*a, **k)) or hashed[-1])
    rows, dim = entry["rows"], manifest["head_dim"]
    export_mod.open_exported(tmp_path / "mem", 1, rows, dim, manifest["fingerprint"])
    assert hashed == [False]  # stamped at export: no re-hash while the file is unchanged
    path = tmp_path / "mem" / entry["file"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        export_mod.open_exported(tmp_path / "mem", 1, rows, dim, manifest["fingerprint"])
    monkeypatch.setattr(export_mod, "verify_file", real)
    assert main(["verify-memory", str(tmp_path / "mem")]) == 2
    assert "damaged table files" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--memory-dir", str(tmp_path / "mem"),
                 "--prompt", "a"]) == 2  # generate reads the export in place, and refuses it damaged


# ---- data and tokenizer training -----------------------------------------------------------
def test_long_unbroken_text_is_cut_before_bpe_training(tmp_path):
    from engram_lm.tokenizer.bpe import MAX_WORD_CHARS, pre_tokenizer, train_bpe

    pieces = pre_tokenizer().pre_tokenize_str("x" * (5 * MAX_WORD_CHARS) + " end")
    assert max(len(p) for p, _ in pieces) <= MAX_WORD_CHARS + 1
    tok = train_bpe(["ab" * 200_000, "plain words here"] * 2, 300)  # a 400 KB "word"
    assert tok.get_vocab_size() <= 300


def test_a_plain_text_file_splits_into_documents_at_blank_lines(tmp_path):
    from engram_lm.training.corpus import load_corpus

    f = tmp_path / "my.txt"
    f.write_text("\n\n".join(f"Paragraph {i} says something.\nIt has two lines." for i in range(30)))
    docs = load_corpus(str(f))
    assert len(docs) == 30 and docs[3] == "Paragraph 3 says something.\nIt has two lines."


# ---- derived files follow what they were made from ---------------------------------------------
def test_generate_refuses_tables_exported_from_another_checkpoint_or_step_unless_told(tmp_path, capsys):
    from engram_lm.memory.export import export_memory

    model, cfg = _tiny(steps=2, save_every=1)
    train(model, cfg, tmp_path / "run", progress=False)
    train(model, cfg.with_(seed=1), tmp_path / "other", progress=False)  # same config and layout, other weights
    step1 = ckpt_io.checkpoint_dir(tmp_path / "run", 1)
    export_memory(step1, tmp_path / "mem-step1", "fp32")
    export_memory(ckpt_io.latest_checkpoint(tmp_path / "other"), tmp_path / "mem-other", "fp32")
    export_memory(ckpt_io.latest_checkpoint(tmp_path / "run"), tmp_path / "mem-own", "fp32")
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "a", "--max-new-tokens", "2", "--memory-dir"]
    for export, why in (("mem-step1", "step 1"), ("mem-other", "step 2")):
        assert main(argv + [str(tmp_path / export)]) == 2
        err = capsys.readouterr().err
        assert f"were exported from {step1 if export == 'mem-step1' else ckpt_io.latest_checkpoint(tmp_path / 'other')} ({why}" in err
        assert "--allow-other-export" in err
    assert main(argv + [str(tmp_path / "mem-own")]) == 0
    assert main(argv + [str(tmp_path / "mem-other"), "--allow-other-export"]) == 0  # served, by the user's choice


def test_fp8_export_refuses_non_finite_rows_naming_the_table_and_row(tmp_path):
    from safetensors.torch import load_file, save_file

    from engram_lm.memory.export import export_memory

    model, cfg = _tiny(steps=1)
    train(model, cfg, tmp_path / "run", progress=False)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "run")
    shard = ckpt / "table-shard-000.safetensors"
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(shard))
    tensors["blocks.1.engram.memory.weight"][123, 5] = float("nan")
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(ValueError, match=r"the table of layer 1 in .* has non-finite values \(first at row 123\); fp8"):
        export_memory(ckpt, tmp_path / "fp8", "fp8")
    export_memory(ckpt, tmp_path / "bf16", "bf16")  # bf16 and fp32 hold a NaN as it is


def test_bench_table_size_zero_names_the_flag():
    from engram_lm.bench.offload import _engram_config

    for bad in (0, -1, 1e-9):
        with pytest.raises(ValueError, match=r"--table-gb .*must be > 0"):
            _engram_config(bad)


def test_a_stopped_study_says_which_worker_was_killed_instead_of_saving():
    from engram_lm.experiments.study import stopped_message

    logs = [Path("w1.log"), Path("w2.log")]
    assert stopped_message([130, 130], logs, 7).startswith("stopped; every worker saved a checkpoint of its run; 7 runs")
    killed = stopped_message([130, -9], logs, 7)
    assert "worker 2 (killed by signal 9; log w2.log) did not save: its run resumes from its last checkpoint" in killed
    assert "every worker saved" not in killed


@pytest.mark.parametrize("case, phrase", [
    ("loop", "symbolic link"), ("file-as-out", "is a file where a folder is expected"),
    ("dir-as-file", "is a folder where a file is expected"),
])  # fmt: skip
def test_file_system_errors_name_their_cause_not_disk_space(tmp_path, capsys, monkeypatch, case, phrase):
    """The CLI answered every OSError with 'free space or choose a writable folder'."""
    monkeypatch.chdir(tmp_path)
    if case == "loop":  # a folder of texts holding a link that points at itself
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.txt").write_text("some text to read " * 20)
        os.symlink("loop.txt", tmp_path / "docs" / "loop.txt")
        argv = ["train", "--data", "docs", "--steps", "1", "--out", "run", "--quiet"]
    elif case == "file-as-out":
        (tmp_path / "taken").write_text("a file")
        argv = ["quickstart", "--out", "taken", "--steps", "1", "--quiet"]
    else:
        assert main(["train", "--preset", "tiny", "--steps", "2", "--out", "run", "--quiet"]) == 0
        (tmp_path / "folder.json").mkdir()
        import engram_lm.memory.export as export

        monkeypatch.setattr(export, "write_manifest", lambda out, m: (out / "folder.json").read_text())  # reads a folder
        argv = ["export-memory", "--checkpoint", "run", "--to", "."]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and "free space" not in err and len(err.splitlines()) == 1
