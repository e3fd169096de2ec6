"""CUDA paths of the memory tiers; skipped without a GPU (run by benchmarks/gpu_check.sh)."""

import pytest
import torch

from engram_lm.memory.cache import CachedTable
from engram_lm.memory.codec import encode_rows
from engram_lm.memory.dense import DenseTable
from engram_lm.memory.host import HostTable, MmapTable
from engram_lm.memory.prefetch import PrefetchingTable
from engram_lm.memory.tiered import TieredTable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_pinned_host_and_side_stream_prefetch_match_the_device_table(tmp_path):
    torch.manual_seed(0)
    dense = DenseTable(5000, 64).cuda()
    weight = dense.weight.detach().cpu()
    path = tmp_path / "t.bin"
    path.write_bytes(encode_rows(weight, "fp32").tobytes())
    ram = HostTable(weight, device="cuda")
    assert ram.weight_host.is_pinned()
    tiers = [ram, PrefetchingTable(HostTable(weight, device="cuda"), device="cuda", policy="always"),
             PrefetchingTable(MmapTable(path, 5000, 64, "fp32", device="cuda"), device="cuda", policy="always"),
             PrefetchingTable(CachedTable(MmapTable(path, 5000, 64, "fp32"), 512, device="cuda", admit_after=1),
                              device="cuda", policy="always"),
             TieredTable(path, 5000, 64, "fp32", budget_bytes=300 * 256, device="cuda"),  # evicts as it goes
             PrefetchingTable(TieredTable(path, 5000, 64, "fp32", budget_bytes=1 << 20), device="cuda", policy="always")]  # fmt: skip
    for _ in range(5):
        rows = torch.randint(0, 5000, (4, 33, 8), device="cuda")
        want = dense(rows)
        for table in tiers:
            table.prefetch(rows)
            got = table(rows)
            assert got.device.type == "cuda" and torch.equal(got, want)


def test_an_offloaded_qwen4_table_with_prefetch_gives_the_in_memory_logits_on_cuda(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_offload import EOS, tiny_qwen4  # tests/ is on sys.path (pytest's prepend import mode)

    from engram_lm.hf.offload import offload_tables

    model = tiny_qwen4().cuda()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1)).cuda()
    ids[0, 7] = EOS
    with torch.no_grad():
        want = model(ids).logits
    offload_tables(model, tier="tiered", dir=tmp_path / "tables", prefetch=True)
    with torch.no_grad():
        got = model(ids).logits
    assert got.device.type == "cuda" and torch.allclose(got, want, rtol=1e-5, atol=1e-5)  # MoE sums may reorder on GPU
    assert model.model.layers[0].ple.ple_embedding.ngram_embedding.stats()["prefetch_hits"] >= 1
