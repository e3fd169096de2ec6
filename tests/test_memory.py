import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from engram_lm.inference.generate import SamplingConfig, generate
from engram_lm.inference.loading import load_for_inference
from engram_lm.memory.cache import CachedTable
from engram_lm.memory.codec import decode_rows, encode_rows, row_bytes
from engram_lm.memory.dense import DenseTable
from engram_lm.memory.export import export_memory, open_exported
from engram_lm.memory.host import HostTable, MmapTable
from engram_lm.memory.prefetch import PrefetchingTable
from engram_lm.memory.tiered import TieredTable
from engram_lm.recipes import get_recipe
from engram_lm.training.loop import train


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-mem")
    model_cfg, train_cfg = get_recipe("tiny")
    train(model_cfg, train_cfg.with_(steps=4), out, progress=False)
    return out


def test_fp8_hand_value_and_bf16_fp32_round_trips():
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    raw = encode_rows(x, "fp8")
    assert raw.shape == (1, 33) and raw[0, 0] == 0x78 and raw[0, 32] == 119  # 1.0 = 256 * 2**-8
    y = torch.randn(5, 40)
    assert torch.equal(decode_rows(encode_rows(y, "fp32"), "fp32", 40), y)
    assert torch.equal(decode_rows(encode_rows(y, "bf16"), "bf16", 40), y.to(torch.bfloat16).float())
    assert row_bytes("fp8", 40) == 42 and row_bytes("bf16", 40) == 80


def test_fp8_round_trip_within_format_error():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 2, 64).unsqueeze(1)
    y = decode_rows(encode_rows(x, "fp8"), "fp8", 256)
    blocks = x.view(64, 8, 32).abs().amax(-1)
    scale = torch.pow(2.0, torch.ceil(torch.log2(blocks / 448))).repeat_interleave(32, 1)
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10)
    assert ((x - y).abs() <= bound + 1e-12).all()


def _tiers(weight, tmp_path, dtype="fp32"):
    path = tmp_path / "t.bin"
    path.write_bytes(encode_rows(weight, dtype).tobytes())
    mmap = lambda: MmapTable(path, *weight.shape, dtype)  # noqa: E731
    return {
        "ram": HostTable(weight),
        "mmap": mmap(),
        "mmap+cache": CachedTable(mmap(), 8, admit_after=1),
        "mmap+prefetch": PrefetchingTable(mmap(), policy="always"),
        "mmap+prefetch+cache": PrefetchingTable(CachedTable(mmap(), 8, admit_after=1), policy="always"),
        "tiered": TieredTable(path, *weight.shape, dtype, budget_bytes=12 * row_bytes(dtype, weight.shape[1])),
        "tiered+prefetch": PrefetchingTable(TieredTable(path, *weight.shape, dtype, budget_bytes=1 << 20), policy="always"),
    }


def test_every_tier_returns_the_device_rows(tmp_path):
    torch.manual_seed(0)
    dense = DenseTable(50, 6)
    tiers = _tiers(dense.weight.detach(), tmp_path)
    for step in range(4):
        rows = torch.randint(0, 50, (3, 7, 2))
        want = dense(rows)
        for name, table in tiers.items():
            table.prefetch(rows)
            assert torch.equal(table(rows), want), (name, step)
    assert tiers["mmap+prefetch"].prefetched == 4 and tiers["mmap+prefetch"].synchronous == 0
    never = PrefetchingTable(HostTable(dense.weight.detach()), policy="never")
    rows = torch.tensor([1, 2])
    never.prefetch(rows)  # decided synchronous: fetched in forward, and still timed
    assert torch.equal(never(rows), dense(rows)) and (never.synchronous, never.prefetched) == (1, 0)
    assert never.handoff.summary()["rows<2^2"]["sync"] > 0
    with pytest.raises(ValueError, match="prefetch policy"):
        PrefetchingTable(HostTable(dense.weight.detach()), policy="sometimes")


def _drive(policy, n_rows, seconds_per_row, calls):
    """Feed `calls` decisions with the given per-mode cost; returns the modes chosen."""
    chosen = []
    for _ in range(calls):
        mode = policy.choose(n_rows)
        policy.record(n_rows, mode, seconds_per_row[mode] * n_rows)
        chosen.append(mode)
    return chosen


