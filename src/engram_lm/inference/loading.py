"""Load a trained model for inference with its Engram tables on a chosen tier.

The model is built on the meta device, so no table is ever allocated twice or
materialised on the compute device when it is meant to live elsewhere; the dense weights
are then read tensor by tensor from the checkpoint and assigned, and each Engram layer gets
its table from the chosen tier:
    device  trainable DenseTable on the compute device (the training layout)
    ram     HostTable in host RAM (pinned with CUDA)
    mmap    MmapTable over exported files (exported on first use next to the checkpoint)
    ssd     SsdTable over the same files: O_DIRECT block reads from a pool of threads
    tiered  TieredTable over the same files: rows held in RAM up to a budget, misses read at depth
optionally behind a hot-row cache (`cache_rows`) and a background prefetcher (`prefetch`); both
are dropped with a note for the device tier, whose rows are already where they are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engram_lm.memory.cache import CachedTable
from engram_lm.memory.dense import DenseTable
from engram_lm.memory.export import check_source, export_memory, open_exported, read_manifest, table_key
from engram_lm.memory.host import HostTable
from engram_lm.memory.prefetch import PrefetchingTable
from engram_lm.memory.table import MemoryTable
from engram_lm.models.config import ModelConfig
from engram_lm.models.transformer import EngramLM
from engram_lm.checkpoint.store import check_fingerprint, read_state, read_table_rows

MEMORY_TIERS = ("device", "ram", "mmap", "ssd", "tiered")
FILE_TIERS = ("mmap", "ssd", "tiered")  # served from an export folder


def load_for_inference(
    checkpoint: str | Path,
    *,
    memory: str = "device",
    cache_rows: int = 0,
    prefetch: bool = False,
    export_dir: Path | None = None,
    export_dtype: str = "fp32",
    device: str | torch.device = "cpu",
    verify: bool = False,
    allow_other_export: bool = False,
    memory_budget: int | str | None = None,
    shared: bool = False,
) -> tuple[EngramLM, dict[str, Any]]:
    """A checkpoint's model for inference; `export_dir` serves tables exported from this
    checkpoint (refused when they came from another one or another step, unless
    `allow_other_export`). `memory_budget` (tier "tiered"): the memory the tables' rows may hold,
    all layers together (default: half the available memory); `shared` (tier "tiered"): those rows in
    one store for every process on the host serving the same export (memory/shared_tiered.py)."""
    if memory not in MEMORY_TIERS:
        raise ValueError(f"unknown memory tier {memory!r}; choose one of {MEMORY_TIERS}")
    if cache_rows < 0:
        raise ValueError(f"cache size must be >= 1 row (or 0 for no cache), got {cache_rows}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch build has no CUDA device; use --device cpu or a CUDA build")
    state = read_state(Path(checkpoint))
    ckpt = Path(state["path"])
    cfg = ModelConfig.from_dict(state["model_config"])
    tokenizer = str(ckpt / "tokenizer.json")  # the checkpoint's own copy: portable across machines
    cfg = cfg.with_(**{k: getattr(cfg, k).with_(tokenizer=tokenizer) for k in ("engram",) if getattr(cfg, k)})
    with torch.device("meta"):
        model = EngramLM(cfg)
    fingerprint = model.hasher.layout.fingerprint if model.hasher else None
    check_fingerprint(ckpt, fingerprint, state.get("fingerprint"))
    table_keys = {table_key(b) for b, block in enumerate(model.blocks) if block.engram is not None}
    if model.overencoding is not None:
        table_keys.add("overencoding.memory.weight")
    _assign_dense_weights(model, ckpt / "model.safetensors", table_keys, device)
    if model.overencoding is not None:  # the input-side table stays with the model
        oe = model.overencoding.memory
        weight = read_table_rows(state, "overencoding.memory.weight", 0, oe.num_rows)
        model.overencoding.memory = _device_table(weight, device)
    if memory == "device":
        cache_rows, prefetch = _nothing_to_fetch_ahead(cache_rows, prefetch)
    manifest = None
    if memory in FILE_TIERS:
        export_dir, manifest = _export_folder(ckpt, export_dir, export_dtype, fingerprint, allow_other_export)
    layers = [layer_id for layer_id, block in enumerate(model.blocks) if block.engram is not None]
    budgets = dict(zip(layers, _budgets(memory, memory_budget, manifest, [model.blocks[i].engram.memory for i in layers])))
    for layer_id in layers:
        block = model.blocks[layer_id]
        table = _make_table(memory, state, export_dir, layer_id, block.engram.memory, fingerprint, device, verify,
                            budgets[layer_id], shared)  # fmt: skip
        block.engram.memory = _fetched_ahead(table, cache_rows, prefetch, device)
    model.init_rope(device)
    return model.eval(), state


def _fetched_ahead(table, cache_rows: int, prefetch: bool, device: torch.device):
    """The table behind a hot-row cache and a background prefetcher, where asked."""
    if cache_rows:
        table = CachedTable(table, cache_rows, device=device)
    return PrefetchingTable(table, device=device) if prefetch else table


def _nothing_to_fetch_ahead(cache_rows: int, prefetch: bool) -> tuple[int, bool]:
    """The device tier's rows are on the compute device already: a hot-row cache or a prefetcher
    in front of it could only add copies. Said once on stderr; the model runs without them."""
    import sys

    for flag, asked in (("--cache-rows", cache_rows), ("--prefetch", prefetch)):
        if asked:
            print(f"note: {flag} does nothing with --memory device (the tables are on the compute device already); "
                  f"running without it. It helps the ram, mmap, ssd and tiered tiers", file=sys.stderr)  # fmt: skip
    return 0, False


def _export_folder(ckpt: Path, export_dir: Path | None, export_dtype: str, fingerprint: str | None,
                   allow_other_export: bool) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """The export the file tiers serve (written next to the checkpoint once) and its manifest; a
    folder the user named may hold another checkpoint's tables and is refused then."""
    chosen = export_dir is not None
    export_dir = Path(export_dir or ckpt / f"memory-{export_dtype}")
    if not (export_dir / "manifest.json").exists():
        export_memory(ckpt, export_dir, export_dtype)
    manifest = read_manifest(export_dir, fingerprint)
    if chosen and not allow_other_export:
        check_source(export_dir, manifest, ckpt)
    return export_dir, manifest


