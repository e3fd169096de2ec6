"""Run a function in P gloo processes from pytest (file:// rendezvous, 1 thread each)."""

import os
import pickle
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engram_lm.distributed.context import init_process_group


def _worker(rank, world, init_file, out_dir, fn, args):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    except Exception:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.barrier()  # no rank tears down its connections while others still use them
        dist.destroy_process_group()


def run_ranks(world, fn, tmp_path, *args):
    """fn(rank, world, *args) in `world` processes; returns the list of per-rank results."""
    out = tmp_path / f"ranks-{world}"
    out.mkdir(exist_ok=True)
    init_file = tmp_path / f"init-{world}"
    try:
        mp.spawn(_worker, args=(world, str(init_file), str(out), fn, args), nprocs=world, join=True)
    except Exception as err:  # a rank that failed outside fn (rendezvous, barrier) leaves no .err: say what spawn saw
        errors = [p.read_text() for p in out.glob("*.err")]
        raise AssertionError("\n".join(errors) or f"a rank failed: {err!r}") from None
    results = []
    for r in range(world):
        with open(out / f"{r}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results
