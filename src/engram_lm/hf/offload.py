"""The n-gram tables of released models, served from an engram-lm memory tier inside the official
`transformers` model: `offload_tables(model, tier="mmap", dir=...)`.

Supported: Qwen3.8-Flash-Next (`qwen4_exp`): every PLE layer's `ple_embedding.ngram_embedding`
(rows addressed as hashing/qwen4.py computes them, bit-exact with the official code). Each
table is written once, chunk by chunk, as an engram-lm export (`<dir>/manifest.json`, one
`layer-<k>.bin` per table, sha256 per file, the layout's fingerprint), then served by the
tier: `ram` (host RAM), `mmap` (the page cache), `ssd` (O_DIRECT reads at depth), each
optionally behind the hot-row cache (`cache_rows`). The official forward is unchanged: the
table module is replaced by `TierEmbedding`, which reads the rows the official code asks for
from the tier (on the host) and hands them back; fp32 and bf16 exports give the in-memory
model's logits exactly (fp32 always; bf16 when the weights are bf16), fp8 within its codec's
bound. An export for another layout (fingerprint) or with damaged files is refused.
Not yet: Gemma's per-layer embeddings, DeepSeek-V4.1, loading a checkpoint without
materialising its tables, and requesting rows before the layer runs (prefetch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engram_lm.hashing.qwen4 import qwen4_layout_from_config
from engram_lm.memory.cache import CachedTable
from engram_lm.memory.codec import DTYPES
from engram_lm.memory.export import FORMAT, _write_table, open_exported, read_manifest
from engram_lm.memory.host import HostTable
from engram_lm.memory.table import MemoryTable

TIERS = ("ram", "mmap", "ssd")
CHUNK_ROWS = 1 << 16


class TierEmbedding(nn.Module):
    """An `nn.Embedding` stand-in whose rows live in an engram-lm memory tier. `weight` is an
    empty host tensor: code that asks where the table lives (as qwen4_exp does) sends the ids
    to the host, where the tier reads them."""

    def __init__(self, table: MemoryTable, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.num_embeddings, self.embedding_dim, self.dtype = table, num_embeddings, embedding_dim, dtype
        self.register_buffer("weight", torch.empty(0), persistent=False)  # the host: where ids must go

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids.long()).to(self.dtype)  # the dtype the official table had

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tier={self.table.placement()}"


def ngram_tables(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Module name -> (the module holding the table, its layout fingerprint), for every n-gram
    table this module knows how to serve; refuses a model that has none."""
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Qwen4ExpTextNGramEmbedding":
            config = _text_config(model)
            found[name] = (module, qwen4_layout_from_config(config, module.ple_layer_index).fingerprint)
    if not found:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"this {kind!r} model has no n-gram table engram-lm can serve; supported: qwen4_exp "
                         "(Qwen3.8-Flash-Next's PLE n-gram tables)")  # fmt: skip
    return found


def offload_tables(model: nn.Module, *, tier: str = "mmap", dir: str | Path | None = None, dtype: str = "fp32",
                   cache_rows: int = 0, verify: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Serve every n-gram table of `model` from `tier`; the tables are exported to `dir` first
    (reused when `dir` already holds this model's export). Returns each table's placement."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {TIERS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown table dtype {dtype!r}; choose one of {DTYPES}")
    if tier != "ram" and dir is None:
        raise ValueError(f"tier {tier!r} serves tables from files: pass dir=... (a folder on the disk to serve from)")
    tables = ngram_tables(model)
    placements = []
    export_dir = Path(dir) if dir is not None else None
    if export_dir is not None:
        _export_once(tables, export_dir, dtype)
    for k, (name, (module, fingerprint)) in enumerate(tables.items()):
        emb = module.ngram_embedding
        device = emb.weight.device if emb.weight.device.type != "meta" else torch.device("cpu")
        if tier == "ram":
            table: MemoryTable = HostTable(emb.weight.detach().float().cpu(), device=device)
        else:
            table = open_exported(export_dir, k, emb.num_embeddings, emb.embedding_dim, fingerprint=None, device=device,
                                  verify=verify, tier=tier)  # fmt: skip
        if cache_rows:
            table = CachedTable(table, cache_rows, device=device)
        module.ngram_embedding = TierEmbedding(table, emb.num_embeddings, emb.embedding_dim, emb.weight.dtype)
        placements.append({"module": name, **table.placement()})
    return placements


def _export_once(tables: dict[str, tuple[nn.Module, str]], export_dir: Path, dtype: str) -> None:
    """Write the tables as an engram-lm export, unless `export_dir` already holds this model's
    (same layouts and shapes); refuses one made for another model."""
    layouts = [fp for _, fp in tables.values()]
    shapes = [list(m.ngram_embedding.weight.shape) for m, _ in tables.values()]
    if (export_dir / "manifest.json").exists():
        manifest = read_manifest(export_dir, None)
        if manifest.get("layouts") != layouts or manifest.get("shapes") != shapes or manifest["dtype"] != dtype:
            raise ValueError(f"{export_dir} holds tables exported for another model or dtype (layouts "
                             f"{manifest.get('layouts')}, {manifest['dtype']}; this model: {layouts}, {dtype}): "
                             "give another dir, or remove that export")  # fmt: skip
        return
    export_dir.mkdir(parents=True, exist_ok=True)
    layers = {}
    for k, (module, _) in enumerate(tables.values()):
        weight = module.ngram_embedding.weight
        if weight.device.type == "meta":
            raise ValueError("the model's n-gram tables are on the meta device: load them (or export them from the "
                             "checkpoint) before offloading")  # fmt: skip
        rows = weight.shape[0]
        chunks = (weight[a : a + CHUNK_ROWS].detach().float().cpu() for a in range(0, rows, CHUNK_ROWS))
        layers[str(k)] = _write_table(chunks, rows, weight.shape[1], dtype, export_dir / f"layer-{k}.bin")
    manifest = {"format": FORMAT, "fingerprint": None, "layouts": layouts, "shapes": shapes, "dtype": dtype,
                "head_dim": shapes[0][1], "modules": list(tables), "layers": layers}  # fmt: skip
    tmp = export_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, export_dir / "manifest.json")


def _text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config