def test_handoff_policy_keeps_the_faster_mode_and_notices_a_change():
    from engram_lm.memory.handoff import HandOffPolicy

    policy = HandOffPolicy(explore=2, window=3, recheck_every=8)
    chosen = _drive(policy, 12_000, {"sync": 3e-6, "async": 1e-6}, 24)  # cold: the hand-off hides reads
    assert chosen[:4] == ["sync", "async", "sync", "async"]  # both modes measured first
    assert chosen[4:] == ["sync" if (i + 5) % 8 == 0 else "async" for i in range(20)]  # rechecks: calls 8, 16, 24
    assert policy.best(12_000) == "async"
    assert policy.best(60) is None  # a decode step is another size class, measured on its own
    assert _drive(policy, 60, {"sync": 1e-7, "async": 5e-6}, 12)[4:].count("async") == 1  # hand-off costs more
    # the page cache warms up: the synchronous gather becomes faster; a recheck finds out
    later = _drive(policy, 12_000, {"sync": 1e-7, "async": 1e-6}, 40)
    assert later[-8:].count("sync") == 7
    assert set(policy.summary()) == {"rows<2^14", "rows<2^6"}
    assert _drive(HandOffPolicy(), 500, {"sync": 1e-6, "async": 0.99e-6}, 10)[4:] == ["sync"] * 6  # a tie: no thread
    with pytest.raises(ValueError, match="mode"):
        policy.record(5, "maybe", 1.0)


def test_cache_admission_eviction_and_counters():
    weight = torch.arange(20.0).unsqueeze(1).repeat(1, 2)
    cache = CachedTable(HostTable(weight), 2, admit_after=2)
    cache(torch.tensor([1, 1, 2]))  # first sight: counters 1, nothing admitted
    assert (cache.hits, cache.misses) == (0, 3) and (cache.row_in < 0).all()
    cache(torch.tensor([1, 2]))  # second sight: both admitted
    assert sorted(cache.row_in.tolist()) == [1, 2]
    out = cache(torch.tensor([2, 1, 1]))
    assert torch.equal(out[:, 0], torch.tensor([2.0, 1.0, 1.0]))
    assert cache.hits == 3 and cache.hit_rate == pytest.approx(3 / 8)
    cache(torch.tensor([1]))  # counters count calls that read a row: freq(1)=4, freq(2)=3
    cache(torch.tensor([5]))
    cache(torch.tensor([5]))  # freq(5)=2: not worth a slot
    assert sorted(cache.row_in.tolist()) == [1, 2]
    for _ in range(3):
        cache(torch.tensor([5]))  # freq(5)=5 > freq(2)=3: replaces the least frequent slot
    assert sorted(cache.row_in.tolist()) == [1, 5]
    assert cache.slot_of[2] == -1
    with pytest.raises(ValueError, match=">= 1 row"):
        CachedTable(HostTable(weight), 0)


def test_background_failure_reaches_the_caller_without_hanging():
    class Broken(HostTable):
        def gather_host(self, rows):
            raise OSError("disk went away")

    table = PrefetchingTable(Broken(torch.zeros(4, 2)), policy="always")
    rows = torch.tensor([1, 2])
    table.prefetch(rows)
    with pytest.raises(OSError, match="disk went away"):
        table(rows)
    with pytest.raises(OSError, match="disk went away"):
        table(torch.tensor([3]))  # the synchronous path fails loudly too


