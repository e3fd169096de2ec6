import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engram_lm.distributed.plan import owner_of, plan_lookup, shard_bounds
from engram_lm.distributed.sharded_table import ShardedTable
from engram_lm.training.optim import SparseRowAdam

from distributed_util import run_ranks


def test_shard_bounds_and_owners_by_hand():
    assert shard_bounds(10, 3) == [0, 3, 6, 10]
    assert owner_of(torch.tensor([0, 2, 3, 5, 6, 9]), [0, 3, 6, 10]).tolist() == [0, 0, 1, 1, 2, 2]
    assert shard_bounds(5, 1) == [0, 5]
    with pytest.raises(ValueError, match="world size"):
        shard_bounds(5, 0)


def test_plan_lookup_by_hand():
    plan = plan_lookup(torch.tensor([[7, 1, 7], [4, 1, 9]]), [0, 3, 6, 10])
    assert plan.unique_U.tolist() == [1, 4, 7, 9]
    assert plan.send_counts == [1, 1, 2] and plan.offsets == [0, 1, 2, 4]
    assert plan.unique_U[plan.inverse_N].tolist() == [7, 1, 7, 4, 1, 9]


def _lookup_and_train(rank, world, steps):
    torch.manual_seed(0)
    full = torch.randn(103, 4)
    table = ShardedTable(103, 4, full[shard_bounds(103, world)[rank] : shard_bounds(103, world)[rank + 1]].clone())
    opt = SparseRowAdam([table.weight], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    looked = []
    for _ in range(steps):
        rows = torch.randint(0, 103, (world, 6, 3), generator=gen)  # the global batch
        target = torch.randn(world, 6, 3, 4, generator=gen)
        out = table(rows[rank])
        looked.append(out.detach())
        (F.mse_loss(out, target[rank], reduction="sum") / world).backward()
        opt.step()
        opt.zero_grad()
    return {"looked": looked, "shard": table.weight.detach(), "bounds": table.bounds, "bytes": table.bytes_sent}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_lookup_and_updates_equal_unsharded(tmp_path, world):
    results = run_ranks(world, _lookup_and_train, tmp_path, 4)
    torch.manual_seed(0)
    full = torch.nn.Parameter(torch.randn(103, 4))
    opt = SparseRowAdam([full], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        rows = torch.randint(0, 103, (world, 6, 3), generator=gen)
        target = torch.randn(world, 6, 3, 4, generator=gen)
        out = F.embedding(rows, full, sparse=True)
        for r in range(world):
            assert torch.equal(results[r]["looked"][step], out[r].detach())
        (F.mse_loss(out, target, reduction="sum") / world).backward()
        opt.step()
        opt.zero_grad()
    gathered = torch.cat([r["shard"] for r in results])
    assert torch.allclose(gathered, full.detach(), atol=1e-6)
    sizes = [r["shard"].shape[0] for r in results]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103  # ~1/P of the rows each
    assert all(r["bytes"] > 0 for r in results)  # rows and gradients crossed between ranks


_THREADS_AFTER_DESTROY = """
import os, sys, torch, torch.distributed as dist
from engram_lm.distributed.context import init_process_group
init = dist.init_process_group if sys.argv[2] == "torch" else init_process_group
init("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)  # imports torch._dynamo, as every optimizer does
dist.destroy_process_group()
print(sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc (Linux)")
def test_destroying_the_group_stops_gloos_threads_after_an_optimizer_was_built(tmp_path):
    """Threads left running after destroy_process_group free tensors during interpreter exit: SIGABRT in ~1 of
    10 two-rank runs (the CI failure this fixes). Our init imports torch._dynamo first so destroy joins them."""

    def threads(which):
        run = subprocess.run([sys.executable, "-c", _THREADS_AFTER_DESTROY, str(tmp_path / f"init-{which}"), which],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return run.stdout

    assert "gloo" not in threads("ours")
    assert "pt_gloo_runloop" in threads("torch"), "torch no longer leaks the group: init_process_group's import can go"


# ---- data-parallel training with sharded tables ------------------------------------------
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from engram_lm.models.config import ModelConfig  # noqa: E402
from engram_lm.models.transformer import EngramLM  # noqa: E402
from engram_lm.recipes import get_recipe  # noqa: E402
from engram_lm.checkpoint import store as ckpt_io  # noqa: E402
from engram_lm.training.loop import train  # noqa: E402


def _tiny(batch=12, steps=6):
    # Equivalence is checked in float64 with AdamW for the matrices. In fp32 a split
    # gradient sum differs from the whole one by ~1e-7; torch's Muon orthogonalises in bf16
    # and turns that into rounding flips (measured: 3.5e-5 relative loss gap by step 4), and
    # Adam's per-element normalisation amplifies it on near-cancelling table gradients
    # (rows up to 4e-3 apart). In float64 the gaps are 4e-15 (loss) and 2e-11 (rows).
    model_cfg, train_cfg = get_recipe("tiny")
    return model_cfg, train_cfg.with_(batch_size=batch, steps=steps, save_every=3, eval_every=3, matrix_optimizer="adamw")


def _train_in_ranks(rank, world, out, batch, steps, dtype=torch.float64):
    torch.set_default_dtype(dtype)
    model_cfg, train_cfg = _tiny(batch, steps)
    r = train(model_cfg, train_cfg, Path(out), progress=False)
    return {"val_loss": r.val_loss, "counts": r.counts}


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _tables(ckpt: Path) -> dict[str, torch.Tensor]:
    state = ckpt_io.read_state(ckpt)
    return {n: ckpt_io.read_table_rows(state, n, 0, s["rows"]) for n, s in state["tables"].items()}


def _one_rank(out: Path, dtype) -> Path:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model_cfg, train_cfg = _tiny()
        train(model_cfg, train_cfg, out, progress=False)
    finally:
        torch.set_default_dtype(previous)
    return out


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    return _one_rank(tmp_path_factory.mktemp("one"), torch.float64)


def test_two_ranks_match_one_rank(tmp_path, one_rank_run):
    results = run_ranks(2, _train_in_ranks, tmp_path, str(tmp_path / "two"), 12, 6)
    one, two = _losses(one_rank_run), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, two)), (one, two)
    t1, t2 = _tables(ckpt_io.latest_checkpoint(one_rank_run)), _tables(ckpt_io.latest_checkpoint(tmp_path / "two"))
    for name in t1:
        assert (t1[name] - t2[name]).abs().max() <= 1e-6
    state = ckpt_io.read_state(ckpt_io.latest_checkpoint(tmp_path / "two"))
    ((name, ranges),) = state["table_shard_ranges"].items()
    rows = state["tables"][name]["rows"]
    assert len(ranges) == 2 and all(abs((hi - lo) - rows / 2) <= 1 for lo, hi in ranges)  # ~1/P each
    assert results[0]["counts"] == results[1]["counts"]  # counts the whole table on every rank


def test_two_ranks_match_one_rank_losses_in_fp32(tmp_path):
    one = _losses(_one_rank(tmp_path / "one32", torch.float32))
    run_ranks(2, _train_in_ranks, tmp_path, str(tmp_path / "two32"), 12, 6, torch.float32)
    two = _losses(tmp_path / "two32")
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, two)), (one, two)


def _reshard(rank, world, src, dst):
    state = ckpt_io.read_state(Path(src))
    cfg = ModelConfig.from_dict(state["model_config"])
    cfg = cfg.with_(engram=cfg.engram.with_(tokenizer=str(Path(state["path"]) / "tokenizer.json")))
    from engram_lm.distributed.context import DistContext, shard_tables
    from engram_lm.training.optim import OptimConfig, build_optimizers

    ctx = DistContext.from_env()
    model = EngramLM(cfg)
    shard_tables(model, ctx)
    optimizers = build_optimizers(model, OptimConfig(lr=1e-3))
    ckpt_io.load_model_state(model, state, model.hasher.layout.fingerprint)
    ckpt_io.load_optimizers(model, optimizers, state)
    extra = {k: state[k] for k in ("fingerprint", "model_config", "train_config", "name", "corpus")}
    ckpt_io.save_checkpoint(Path(dst), state["step"], model, optimizers, extra, Path(state["path"]) / "tokenizer.json",
                            rank=ctx.rank, world_size=ctx.world_size)  # fmt: skip
    return True


def test_reshard_two_three_one_round_trip_is_lossless(tmp_path):
    run_ranks(2, _train_in_ranks, tmp_path, str(tmp_path / "two"), 12, 3, torch.float32)
    src = ckpt_io.latest_checkpoint(tmp_path / "two")
    run_ranks(3, _reshard, tmp_path, str(src), str(tmp_path / "three"))
    three = ckpt_io.latest_checkpoint(tmp_path / "three")
    assert len(ckpt_io.read_state(three)["table_shard_ranges"]["blocks.1.engram.memory.weight"]) == 3
    _reshard(0, 1, str(three), str(tmp_path / "one"))  # back to a single process
    one = ckpt_io.latest_checkpoint(tmp_path / "one")
    for ckpt in (three, one):
        a, b = _tables(src), _tables(ckpt)
        assert all(torch.equal(a[n], b[n]) for n in a)
        sa, sb = ckpt_io.read_state(src), ckpt_io.read_state(ckpt)
        for key in ("exp_avg", "exp_avg_sq"):
            ma = ckpt_io.read_table_rows(sa, "blocks.1.engram.memory.weight", 0, sa["tables"]["blocks.1.engram.memory.weight"]["rows"], key)
            mb = ckpt_io.read_table_rows(sb, "blocks.1.engram.memory.weight", 0, sb["tables"]["blocks.1.engram.memory.weight"]["rows"], key)
            assert torch.equal(ma, mb)
    from engram_lm.inference.loading import load_trained

    load_trained(one)  # a single process loads the resharded checkpoint


def test_world_size_must_divide_the_batch(tmp_path):
    with pytest.raises(AssertionError, match="does not divide over 3 ranks"):
        run_ranks(3, _train_in_ranks, tmp_path, str(tmp_path / "bad"), 8, 2)


def test_missing_or_foreign_shard_is_refused(tmp_path, one_rank_run):
    run_ranks(2, _train_in_ranks, tmp_path, str(tmp_path / "two"), 12, 3, torch.float32)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "two")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "table-shard-001.safetensors").unlink()
    from engram_lm.inference.loading import load_trained

    with pytest.raises(ValueError, match="lacks table-shard-001"):
        load_trained(broken)
    shutil.copy(ckpt_io.latest_checkpoint(one_rank_run) / "table-shard-000.safetensors", broken / "table-shard-001.safetensors")
    with pytest.raises(ValueError, match="belongs to another checkpoint"):
        load_trained(broken)


def test_bench_distributed_reports_bytes_between_ranks():
    from engram_lm.bench.distributed import bench_distributed

    r = bench_distributed(worlds=(1, 2), rows=4096, dim=8, batch=2, seq=16, columns=4, steps=2)
    one, two = r["configs"]
    assert one["bytes_sent_per_rank"] == 0 and two["bytes_sent_per_rank"] > 0
    assert r["unsharded_step_ms"] > 0 and two["step_ms"] > 0


# ---- gradient exchange when ranks miss different parameters -------------------------------
def _reduce_with_holes(rank, world):
    from engram_lm.distributed.context import DistContext, all_reduce_dense_grads

    # four same-shaped "experts": rank 0 has no gradient for 1, rank 1 none for 2, nobody for 3
    params = [torch.nn.Parameter(torch.zeros(2, 3)) for _ in range(4)]
    missing = {0: {1, 3}, 1: {2, 3}}[rank]
    for i, p in enumerate(params):
        if i not in missing:
            p.grad = torch.full((2, 3), float(10 * (rank + 1) + i))
    table = torch.nn.Parameter(torch.zeros(5, 2))  # a replicated table with a sparse gradient
    torch.nn.functional.embedding(torch.tensor([rank]), table, sparse=True).sum().backward()
    all_reduce_dense_grads(params + [table], DistContext(rank, world, rank))
    return [None if p.grad is None else p.grad.clone() for p in params] + [table.grad]


def test_gradient_exchange_lines_up_when_ranks_miss_different_parameters(tmp_path):
    results = run_ranks(2, _reduce_with_holes, tmp_path)
    for grads in results:
        assert torch.equal(grads[0], torch.full((2, 3), 10.0 + 20.0))
        assert torch.equal(grads[1], torch.full((2, 3), 21.0))  # only rank 1 had it: not summed into expert 2
        assert torch.equal(grads[2], torch.full((2, 3), 12.0))
        assert grads[3] is None  # no rank had it: the optimizers skip it, as in one process
        assert torch.equal(grads[4], torch.tensor([[1.0, 1.0], [1.0, 1.0], [0, 0], [0, 0], [0, 0]]))


def _tiny_default(rank, world, out):
    model_cfg, train_cfg = get_recipe("tiny")
    r = train(model_cfg, train_cfg.with_(steps=30, eval_every=30), Path(out), progress=False)
    return r.val_loss


def test_tiny_preset_trains_30_steps_on_two_ranks(tmp_path):
    # the README's torchrun command: with 4 experts and 2 ranks, experts go without tokens
    losses = run_ranks(2, _tiny_default, tmp_path, str(tmp_path / "t02"))
    assert losses[0] == losses[1] and losses[0] == losses[0]  # identical on both ranks, finite
    assert len(_losses(tmp_path / "t02")) == 30
