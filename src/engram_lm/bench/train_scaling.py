"""`engram bench train-scaling`: does a training step cost more when the table is bigger?

One model (the quickstart backbone with one Engram layer, head dim 8 to keep a 64 M-slot
table and its Adam moments within a laptop's memory) is built with each table size in
turn and trained for a few steps on the same batches; the median step time (forward,
backward, all optimizers, balancing) is reported, and the ratio largest/smallest.
Row updates are sparse, so the ratio should stay near 1 (target <= 1.1).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from engram_lm.config import EngramConfig
from engram_lm.models.transformer import EngramLM
from engram_lm.recipes import quickstart_moe
from engram_lm.training.allocator import keep_large_buffers_on_heap
from engram_lm.training.optim import OptimConfig, build_optimizers

HEAD_DIM, HEADS, MAX_NGRAM = 8, 4, 3


def _model_config(slots: int):
    base, _ = quickstart_moe()
    columns = HEADS * (MAX_NGRAM - 1)
    engram = EngramConfig(tokenizer=f"identity:{base.vocab_size}", table_sizes=(slots // columns,) * (MAX_NGRAM - 1),
                          max_ngram=MAX_NGRAM, num_heads=HEADS, layer_ids=(1,), pad_id=0,
                          embed_per_ngram=HEADS * HEAD_DIM)  # fmt: skip
    return base.with_(engram=engram)


def _time_steps(slots: int, batches, warmup: int) -> dict:
    torch.manual_seed(0)
    model = EngramLM(_model_config(slots))
    optimizers = build_optimizers(model, OptimConfig(lr=1e-3))
    times, rows_touched = [], 0
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        grad = model.blocks[1].engram.memory.weight.grad
        rows_touched = int(grad.coalesce().indices().shape[1])
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.update_route_biases()
        if i >= warmup:  # the first steps allocate optimizer state
            times.append(time.perf_counter() - t0)
    table = model.blocks[1].engram.memory.weight
    result = {"slots": table.shape[0], "table_gb": table.numel() * 4 / 1e9, "step_ms": 1e3 * statistics.median(times),
              "rows_touched": rows_touched}  # fmt: skip
    del model, optimizers
    gc.collect()
    return result


def bench_train_scaling(slots: list[int], steps: int = 20, warmup: int = 3, batch: int = 16, seq: int = 128) -> dict:
    allocator_tuned = keep_large_buffers_on_heap()  # see training/allocator.py
    vocab = quickstart_moe()[0].vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        (x := torch.randint(1, vocab, (batch, seq), generator=gen), torch.roll(x, -1, dims=1))
        for _ in range(steps + warmup)
    ]
    configs = [_time_steps(s, batches, warmup) for s in slots]
    return {"batch": batch, "seq": seq, "steps": steps, "head_dim": HEAD_DIM, "configs": configs,
            "ratio": configs[-1]["step_ms"] / configs[0]["step_ms"], "torch_threads": torch.get_num_threads(),
            "allocator_tuned": allocator_tuned}  # fmt: skip