def test_export_round_trip_and_manifest_checks(tiny_ckpt, tmp_path):
    manifest = export_memory(tiny_ckpt, tmp_path / "bf16", "bf16")
    ((layer, entry),) = manifest["layers"].items()
    model, state = load_for_inference(tiny_ckpt)
    dense = model.blocks[int(layer)].engram.memory
    table = open_exported(tmp_path / "bf16", int(layer), dense.num_rows, dense.dim, state["fingerprint"], verify=True)
    rows = torch.arange(0, dense.num_rows, 97)
    assert torch.equal(table(rows), dense(rows).to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="have layout"):
        open_exported(tmp_path / "bf16", int(layer), dense.num_rows, dense.dim, "0000000000000000")
    with pytest.raises(ValueError, match="expects"):
        open_exported(tmp_path / "bf16", int(layer), dense.num_rows + 1, dense.dim, state["fingerprint"])
    bin_path = tmp_path / "bf16" / entry["file"]
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="re-export"):
        open_exported(tmp_path / "bf16", int(layer), dense.num_rows, dense.dim, state["fingerprint"])
    bin_path.write_bytes(data[:-2] + b"\x00\x01")
    with pytest.raises(ValueError, match="checksum"):
        open_exported(tmp_path / "bf16", int(layer), dense.num_rows, dense.dim, state["fingerprint"], verify=True)
    m = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    m["dtype"] = "int3"
    (tmp_path / "bf16" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="unknown dtype"):
        open_exported(tmp_path / "bf16", int(layer), dense.num_rows, dense.dim, state["fingerprint"])
    shutil.rmtree(tmp_path / "bf16")
    with pytest.raises(ValueError, match="no manifest.json"):
        open_exported(tmp_path / "bf16", int(layer), dense.num_rows, dense.dim, state["fingerprint"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(memory="ram"), dict(memory="mmap"), dict(memory="mmap", prefetch=True),
     dict(memory="mmap", prefetch=True, cache_rows=64), dict(memory="ram", cache_rows=1), dict(memory="tiered"),
     dict(memory="tiered", memory_budget="4K", prefetch=True)],
)  # fmt: skip
def test_generation_is_identical_on_every_memory_tier(tiny_ckpt, kwargs, monkeypatch):
    prompts = [[17, 250, 31, 9], [5, 6, 7, 8], [100, 3]]
    cfg = SamplingConfig(max_new_tokens=8)
    reference, _ = load_for_inference(tiny_ckpt)
    model, _ = load_for_inference(tiny_ckpt, **kwargs)
    assert generate(model, prompts, cfg) == generate(reference, prompts, cfg)
    ids = torch.tensor([[17, 250, 31, 9, 44, 45]])
    assert torch.equal(model(ids)[0], reference(ids)[0])  # prefetched == synchronous, bit for bit
    if kwargs.get("prefetch"):  # the adaptive policy has tried the background path too
        assert model.blocks[1].engram.memory.prefetched > 0


def test_bad_memory_requests(tiny_ckpt):
    with pytest.raises(ValueError, match="unknown memory tier"):
        load_for_inference(tiny_ckpt, memory="tape")
    with pytest.raises(ValueError, match=">= 1 row"):
        load_for_inference(tiny_ckpt, cache_rows=-1)
    with pytest.raises(ValueError, match="applies to --memory tiered, not 'mmap'"):
        load_for_inference(tiny_ckpt, memory="mmap", memory_budget="1G")
    model, _ = load_for_inference(tiny_ckpt, memory="tiered", memory_budget="64K")  # shared by the layers, by size
    budgets = [b.engram.memory.placement()["budget_bytes"] for b in model.blocks if b.engram is not None]
    assert (64 << 10) - 4096 < sum(budgets) <= 64 << 10  # whole rows of the 64 KiB (the rows are < 4 KiB)


