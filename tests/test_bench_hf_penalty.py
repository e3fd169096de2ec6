"""`engram bench penalty --shape gemma4-e2b` (bench/hf_shapes.py, bench/hf_penalty.py): the released
shape, the table served by every tier giving the official forward's logits, a run, a refusal."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from engram_lm.bench.hf_penalty import (HFRunner, bench_hf_penalty, build_hf_model, hf_params, rows_in_memory,  # noqa: E402
                                        served_table, write_rows)
from engram_lm.bench.hf_shapes import GEMMA4_E2B_TEXT, HF_SHAPES, QWEN38_TEXT, gemma4_e2b, hf_scaled_down, qwen38_slice  # noqa: E402
from engram_lm.bench.penalty import Workload, bench_penalty, check_fits_bytes  # noqa: E402

CONFIGS = ["ram", "ram+prefetch", "tiered", "tiered+prefetch", "mmap", "mmap+prefetch", "ssd", "ssd+prefetch"]


def test_gemma4_e2b_is_the_released_text_configuration():
    """google/gemma-4-E2B's text_config (bench/hf_shapes.py cites where it was read): the per-layer table is
    262,144 x (35 layers x 256) = 8,960, the issue's figure; the first 15 layers make keys and values, the
    last 20 reuse them; every fifth layer is full attention."""
    shape = gemma4_e2b()
    config = shape.config()
    assert shape.table_shape == (262_144, 8_960)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (1536, 35, 6144)
    k = shape.kwargs  # the heads' widths: per-layer attributes the built config will not hand out globally
    assert (config.num_attention_heads, config.num_key_value_heads, k["head_dim"], k["global_head_dim"]) == (8, 1, 256, 512)
    assert config.num_kv_shared_layers == 20 and config.layer_types.count("full_attention") == 7
    assert config.layer_types[4] == "full_attention" and config.vocab_size == 262_144 and config.tie_word_embeddings
    assert shape.dtype == torch.bfloat16 and shape.table_dtype == "bf16"
    assert GEMMA4_E2B_TEXT["use_double_wide_mlp"] and HF_SHAPES["gemma4-e2b"] is gemma4_e2b


def test_qwen38_slice_is_the_released_configuration_cut_in_depth_and_experts_only():
    """Its table is the released one (bench real-table's 320,001,536 rows, from the same layout), 160 values a
    row (ple_embed_dim 2560 over 2 orders x 8 heads); only the layers and the experts are cut."""
    from engram_lm.bench.real_table import MODELS

    shape = qwen38_slice()
    assert shape.table_shape == (MODELS["qwen3.8"]["rows"], MODELS["qwen3.8"]["dim"]) == (320_001_536, 160)
    changed = {k for k in QWEN38_TEXT if shape.kwargs[k] != QWEN38_TEXT[k]}
    assert changed == {"num_hidden_layers", "layer_types", "num_experts"}
    assert shape.kwargs["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] and shape.kwargs["ple_layer_ids"] == [2]
    assert shape.config().num_experts_per_tok == 10 and shape.table_file == "qwen3.8-ngram-table-fp8.bin"
    assert 1.9e9 < hf_params(shape) < 1.95e9  # besides the table: it fits this machine in bf16 (3.8 GB)


def test_gemma4_e2b_has_its_published_effective_parameter_count():
    """Google calls E2B "2.3B effective parameters": every weight but the per-layer table (2.35B more)."""
    assert 2.25e9 < hf_params(gemma4_e2b()) < 2.32e9


@pytest.mark.parametrize("make", [gemma4_e2b, qwen38_slice])
def test_every_tier_serves_the_official_forwards_logits(tmp_path, make):
    """The scaled-down model with its table served by each tier (and prefetched) gives the logits of the
    official class with the same rows in its own in-memory embedding; the model without the table differs."""
    shape = hf_scaled_down(make())
    model = build_hf_model(shape)
    served = served_table(model, shape)
    assert served.embedding.weight.device.type == "meta"  # never held
    rows, dim = shape.table_shape
    path = tmp_path / "table.bin"
    write_rows(path, rows, dim, shape.table_dtype)
    official = served.embedding.to_empty(device="cpu")
    official.weight.data.copy_(rows_in_memory(path, rows, dim, shape.table_dtype, torch.float32))
    if served.scale is not None:  # to_empty emptied Gemma's scale buffer too
        official.embed_scale = served.scale.clone()
    ids = torch.randint(0, shape.kwargs["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    runner = HFRunner(model, shape, path, torch.device("cpu"))
    for name in CONFIGS:
        embedding = runner.make_table(name)
        runner.install(embedding)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, msg=name)
        assert runner.placement(embedding)["prefetch_hits"] == (1 if name.endswith("+prefetch") else 0)
        runner.close(embedding)
    runner.install(None)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - expected).abs().max() > 1e-3
    sample = runner.time(Workload("decode", 2, 3), ids)
    assert len(sample["steps"]) == 3 and sample["tokens"] == 6


@pytest.mark.parametrize("make", [gemma4_e2b, qwen38_slice])
def test_the_scaled_down_shape_runs_a_prefill_and_a_decode_through_every_tier_warm_and_cold(tmp_path, make):
    r = bench_hf_penalty(hf_scaled_down(make()), workdir=tmp_path, turns=1, prefill=(16,), decode=(2,), new_tokens=2,
                         offline=(3, 4, 8, 2))  # fmt: skip
    assert list(r["warm"]) == ["none", *CONFIGS] and r["workloads"] == ["prefill-16", "decode-b2", "offline-3"]
    assert all(works["offline-3"]["tok_s"] > 0 for works in r["warm"].values())
    assert sorted(r["cold"]) == sorted(c for c in CONFIGS if not c.startswith("ram"))
    for config, works in r["warm"].items():
        assert works["prefill-16"]["tok_s"] > 0 and ("penalty" in works["decode-b2"]) == (config != "none")
        if config != "none":  # the table layer's wait is measured for every tier, prefetched or not
            assert works["placement"]["waited_ms_per_call"] > 0 and works["placement"]["calls"] > 0
    assert list(tmp_path.iterdir()) == [] and not r["table_file_reused"]  # an unnamed table file is removed


def test_a_named_table_file_is_written_once_kept_and_reused(tmp_path):
    from dataclasses import replace

    shape = replace(hf_scaled_down(qwen38_slice()), table_file="slice.bin")
    run = lambda: bench_hf_penalty(shape, workdir=tmp_path, turns=1, prefill=(8,), decode=(1,), new_tokens=1,  # noqa: E731
                                   tiers=("mmap",), cold=False)  # fmt: skip
    first = run()
    stamp = (tmp_path / "slice.bin").stat().st_mtime_ns
    second = run()
    assert not first["table_file_reused"] and second["table_file_reused"]
    assert (tmp_path / "slice.bin").stat().st_mtime_ns == stamp and [f.name for f in tmp_path.iterdir()] == ["slice.bin"]


def test_gemma4_e2b_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import engram_lm.memory.tiered as tiered

    monkeypatch.setattr(tiered, "available_memory_bytes", lambda: 8 * 10**9)
    with pytest.raises(ValueError, match=r"gemma4-e2b needs 9\.\d GB of memory \(2\.2\dB parameters at 2 bytes \+ a 4\.7 GB "
                                         r"table for the ram tier\), this machine has 8\.0 GB available: --tiers without ram"):  # fmt: skip
        bench_penalty("gemma4-e2b", workdir=tmp_path, tiers=("ram", "ssd"))
    with pytest.raises(ValueError, match=r"the table file needs 4\.7 GB \+ 1 GB free in .* which has 2\.0 GB"):
        check_fits_bytes("gemma4-e2b", 10, 2, 0, 262_144 * 8_960 * 2, tmp_path, memory=10**15, disk=2 * 10**9)
    assert list(tmp_path.iterdir()) == []
