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
bound. An export for another layout (fingerprint), made from other tables (its recorded source:
hf/provenance.py) or with damaged files is refused. `export_checkpoint_tables(model_dir, out_dir)`
(hf/checkpoint_tables.py) writes the same export straight from a checkpoint folder's
safetensors, one stored part at a time; `offload_tables` then reuses it.
`prefetch=True` requests each forward's rows as soon as its input ids are known (a pre-hook
on the model), not when the PLE layer runs; `TierEmbedding.stats()` says how long the layer
still waited. hf/load.py loads a checkpoint with its tables served this way, never in memory.
Also served: Gemma 3n / Gemma 4's per-layer embeddings (`embed_tokens_per_layer`, one row per
token id, scaled as the official forward scales them), with the same tiers and prefetch.
Not yet: DeepSeek-V4.1 (not in transformers).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from engram_lm.hashing.qwen4 import qwen4_layout_from_config, qwen4_row_ids
from engram_lm.hf.provenance import check_source, hashed, memory_source, model_identity, values_sha256
from engram_lm.memory.cache import CachedTable
from engram_lm.memory.codec import DTYPES
from engram_lm.memory.export import CHUNK_ROWS, FORMAT, open_exported, read_manifest, write_manifest, write_table
from engram_lm.memory.host import HostTable
from engram_lm.memory.prefetch import PrefetchingTable
from engram_lm.memory.quality import unchecked
from engram_lm.memory.table import MemoryTable

TIERS = ("ram", "mmap", "ssd", "tiered")


class TierEmbedding(nn.Module):
    """An `nn.Embedding` stand-in whose rows live in an engram-lm memory tier. `weight` is an
    empty host tensor: code that asks where the table lives (as qwen4_exp does) sends the ids
    to the host, where the tier reads them. `expect(rows)` starts fetching the rows the next
    call will ask for (the prefetch hook's doing); the call then uses them when they are the
    rows the official code asks for, and reads its own otherwise. `stats()`: calls, prefetch
    hits and misses, and the seconds the layer waited for its rows."""

    def __init__(self, table: MemoryTable, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 scale: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        self.table, self.num_embeddings, self.embedding_dim = table, num_embeddings, embedding_dim
        # empty, on the host (where ids must go), in the model's dtype: model.to(torch.bfloat16) converts it, and
        # the rows come back in whatever dtype the model has now
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
        # a scaled embedding (Gemma's): rows times the scale, cast to the table's dtype, as the official forward does
        self.register_buffer("embed_scale", None if scale is None else scale.detach().clone(), persistent=False)
        self._expected: torch.Tensor | None = None
        self.calls = self.hits = self.misses = 0
        self.waited_s = 0.0

    def expect(self, rows: torch.Tensor) -> None:
        self._expected = rows
        self.table.prefetch(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        rows, expected, self._expected = ids.long(), self._expected, None
        if expected is not None:
            same = rows.shape == expected.shape and torch.equal(rows.cpu(), expected)
            rows = expected if same else rows  # the very tensor prefetched: the tier hands over its fetch
            self.hits, self.misses = self.hits + same, self.misses + (not same)
        out = self.table(rows).to(self.dtype)  # the dtype the official table has now
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        self.calls += 1
        self.waited_s += time.perf_counter() - t0
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "prefetch_hits": self.hits, "prefetch_misses": self.misses,
                "waited_ms_per_call": 1e3 * self.waited_s / max(self.calls, 1)}  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tier={self.table.placement()}"


@dataclass(frozen=True)
class ServedTable:
    """One table `offload_tables` serves: `holder.<attr>` is the official embedding module;
    `rows_for(ids, cache)` gives the rows its layer will ask for, from a forward's input ids on
    the host (and the cache, for the ids before them); `scale`, a scaled embedding's factor."""

    holder: nn.Module
    attr: str
    fingerprint: str
    rows_for: Callable[[torch.Tensor, Any], torch.Tensor]
    scale: torch.Tensor | None = None

    @property
    def embedding(self) -> nn.Module:
        return getattr(self.holder, self.attr)


class _PrefetchHook:
    """A forward pre-hook on the whole model: as soon as a forward's input ids are known, each
    table starts fetching the rows its layer will ask for (qwen4_exp: hashing/qwen4.py,
    bit-exact, the ids before them from the cache, where the official layer keeps them; a
    per-layer embedding: the ids themselves)."""

    def __init__(self, tables: list[ServedTable]) -> None:
        self.tables = tables

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return  # embeddings given, not ids: nothing to read ahead; the layers read as usual
        cache, ids = kwargs.get("cache", kwargs.get("past_key_values")), ids.cpu()
        for table in self.tables:
            table.embedding.expect(table.rows_for(ids, cache))


def qwen4_served(model: nn.Module, module: nn.Module) -> ServedTable:
    """A qwen4_exp n-gram module's table: rows hashed as the official layer hashes them."""
    layout = qwen4_layout_from_config(_text_config(model), module.ple_layer_index)

    def rows_for(ids: torch.Tensor, cache: Any) -> torch.Tensor:
        history = _cached_ids(cache, module.layer_idx)
        return qwen4_row_ids(layout, ids, None if history is None else history.cpu().long())[0]

    return ServedTable(module, "ngram_embedding", layout.fingerprint, rows_for)


def per_layer_served(holder: nn.Module) -> ServedTable:
    """Gemma 3n / Gemma 4's per-layer embedding (`embed_tokens_per_layer`): one row per token id
    below `vocab_size_per_layer_input` (others read row 0, as the official code does), scaled."""
    emb = holder.embed_tokens_per_layer
    rows, dim = emb.weight.shape
    scale = getattr(emb, "embed_scale", None)

    def rows_for(ids: torch.Tensor, cache: Any) -> torch.Tensor:
        return torch.where((ids >= 0) & (ids < rows), ids, 0)

    return ServedTable(holder, "embed_tokens_per_layer", f"per-layer-embedding:{rows}x{dim}", rows_for, scale)


def _cached_ids(cache: Any, layer_idx: int) -> torch.Tensor | None:
    """The ids before this forward that the official layer keeps in the cache (None: a new sequence)."""
    if cache is None or not hasattr(cache, "get_conv_state"):
        return None
    try:
        return cache.get_conv_state(layer_idx, state_idx=2)
    except (IndexError, KeyError, AttributeError, TypeError):
        return None  # nothing cached for this layer yet


def served_tables(model: nn.Module) -> dict[str, ServedTable]:
    """Module name -> the table, for every table this module knows how to serve: qwen4_exp's
    PLE n-gram tables and Gemma 3n / Gemma 4's per-layer embeddings; refuses a model that has none."""
    found = {}
    served = [name for name, module in model.named_modules() if isinstance(module, TierEmbedding)]
    if served:
        raise ValueError(f"this model's tables are already served from a tier ({served[0]}): offload_tables once per "
                         "loaded model; to serve them another way, load the model again")  # fmt: skip
    for name, module in model.named_modules():
        if type(module).__name__ == "Qwen4ExpTextNGramEmbedding":
            found[name] = qwen4_served(model, module)
        elif isinstance(getattr(module, "embed_tokens_per_layer", None), nn.Embedding):
            found[f"{name}.embed_tokens_per_layer" if name else "embed_tokens_per_layer"] = per_layer_served(module)
    if not found:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"this {kind!r} model has no table engram-lm can serve; supported: qwen4_exp (Qwen3.8-Flash-Next's "
                         "PLE n-gram tables), gemma3n and gemma4 (per-layer embeddings)")  # fmt: skip
    return found