@pytest.mark.parametrize("engine", ["aio", "threads"])
@pytest.mark.parametrize("dtype, dim", [("fp32", 32), ("bf16", 48), ("fp8", 32)])
def test_ssd_tier_reads_the_same_rows_as_the_mmap_tier(tmp_path, dtype, dim, engine):
    from engram_lm.memory.codec import encode_rows, row_bytes
    from engram_lm.memory.host import MmapTable
    from engram_lm.memory.ssd import BLOCK, SsdTable

    if engine == "aio":
        from engram_lm.memory.aio import _Aio

        try:
            _Aio(4).close()
        except OSError as e:
            pytest.skip(f"native AIO is unavailable here ({e}); the threads engine is tested")
    torch.manual_seed(0)
    weight = torch.randn(3001, dim)
    path = tmp_path / "layer.bin"
    encode_rows(weight, dtype).tofile(path)
    mm, ssd = MmapTable(path, 3001, dim, dtype), SsdTable(path, 3001, dim, dtype, queue_depth=8, engine=engine)
    assert ssd.placement()["engine"] == engine
    rows = torch.randint(0, 3001, (4, 50, 6))
    rows[0, 0, :] = 3000  # the last row: a read that ends at the end of the file
    assert torch.equal(ssd(rows), mm(rows))
    # rows sharing a block cost one read; a row never costs more than the blocks it spans
    per_block = BLOCK // row_bytes(dtype, dim)
    ssd.blocks_read = 0
    ssd(torch.arange(0, max(per_block, 1)).view(1, 1, -1))
    assert ssd.blocks_read <= 2
    with pytest.raises(ValueError, match="expected"):
        SsdTable(path, 3002, dim, dtype)
    big = ssd(torch.arange(3001).view(1, -1, 1))  # more requests than the queue holds
    assert torch.equal(big, mm(torch.arange(3001).view(1, -1, 1)))
    os.truncate(path, path.stat().st_size // 2)  # the file shrinks under an open table
    with pytest.raises(OSError, match=f"short read from {path}"):
        ssd(torch.tensor([[[3000]]]))
    ssd.close()


def test_reference_read_rate_is_measured_on_the_file(tmp_path, monkeypatch):
    from engram_lm.bench.offload import reference_iops

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(64 * 4096))
    monkeypatch.setattr("shutil.which", lambda name: None)  # without fio: the project's own block reader
    ref = reference_iops(path, reads=64, queue_depth=4)
    assert ref["qd1_iops"] > 0 and ref["qd32_iops"] > 0 and "engram-lm" in ref["tool"]


def test_offload_bench_reports_every_config_warm_and_cold_with_its_checks(tmp_path):
    from engram_lm.bench.offload import TIERS, VARIANTS, bench_offload

    r = bench_offload(table_gb=0.004, batch=2, prompt_len=16, new_tokens=2, cache_rows=64, repeats=1, workdir=tmp_path,
                      device_config=True)  # the GPU check's `device` config, here on the CPU  # fmt: skip
    names = {t + v for t in TIERS for v in VARIANTS if not (t == "tiered" and "cache" in v)} | {"device"}
    assert {"tiered", "tiered_prefetch"} <= names
    assert set(r["warm"]) == names and set(r["cold"]) == {n for n in names if n[:3] not in ("ram", "dev")} | {"ram"}
    for state in ("warm", "cold"):
        for c in r[state].values():
            assert c["prefill_tok_s"] > 0 and c["decode_tok_s"] > 0 and c["rows_per_s"] > 0
    assert r["warm"]["ssd_prefetch"]["handed_off"] + r["warm"]["ssd_prefetch"]["synchronous"] > 0
    assert r["reference"]["qd32_iops"] > 0 and 0 <= r["cache"]["hit_rate"] <= 1
    k = r["checks"]
    assert set(k["prefetch_vs_without"]) == {f"{s}/{n}" for s in ("cold", "warm") for n in r[s] if "_prefetch" in n}
    assert k["warm_best_offload"]["name"] in names - {"ram", "device"} and "warm_best_offload_vs_device" in k
    paired = k["paired_warm"]
    assert "ssd_prefetch / ssd" in paired and "mmap_sync / ram" in paired and "ram / ram" not in paired
    assert all(v["ci95"][0] <= v["median"] <= v["ci95"][1] and v["turns"] == 1 for v in paired.values())
    assert list(tmp_path.iterdir()) == []  # the table file is gone


def test_big_table_bench_serves_from_the_file_and_cleans_up(tmp_path):
    from engram_lm.bench.big_table import bench_big_table

    r = bench_big_table(table_gb=0.004, workdir=tmp_path, repeats=1, new_tokens=2, progress=None)
    assert r["table_bytes"] == r["table_rows"] * 32 * 4 and r["placement"]["tier"] == "ssd"
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["rss_bytes_after_serving"] > 0
    assert list(tmp_path.iterdir()) == []
    kept = bench_big_table(table_gb=0.004, workdir=tmp_path, tier="mmap", repeats=1, new_tokens=2, keep=True, progress=None)
    assert Path(kept["path"]).stat().st_size == kept["table_bytes"]
    with pytest.raises(ValueError, match="GB free"):
        bench_big_table(table_gb=1e6, workdir=tmp_path, progress=None)