def _budgets(memory: str, total: int | str | None, manifest: dict[str, Any] | None, tables: list) -> list[int | None]:
    """Each layer's share of the tiered tier's budget (None for the other tiers)."""
    if memory != "tiered":
        if total is not None:
            raise ValueError(f"a memory budget applies to --memory tiered, not {memory!r}")
        return [None] * len(tables)
    from engram_lm.memory.tiered import table_budgets

    return table_budgets(total, manifest["dtype"], [(t.num_rows, t.dim) for t in tables])


def _make_table(memory, state, export_dir, layer_id, meta_table, fingerprint, device, verify, budget,
                shared=False) -> MemoryTable:  # fmt: skip
    rows, dim = meta_table.num_rows, meta_table.dim
    if memory in FILE_TIERS:
        return open_exported(export_dir, layer_id, rows, dim, fingerprint, device=device, verify=verify, tier=memory,
                             budget_bytes=budget, shared=shared)  # fmt: skip
    if shared:
        raise ValueError(f"--shared applies to --memory tiered (one row store for the host's processes), not {memory!r}")
    weight = read_table_rows(state, table_key(layer_id), 0, rows)
    if tuple(weight.shape) != (rows, dim):
        raise ValueError(f"checkpoint table of layer {layer_id} has shape {tuple(weight.shape)}, expected {(rows, dim)}")
    if memory == "ram":
        return HostTable(weight, device=device)
    return _device_table(weight, device)


def _device_table(weight: torch.Tensor, device: torch.device) -> DenseTable:
    with torch.device("meta"):
        table = DenseTable(*weight.shape, sparse_grad=True)
    table.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
    return table


def _assign_dense_weights(model: EngramLM, path: Path, skip: set[str], device: torch.device) -> None:
    expected = model.state_dict()
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            for name in expected:
                if name not in skip and name in names:
                    tensors[name] = f.get_tensor(name).to(device)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read {path}: {exc}. The file is truncated or not a safetensors file") from None
    missing = sorted(set(expected) - set(tensors) - skip)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path.parent} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"checkpoint {path.parent}: {name} has shape {tuple(t.shape)}, model expects {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)


def load_trained(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[EngramLM, dict[str, Any]]:
    """A trained model from a checkpoint (or a run folder's newest one), in eval mode,
    with its tables on the compute device."""
    return load_for_inference(checkpoint, memory="device", device=device)
