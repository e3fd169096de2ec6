"""Compact rows with a quality gate (memory/quality.py): a lossy export is measured on held-out text before it is
kept, refused above the gate with nothing written, recorded as unchecked where nothing could measure it."""

import json

import pytest
import torch

from engram_lm.cli import main
from engram_lm.memory.quality import FormatCost, check_gate, format_cost, through_format


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "run"
    assert main(["train", "--preset", "tiny", "--steps", "12", "--out", str(out), "--quiet"]) == 0
    return out


def test_the_gate_refuses_above_either_threshold_and_keeps_within_both():
    cost = FormatCost("int4", tokens=100, loss=3.0, loss_format=3.02, kl=0.005)
    check_gate(cost, max_kl=0.01, max_loss_increase=0.05)
    with pytest.raises(ValueError, match=r"int4 rows cost this model \+0\.0200 nats .* KL of 0\.0050 .* nothing was written"):
        check_gate(cost, max_kl=0.01, max_loss_increase=0.01)
    with pytest.raises(ValueError, match="above the gate"):
        check_gate(cost, max_kl=0.001, max_loss_increase=0.05)


def test_the_cost_is_zero_for_a_lossless_format_and_grows_as_rows_narrow(trained):
    from engram_lm.inference.loading import load_trained
    from engram_lm.training.data import eval_windows, prepare_data

    model, state = load_trained(trained)
    with torch.no_grad():  # a trained-looking module: its value rows count
        for b in model.blocks:
            if b.engram is not None:
                b.engram.key_value.weight.normal_(std=0.5)
                b.engram.memory.weight.mul_(20)
    from pathlib import Path

    data = prepare_data(state["corpus"], str(Path(state["path"]) / "tokenizer.json"))
    windows = eval_windows(data.val, 4, 32, 2)
    costs = {d: format_cost(model, windows, d) for d in ("fp32", "bf16", "int8", "int4")}
    assert costs["fp32"].kl == 0 and costs["fp32"].loss_increase == 0
    assert 0 <= costs["bf16"].kl < costs["int8"].kl < costs["int4"].kl
    weight = model.blocks[1].engram.memory.weight
    assert torch.equal(through_format(weight, "fp32"), weight.float())  # the model keeps its own table after
    assert costs["int4"].tokens == sum(y.numel() for _, y in windows)


def test_export_memory_keeps_a_format_within_the_gate_and_records_its_cost(trained, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export-memory", "--checkpoint", str(trained), "--to", str(tmp_path / "int8"), "--dtype", "int8",
                 "--max-kl", "1", "--max-loss-increase", "1"]) == 0  # fmt: skip
    assert "within the gate" in capsys.readouterr().out
    q = json.loads((tmp_path / "int8" / "manifest.json").read_text())["quality"]
    assert q["checked"] and q["dtype"] == "int8" and q["tokens"] > 0 and q["kl"] > -1e-6 and q["max_kl"] == 1
    assert main(["generate", "--checkpoint", str(trained), "--memory-dir", str(tmp_path / "int8"), "--memory", "tiered",
                 "--prompt", "In the beginning", "--max-new-tokens", "3", "--allow-other-export"]) == 0  # every tier reads it


def test_export_memory_refuses_a_format_made_to_fail_and_writes_nothing(trained, tmp_path, capsys):
    assert main(["export-memory", "--checkpoint", str(trained), "--to", str(tmp_path / "int4"), "--dtype", "int4",
                 "--max-loss-increase", "-1"]) == 2  # fmt: skip
    assert "above the gate" in capsys.readouterr().err and not (tmp_path / "int4").exists()


def test_a_format_nothing_can_measure_is_said_and_recorded_unchecked(trained, tmp_path, capsys):
    assert main(["export-memory", "--checkpoint", str(trained), "--to", str(tmp_path / "u"), "--dtype", "int4",
                 "--check-text", str(tmp_path / "no-such-text")]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "quality is unchecked" in captured.err and "quality unchecked" in captured.out
    q = json.loads((tmp_path / "u" / "manifest.json").read_text())["quality"]
    assert q["checked"] is False and "no-such-text" in q["reason"]
    assert main(["export-memory", "--checkpoint", str(trained), "--to", str(tmp_path / "f"), "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["quality"]["lossless"] is True


def test_the_formats_bench_measures_bytes_hit_rate_and_quality_per_format(trained, capsys):
    from engram_lm.bench.formats import bench_formats

    r = bench_formats(checkpoint=str(trained), batches=2, budget_fraction=0.05)
    f = r["formats"]
    assert list(f) == ["fp32", "bf16", "fp8", "int8", "int4"]
    assert [f[d]["bytes_per_row"] for d in f] == [4 * r["dim"], 2 * r["dim"], r["dim"] + 1, r["dim"] + 2, r["dim"] // 2 + 2]
    assert f["fp32"]["kl"] == 0 and f["int4"]["hit_rate"] >= f["fp32"]["hit_rate"]  # more rows in the same budget
    assert main(["bench", "formats", "--checkpoint", str(trained), "--batches", "1"]) == 0
    assert "int4" in capsys.readouterr().out


def test_the_formats_bench_runs_on_a_retrofitted_hugging_face_model(tmp_path, hf_base):
    from engram_lm.bench.formats import bench_formats

    folder, docs = hf_base
    assert main(["retrofit", "--model", str(folder), "--data", str(docs), "--steps", "2", "--out", str(tmp_path / "r"),
                 "--set", "table_size=97", "--set", "batch_size=2", "--set", "seq_len=32", "--quiet"]) == 0  # fmt: skip
    r = bench_formats(retrofit=str(tmp_path / "r"), batches=1)
    assert r["formats"]["int4"]["tokens"] == 2 * 32 and r["formats"]["fp32"]["loss_increase"] == 0
