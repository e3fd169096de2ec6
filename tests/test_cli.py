import json

import pytest

from engram_lm.cli import main


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_vocab_json(capsys):
    r = run_json(capsys, "vocab", "--tokenizer", "deepseek-v3", "--top", "3")
    assert (r["raw_size"], r["compressed_size"]) == (128_815, 98_627)
    assert r["reduction"] == pytest.approx(1 - 98_627 / 128_815)
    assert [(m["text"], m["count"]) for m in r["top_merges"]] == [(" ", 163), ("a", 54), ("o", 40)]
    assert "\n" in r["top_merges"][0]["examples"]


def test_layout_json_paper_demo(capsys):
    r = run_json(capsys, "layout", "--preset", "paper-demo")
    assert r["compressed_vocab_size"] == 98_627 and r["pad_id"] == 2
    assert set(r["layers"]) == {"1", "15"}
    layer = r["layers"]["1"]
    assert layer["primes"][0][:3] == [646403, 646411, 646421]
    assert len(layer["primes"]) == 2 and len(layer["primes"][0]) == 8
    assert layer["offsets"][1] == 646403 and layer["rows"] == sum(sum(p) for p in layer["primes"])
    assert r["params"] == r["total_rows"] * 64 and len(r["fingerprint"]) == 16


def test_layout_flags_override_preset(capsys):
    r = run_json(capsys, "layout", "--layers", "2,6", "--table-sizes", "1000,2000,3000", "--max-ngram", "4",
                 "--heads", "2", "--seed", "5")  # fmt: skip
    assert set(r["layers"]) == {"2", "6"}
    assert r["layers"]["2"]["primes"] == [[1009, 1013], [2003, 2011], [3001, 3011]]
    assert r["seed"] == 5


def test_hash_ids_local_and_global(capsys):
    local = run_json(capsys, "hash", "--ids", "5,17,9", "--layers", "1")
    glob = run_json(capsys, "hash", "--ids", "5,17,9", "--layers", "1", "--global-rows")
    assert local["input_ids"] == [5, 17, 9] and len(local["compressed_ids"]) == 3
    assert len(local["hashes"]["1"]) == 3 and len(local["hashes"]["1"][0]) == 16
    offsets = run_json(capsys, "layout", "--layers", "1")["layers"]["1"]["offsets"]
    for lrow, grow in zip(local["hashes"]["1"], glob["hashes"]["1"]):
        assert [g - l for l, g in zip(lrow, grow)] == offsets


def test_hash_text(capsys):
    r = run_json(capsys, "hash", "--text", "the Milky Way")
    assert len(r["input_ids"]) == len(r["hashes"]["15"]) >= 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["vocab", "--tokenizer", "no-such-tokenizer"], "unknown tokenizer"),
        (["layout", "--heads", "0"], "num_heads"),
        (["layout", "--layers", "3,3"], "distinct"),
        (["hash", "--ids", "1,200000"], "outside the raw vocabulary"),
        (["hash", "--ids", "1,2", "--tokenizer", "identity:10", "--pad-id", "12"], "pad_id"),
    ],
)
def test_errors_exit_2_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_text_output_runs(capsys):
    assert main(["layout", "--preset", "paper-27b"]) == 0
    assert "fingerprint" in capsys.readouterr().out


def test_bench_hashing_small_run_agrees_with_numpy(capsys):
    r = run_json(capsys, "bench", "hashing", "--batch", "2", "--seq", "64", "--repeats", "1")
    assert r["outputs_equal"] is True
    assert r["torch_tokens_per_s"] > 0 and r["numpy_tokens_per_s"] > 0
