"""`engram bench penalty` (bench/penalty.py, bench/shapes.py): shapes, statistics, refusals, a run."""

import json

import pytest
import torch

from engram_lm.bench.penalty import bench_penalty, check_fits, penalty_interval
from engram_lm.bench.shapes import SHAPES, get_shape, scaled_down


def test_the_paper_shapes_are_qwen3_4b_and_8b_with_the_papers_engram_at_block_2():
    """Qwen/Qwen3-4B and Qwen3-8B config.json (bench/shapes.py cites them): hidden, layers, heads, SwiGLU, vocab;
    the paper's module: orders 2-3, 8 heads, d_mem 1280, block 2."""
    for name, (dim, ffn) in {"paper-4b": (2560, 9728), "paper-8b": (4096, 12288)}.items():
        m = get_shape(name).model
        assert (m.dim, m.num_layers, m.num_heads, m.ffn_hidden, m.vocab_size) == (dim, 36, 32, ffn, 151_936)
        assert (m.kv_heads, m.head_dim, m.rope_theta) == (8, 128, 1e6)
        assert m.num_routed_experts == 0 and m.engram.layer_ids == (1,) and m.engram.max_ngram == 3
        assert m.engram.num_heads == 8 and m.engram.memory_dim == 1280
    with pytest.raises(ValueError, match="unknown --shape 'paper-70b'"):
        get_shape("paper-70b")


@pytest.mark.parametrize("name, low, high", [("paper-4b", 4.40e9, 4.43e9), ("paper-8b", 8.19e9, 8.21e9)])
def test_the_paper_shapes_have_the_parameter_counts_of_their_models(tmp_path, name, low, high):
    """Qwen3-4B: 4.02B parameters with its head tied to the embeddings (here its own: +0.39B); Qwen3-8B: 8.19B,
    untied; the Engram module adds ~13M / ~21M (the q/k norms Qwen3 has and engram-lm's blocks lack: ~0.3M)."""
    params = check_fits(get_shape(name), 0, tmp_path, 4, memory=10**15, disk=10**15)
    assert low < params < high


def test_the_penalty_and_its_interval_on_synthetic_timings():
    flat = penalty_interval([1.1] * 8, [1.0] * 8)
    assert flat["penalty"] == pytest.approx(0.1) and flat["ci95"] == pytest.approx([0.1, 0.1]) and flat["turns"] == 8
    noisy = penalty_interval([1.0, 1.3, 0.9, 1.2, 1.1, 1.0, 1.4, 0.8], [1.0] * 8)
    assert noisy["ci95"][0] < noisy["penalty"] < noisy["ci95"][1] and noisy["ci95"][0] < 0 < noisy["ci95"][1]
    assert penalty_interval([0.5, 2.0], [1.0, 4.0])["penalty"] == pytest.approx(-0.5)  # paired by turn, not pooled
    with pytest.raises(ValueError, match="as many turns"):
        penalty_interval([1.0], [1.0, 1.0])


def test_a_shape_that_does_not_fit_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"paper-8b needs 3\d\.\d GB of memory .* this machine has 20.0 GB available"):
        check_fits(get_shape("paper-8b"), 0, tmp_path, 4, memory=20 * 10**9, disk=10**15)
    with pytest.raises(ValueError, match=r"needs 50.0 GB \+ 1 GB free in .* which has 10.0 GB"):
        check_fits(get_shape("quickstart"), 50 * 10**9, tmp_path, 4, memory=10**15, disk=10 * 10**9)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_scaled_down_runs_a_prefill_and_a_decode_through_every_tier(tmp_path, name):
    r = bench_penalty(name, table_gb=0.002, workdir=tmp_path, turns=1, prefill=(24,), decode=(2,), new_tokens=3,
                      shape=scaled_down(get_shape(name)))  # fmt: skip
    configs = ["none", "ram", "ram+prefetch", "tiered", "tiered+prefetch", "mmap", "mmap+prefetch", "ssd", "ssd+prefetch"]
    assert list(r["warm"]) == configs and sorted(r["cold"]) == sorted(c for c in configs if c.split("+")[0] in
                                                                      ("tiered", "mmap", "ssd"))  # fmt: skip
    for config, works in r["warm"].items():
        assert works["prefill-24"]["tok_s"] > 0 and works["decode-b2"]["p99_ms"] >= works["decode-b2"]["p50_ms"] > 0
        assert ("penalty" in works["decode-b2"]) == (config != "none")
    assert r["cold"]["ssd"]["resident_before"] in (0.0, None)  # dropped before the cold pass (None: unknown here)
    for works in r["cold"].values():  # one turn against the backbone timed just before it, and against the warm median
        e = works["decode-b2"]
        assert e["penalty"] == pytest.approx(e["none_tok_s"] / e["tok_s"] - 1)
        assert e["penalty_vs_warm_none"] == pytest.approx(r["warm"]["none"]["decode-b2"]["tok_s"] / e["tok_s"] - 1)
    assert r["warm"]["ssd+prefetch"]["placement"]["prefetched"] > 0
    assert list(tmp_path.iterdir()) == []  # the table file went with the run
    json.dumps(r)  # --json writes it all