def offload_tables(model: nn.Module, *, tier: str = "tiered", dir: str | Path | None = None, dtype: str = "fp32",
                   cache_rows: int = 0, verify: bool = False, prefetch: bool = False,
                   budget: int | str | None = None, shared: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Serve every n-gram table of `model` from `tier`; the tables are exported to `dir` first
    (reused when `dir` already holds this model's export). The default tier, `tiered`, holds rows
    in RAM up to `budget` (all tables together, e.g. "8G"; default half the available memory) and
    reads the rest from the disk at depth. With `prefetch`, a forward pre-hook on `model` starts
    each table's reads as soon as the input ids are known, on a worker thread, while the layers
    before run. With `shared` (tier "tiered"), the rows held are one store per table for every process on
    the host that serves the same export with the same budget (memory/shared_tiered.py). Returns each
    table's placement."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {TIERS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown table dtype {dtype!r}; choose one of {DTYPES}")
    if tier != "ram" and dir is None:
        raise ValueError(f"tier {tier!r} serves tables from files: pass dir=... (a folder on the disk to serve from)")
    tables = served_tables(model)
    placements = []
    export_dir = Path(dir) if dir is not None else None
    if export_dir is not None:
        _export_once(model, tables, export_dir, dtype)
    budgets = tier_budgets(tier, budget, export_dir, [tuple(t.embedding.weight.shape) for t in tables.values()])
    for k, (name, served) in enumerate(tables.items()):
        emb = served.embedding
        device = emb.weight.device if emb.weight.device.type != "meta" else torch.device("cpu")
        if tier == "ram":
            table: MemoryTable = HostTable(emb.weight.detach().float().cpu(), device=device)
            table = _wrapped(table, cache_rows, prefetch, device)
        else:
            table = tier_table(export_dir, k, emb.num_embeddings, emb.embedding_dim, tier=tier, cache_rows=cache_rows,
                               prefetch=prefetch, verify=verify, device=device, budget=budgets[k], shared=shared)  # fmt: skip
        setattr(served.holder, served.attr, TierEmbedding(table, emb.num_embeddings, emb.embedding_dim, emb.weight.dtype,
                                                          scale=served.scale))  # fmt: skip
        placements.append({"module": name, **table.placement()})
    if prefetch:
        install_prefetch(model, list(tables.values()))
    return placements


def tier_table(export_dir: Path, k: int, rows: int, dim: int, *, tier: str, cache_rows: int = 0, prefetch: bool = False,
               verify: bool = False, device: torch.device | str = "cpu", budget: int | None = None,
               shared: bool = False) -> MemoryTable:  # fmt: skip
    """Table `k` of an export, served by `tier` (mmap, ssd or tiered with `budget` bytes), behind the
    hot-row cache and the prefetcher when asked."""
    table = open_exported(export_dir, k, rows, dim, fingerprint=None, device=device, verify=verify, tier=tier,
                          budget_bytes=budget, shared=shared)  # fmt: skip
    return _wrapped(table, cache_rows, prefetch, device)


def tier_budgets(tier: str, budget: int | str | None, export_dir: Path | None,
                 shapes: list[tuple[int, int]]) -> list[int | None]:  # fmt: skip
    """Each table's share of the tiered tier's budget, by file size (None for the other tiers)."""
    if tier != "tiered":
        if budget is not None:
            raise ValueError(f"budget= applies to tier 'tiered', not {tier!r}")
        return [None] * len(shapes)
    from engram_lm.memory.tiered import table_budgets

    return table_budgets(budget, read_manifest(export_dir, None)["dtype"], shapes)


def _wrapped(table: MemoryTable, cache_rows: int, prefetch: bool, device) -> MemoryTable:
    if cache_rows:
        table = CachedTable(table, cache_rows, device=device)
    return PrefetchingTable(table, device, policy="always") if prefetch else table


def install_prefetch(model: nn.Module, tables: list[ServedTable]):
    """The pre-hook that starts each table's reads when a forward's input ids are known (`_PrefetchHook`);
    returns its handle (`.remove()` takes it off)."""
    return model.register_forward_pre_hook(_PrefetchHook(tables), with_kwargs=True)


def _export_once(model: nn.Module, tables: dict[str, ServedTable], export_dir: Path, dtype: str) -> None:
    """Write the tables as an engram-lm export, with the sha256 of each table's values as its source,
    unless `export_dir` already holds an export of these very tables; refuses one made for another
    model, dtype or from other weights (hf/provenance.py), and a folder that is no such export."""
    layouts = [t.fingerprint for t in tables.values()]
    shapes = [list(t.embedding.weight.shape) for t in tables.values()]
    if (export_dir / "manifest.json").exists():
        manifest = read_manifest(export_dir, None)
        if "layouts" not in manifest or "shapes" not in manifest:
            raise ValueError(f"{export_dir} holds an `engram export-memory` export (an engram-lm checkpoint's tables), "
                             "not a transformers model's: give another dir")  # fmt: skip
        if manifest["layouts"] != layouts or manifest["shapes"] != shapes or manifest["dtype"] != dtype:
            raise ValueError(f"{export_dir} holds tables exported for another model or dtype (layouts "
                             f"{manifest['layouts']}, {manifest['dtype']}; this model: {layouts}, {dtype}): "
                             "give another dir, or remove that export")  # fmt: skip
        check_source(export_dir, manifest, model_identity(model), lambda: [values_sha256(_chunks(t)) for t in tables.values()],
                     param="dir")  # fmt: skip
        return
    export_dir.mkdir(parents=True, exist_ok=True)
    layers, sources = {}, []
    for k, served in enumerate(tables.values()):
        weight = served.embedding.weight
        if weight.device.type == "meta":
            raise ValueError("the model's tables are on the meta device: load them (or export them from the "
                             "checkpoint) before offloading")  # fmt: skip
        digest = hashlib.sha256()
        layers[str(k)] = write_table(hashed(_chunks(served), digest), weight.shape[0], weight.shape[1], dtype,
                                     export_dir / f"layer-{k}.bin")  # fmt: skip
        sources.append(digest.hexdigest())
    quality = unchecked(dtype, "offload_tables has no text to measure the format on")
    write_manifest(export_dir, {"format": FORMAT, "fingerprint": None, "layouts": layouts, "shapes": shapes, "dtype": dtype,
                                "head_dim": shapes[0][1], "modules": list(tables), "layers": layers, "quality": quality,
                                "source": memory_source(model, sources)})  # fmt: skip


def _chunks(served: ServedTable):
    """A table in memory as fp32 row chunks (what an export encodes and its source hash covers)."""
    weight = served.embedding.weight
    return (weight[a : a + CHUNK_ROWS].detach().float().cpu() for a in range(0, weight.shape[0], CHUNK_ROWS))


def _text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config
