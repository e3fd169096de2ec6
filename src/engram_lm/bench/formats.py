"""`engram bench formats`: what each row format costs and buys, on a trained model's own tables.

For a trained engram-lm run (`--checkpoint`) or a retrofitted Hugging Face model (`--retrofit`,
an `engram retrofit` run folder), per format (fp32, bf16, fp8, int8, int4):
    bytes per row, rows a GB of budget holds,
    the hit rate of a tiered tier whose budget is `budget_fraction` of the fp32 table, on the
        model's own held-out text (the rows its hasher asks for, call by call), and
    quality: the held-out loss increase and the next-token KL with every table through the format
        (memory/quality.py, the export gate's numbers).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from engram_lm.memory.codec import DTYPES, encode_rows, row_bytes
from engram_lm.memory.quality import tables_cost
from engram_lm.memory.tiered import TieredTable


def hit_rate(weight: torch.Tensor, dtype: str, budget_bytes: int, row_calls: list[torch.Tensor], folder: Path) -> float:
    """The tiered tier's hit rate over the calls, its rows stored as `dtype` under `budget_bytes`."""
    path = folder / f"{dtype}.bin"
    with path.open("wb") as f:
        for a in range(0, weight.shape[0], 1 << 16):
            f.write(encode_rows(weight[a : a + (1 << 16)], dtype).tobytes())
    table = TieredTable(path, weight.shape[0], weight.shape[1], dtype, budget_bytes=max(budget_bytes, row_bytes(dtype, weight.shape[1])))
    for rows in row_calls:
        table.gather_host(rows)
    rate = table.hit_rate
    table.close()
    path.unlink()
    return rate


def bench_formats(*, checkpoint: str | None = None, retrofit: str | None = None, batches: int = 8,
                  budget_fraction: float = 0.1, dtypes: tuple[str, ...] = DTYPES) -> dict[str, Any]:  # fmt: skip
    if (checkpoint is None) == (retrofit is None):
        raise ValueError("give --checkpoint (an engram-lm run) or --retrofit (an engram retrofit run folder), one of them")
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"--budget-fraction {budget_fraction}: give a share of the fp32 table in (0, 1]")
    tables, logits_of, windows, calls, name = (_engram_lm(checkpoint, batches) if checkpoint else _retrofit(retrofit, batches))
    weight = tables[0].weight.detach().float().cpu()  # the first Engram layer's table: its hit rates
    budget = int(budget_fraction * weight.numel() * 4)
    out: dict[str, Any] = {"model": name, "table_rows": weight.shape[0], "dim": weight.shape[1], "tables": len(tables),
                           "budget_bytes": budget, "budget_fraction": budget_fraction, "formats": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            cost = tables_cost(tables, logits_of, windows, dtype)
            out["formats"][dtype] = {"bytes_per_row": row_bytes(dtype, weight.shape[1]),
                                     "rows_per_gb": int(1e9 // row_bytes(dtype, weight.shape[1])),
                                     "hit_rate": hit_rate(weight, dtype, budget, calls, Path(tmp)), **cost.to_dict()}  # fmt: skip
    return out


def _engram_lm(checkpoint: str, batches: int):
    from engram_lm.inference.loading import load_trained
    from engram_lm.training.config import TrainConfig
    from engram_lm.training.data import eval_windows, prepare_data

    model, state = load_trained(checkpoint)
    train = TrainConfig.from_dict(state["train_config"])
    data = prepare_data(state["corpus"], str(Path(state["path"]) / "tokenizer.json"))
    windows = eval_windows(data.val, train.batch_size, train.seq_len, batches)
    calls = [model.hasher.hash_all(x, eod_id=model.config.eod_id, global_rows=True)[0] for x, _ in windows]  # layer 1st
    tables = [b.engram.memory for b in model.blocks if b.engram is not None]
    return tables, (lambda x: model(x)[0]), windows, calls, f"engram-lm {state['path']}"


def _retrofit(run: str, batches: int):
    from engram_lm.hf.families import causal_lm
    from engram_lm.hf.train import RetrofitConfig, load_retrofit_run
    from engram_lm.training.data import eval_windows, prepare_data

    model, result = load_retrofit_run(run)
    cfg = RetrofitConfig(**{k: v for k, v in result["config"].items() if k in RetrofitConfig.__dataclass_fields__})
    data = prepare_data(cfg.data, str(Path(result["model"]) / "tokenizer.json"))
    windows = eval_windows(data.val, cfg.batch_size, cfg.seq_len, batches)
    retrofit = causal_lm(model).engram
    calls = [retrofit.hasher.hash_all(x, eod_id=retrofit.eod_id, global_rows=True)[0] for x, _ in windows]  # layer 1st
    tables = [retrofit.engrams[str(k)].memory for k in retrofit.hasher.layout.layer_ids]
    return tables, (lambda x: model(input_ids=x, use_cache=False).logits), windows, calls, f"retrofit {run} on {result['model']}"