def test_the_cli_prints_a_row_per_configuration_and_workload(tmp_path, capsys):
    from engram_lm.cli import main

    assert main(["bench", "penalty", "--shape", "quickstart", "--table-gb", "0.001", "--turns", "1", "--prefill", "16",
                 "--decode", "1", "--new-tokens", "2", "--tiers", "ram,ssd", "--no-cold", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "quickstart:" in out and out.count("decode-b1") == 5 and "ssd+prefetch" in out  # none, ram(+p), ssd(+p)
    assert main(["bench", "penalty", "--tiers", "ram,disk", "--workdir", str(tmp_path)]) == 2
    assert "--tiers disk" in capsys.readouterr().err


def test_the_offline_batch_draws_its_lengths_once_and_serves_them_in_sorted_waves():
    from engram_lm.bench.penalty import offline_waves, offline_workload, timed

    w = offline_workload(5, 3, 9, 2)
    assert w.name == "offline-5" and w.batch == 2 and len(w.lengths) == 5
    assert all(3 <= p <= 9 and 3 <= o <= 9 for p, o in w.lengths) and [sum(x) for x in w.lengths] == sorted(map(sum, w.lengths))
    assert offline_workload(5, 3, 9, 2) == w and offline_workload(5, 3, 9, 2, seed=1) != w  # drawn from the seed
    waves = list(offline_waves(w))
    assert [n for *_, n in waves] == [2, 2, 1]
    assert waves[0][:2] == (max(p for p, _ in w.lengths[:2]), max(o for _, o in w.lengths[:2]))
    calls = {"prefill": [], "step": 0}

    def prefill(prompt, total):
        calls["prefill"].append((tuple(prompt.shape), total))
        return prompt[:, -1:], None

    def step(nxt, _):
        calls["step"] += 1
        return nxt

    ids = torch.zeros(2, 9, dtype=torch.long)
    out = timed(w, ids, torch.device("cpu"), None, prefill, step)
    assert calls["prefill"] == [((n, p), p + o) for p, o, n in waves]  # one prefill per wave, padded to its longest
    assert calls["step"] == sum(o - 1 for _, o, _ in waves)  # the prefill gives the first output token
    assert out["tokens"] == sum(o for _, o in w.lengths) and out["seconds"] > 0
    with pytest.raises(ValueError, match="SEQUENCES,LOW,HIGH,WAVE with 1 <= LOW <= HIGH"):
        offline_workload(4, 9, 3, 2)


def test_the_offline_batch_runs_through_every_tier_and_the_cli_refuses_a_malformed_one(tmp_path, capsys):
    from engram_lm.cli import main

    r = bench_penalty("quickstart", table_gb=0.002, workdir=tmp_path, turns=1, prefill=(8,), decode=(1,), new_tokens=2,
                      tiers=("ram", "ssd"), cold=False, offline=(3, 4, 8, 2), shape=scaled_down(get_shape("quickstart")))  # fmt: skip
    assert "offline-3" in r["workloads"] and r["new_tokens"] == 2  # the decode workload's, not the offline batch's
    for config, works in r["warm"].items():
        assert works["offline-3"]["tok_s"] > 0 and ("penalty" in works["offline-3"]) == (config != "none")
    assert main(["bench", "penalty", "--offline", "8,16,64", "--workdir", str(tmp_path)]) != 0
    assert "SEQUENCES,LOW,HIGH,WAVE, four integers" in capsys.readouterr().err