def test_train_throughput_bench_times_both_placements_with_identical_losses():
    from engram_lm.bench.train_throughput import bench_train_throughput, sized_config

    r = bench_train_throughput(size="cpu", steps=2, warmup=1, device="cpu")
    assert r["same_losses"] and r["host_vs_device_step_ratio"] > 0 and r["device"] == "cpu"
    for m in r["placements"].values():
        assert m["tokens_per_s"] > 0 and m["mfu"] is None and len(m["losses"]) == 3
    cfg, batch, seq = sized_config("gpu")  # the GPU size: counted on the meta device, never built here
    model_flops = r["placements"]["device"]["flops_per_token"]
    assert model_flops > 6 * r["params_active"]  # plus the head and attention
    assert (batch, seq, cfg.dim) == (16, 1024, 1024)
    with pytest.raises(ValueError, match="size"):
        sized_config("phone")


def test_offload_bench_device_config_serves_the_weight_itself(tmp_path):
    from engram_lm.bench.offload import _stack

    weight = torch.randn(40, 8)
    table = _stack("device", weight, tmp_path / "unused.bin", 40, 8, torch.device("cpu"), 4)
    rows = torch.tensor([[3, 39, 3]])
    assert torch.equal(table(rows), weight[rows]) and not table.weight.requires_grad


def test_every_tier_refuses_row_ids_outside_its_table(tmp_path):
    from engram_lm.memory.ssd import SsdTable

    weight = torch.randn(50, 8)
    tiers = _tiers(weight, tmp_path)
    tiers["ssd"] = SsdTable(tmp_path / "t.bin", 50, 8, "fp32")
    tiers["ssd+cache"] = CachedTable(SsdTable(tmp_path / "t.bin", 50, 8, "fp32"), 8, admit_after=1)
    for name, table in tiers.items():
        assert torch.equal(table(torch.tensor([3, 49])), weight[[3, 49]]), name  # the last row is inside
        for bad, shown in (([0, 50], "0..50"), ([-1, 2], "-1..2"), ([10**9], "1000000000..1000000000")):
            with pytest.raises(ValueError, match=f"row ids {shown} fall outside this .* table's 50 rows"):
                table(torch.tensor(bad))
            with pytest.raises(ValueError, match="fall outside"):
                table.prefetch(torch.tensor(bad)) if "prefetch" in name else table(torch.tensor(bad))
        table.close()


@pytest.mark.parametrize("dtype, dim", [("int8", 32), ("int8", 40), ("int4", 32), ("int4", 45), ("int4", 1)])
def test_integer_rows_decode_within_half_a_scale_and_cost_what_they_say(dtype, dim):
    """int8 / int4 with a bf16 scale per 32 columns: every element within max|x| of its group / 254 (int8) or / 14
    (int4); zeros exact; bytes per row as stated."""
    from engram_lm.memory.codec import decode_rows, encode_rows, error_bound, row_bytes

    g = torch.Generator().manual_seed(dim)
    x = torch.randn(200, dim, generator=g) * torch.logspace(-3, 1, 200).unsqueeze(1)  # rows of very different sizes
    x[3] = 0.0
    raw = encode_rows(x, dtype)
    assert raw.shape == (200, row_bytes(dtype, dim)) == (200, (dim if dtype == "int8" else (dim + 1) // 2) + 2 * -(-dim // 32))
    back = decode_rows(raw, dtype, dim)
    assert (back - x).abs().le(error_bound(x, dtype) + 1e-12).all()
    assert torch.equal(back[3], torch.zeros(dim))
    assert (back - x).abs().max() > 0  # lossy, within its bound
    with pytest.raises(ValueError, match="must be finite"):
        encode_rows(torch.tensor([[float("nan")] * dim]), dtype)
