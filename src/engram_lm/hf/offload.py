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
`export_checkpoint_tables(model_dir, out_dir)` writes the same export straight from a
checkpoint folder's safetensors (one file or shards with index.json; a table whole or split
into `ngram_embedding.shard_<i>` parts, concatenated in order as transformers does), one part
at a time: the table is never in memory as a whole. `offload_tables` then reuses it.
`prefetch=True` requests each forward's rows as soon as its input ids are known (a pre-hook
on the model), not when the PLE layer runs; `TierEmbedding.stats()` says how long the layer
still waited. hf/load.py loads a checkpoint with its tables served this way, never in memory.
Also served: Gemma 3n / Gemma 4's per-layer embeddings (`embed_tokens_per_layer`, one row per
token id, scaled as the official forward scales them), with the same tiers and prefetch.
Not yet: DeepSeek-V4.1 (not in transformers).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from engram_lm.hashing.qwen4 import qwen4_layout_from_config, qwen4_row_ids
from engram_lm.memory.cache import CachedTable
from engram_lm.memory.codec import DTYPES
from engram_lm.memory.export import CHUNK_ROWS, FORMAT, open_exported, read_manifest, write_manifest, write_table
from engram_lm.memory.host import HostTable
from engram_lm.memory.prefetch import PrefetchingTable
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
        self.table, self.num_embeddings, self.embedding_dim, self.dtype = table, num_embeddings, embedding_dim, dtype
        self.register_buffer("weight", torch.empty(0), persistent=False)  # the host: where ids must go
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
        out = self.table(rows).to(self.dtype)  # the dtype the official table had
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        self.calls += 1
        self.waited_s += time.perf_counter() - t0
        return out

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
                   budget: int | str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Serve every n-gram table of `model` from `tier`; the tables are exported to `dir` first
    (reused when `dir` already holds this model's export). The default tier, `tiered`, holds rows
    in RAM up to `budget` (all tables together, e.g. "8G"; default half the available memory) and
    reads the rest from the disk at depth. With `prefetch`, a forward pre-hook on `model` starts
    each table's reads as soon as the input ids are known, on a worker thread, while the layers
    before run. Returns each table's placement."""
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
        _export_once(tables, export_dir, dtype)
    budgets = tier_budgets(tier, budget, export_dir, [tuple(t.embedding.weight.shape) for t in tables.values()])
    for k, (name, served) in enumerate(tables.items()):
        emb = served.embedding
        device = emb.weight.device if emb.weight.device.type != "meta" else torch.device("cpu")
        if tier == "ram":
            table: MemoryTable = HostTable(emb.weight.detach().float().cpu(), device=device)
            table = _wrapped(table, cache_rows, prefetch, device)
        else:
            table = tier_table(export_dir, k, emb.num_embeddings, emb.embedding_dim, tier=tier, cache_rows=cache_rows,
                               prefetch=prefetch, verify=verify, device=device, budget=budgets[k])  # fmt: skip
        setattr(served.holder, served.attr, TierEmbedding(table, emb.num_embeddings, emb.embedding_dim, emb.weight.dtype,
                                                          scale=served.scale))  # fmt: skip
        placements.append({"module": name, **table.placement()})
    if prefetch:
        install_prefetch(model, list(tables.values()))
    return placements


def tier_table(export_dir: Path, k: int, rows: int, dim: int, *, tier: str, cache_rows: int = 0, prefetch: bool = False,
               verify: bool = False, device: torch.device | str = "cpu", budget: int | None = None) -> MemoryTable:  # fmt: skip
    """Table `k` of an export, served by `tier` (mmap, ssd or tiered with `budget` bytes), behind the
    hot-row cache and the prefetcher when asked."""
    table = open_exported(export_dir, k, rows, dim, fingerprint=None, device=device, verify=verify, tier=tier,
                          budget_bytes=budget)  # fmt: skip
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


def install_prefetch(model: nn.Module, tables: list[ServedTable]) -> None:
    """The pre-hook that starts each table's reads when a forward's input ids are known (`_PrefetchHook`)."""
    model.register_forward_pre_hook(_PrefetchHook(tables), with_kwargs=True)


def _export_once(tables: dict[str, ServedTable], export_dir: Path, dtype: str) -> None:
    """Write the tables as an engram-lm export, unless `export_dir` already holds this model's
    (same layouts and shapes); refuses one made for another model."""
    layouts = [t.fingerprint for t in tables.values()]
    shapes = [list(t.embedding.weight.shape) for t in tables.values()]
    if (export_dir / "manifest.json").exists():
        manifest = read_manifest(export_dir, None)
        if manifest.get("layouts") != layouts or manifest.get("shapes") != shapes or manifest["dtype"] != dtype:
            raise ValueError(f"{export_dir} holds tables exported for another model or dtype (layouts "
                             f"{manifest.get('layouts')}, {manifest['dtype']}; this model: {layouts}, {dtype}): "
                             "give another dir, or remove that export")  # fmt: skip
        return
    export_dir.mkdir(parents=True, exist_ok=True)
    layers = {}
    for k, served in enumerate(tables.values()):
        weight = served.embedding.weight
        if weight.device.type == "meta":
            raise ValueError("the model's tables are on the meta device: load them (or export them from the "
                             "checkpoint) before offloading")  # fmt: skip
        rows = weight.shape[0]
        chunks = (weight[a : a + CHUNK_ROWS].detach().float().cpu() for a in range(0, rows, CHUNK_ROWS))
        layers[str(k)] = write_table(chunks, rows, weight.shape[1], dtype, export_dir / f"layer-{k}.bin")
    write_manifest(export_dir, {"format": FORMAT, "fingerprint": None, "layouts": layouts, "shapes": shapes, "dtype": dtype,
                                "head_dim": shapes[0][1], "modules": list(tables), "layers": layers})  # fmt: skip


def _text_config(model: nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config


def export_checkpoint_tables(model_dir: str | Path, out_dir: str | Path, dtype: str = "fp32") -> dict[str, Any]:
    """The n-gram tables of a qwen4_exp checkpoint folder as an engram-lm export, streamed from
    its safetensors one stored part at a time (the manifest `offload_tables` reuses); a
    DeepSeek-V4.1 folder's Engram tables are copied in their own fp8 + ue8m0 rows whatever
    `dtype` says (hf/v41.py)."""
    from types import SimpleNamespace

    from safetensors import SafetensorError

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"unknown table dtype {dtype!r}; choose one of {DTYPES}")
    if _model_type(model_dir).startswith("deepseek_v4"):  # V4.1: fp8 rows and ue8m0 scales, copied as they are
        from engram_lm.hf.v41 import export_v41_tables

        return export_v41_tables(model_dir, out_dir, _tensor_files(model_dir), json.loads((model_dir / "config.json").read_text()))
    config = _read_config(model_dir)
    where = _tensor_files(model_dir)
    parts: dict[str, list[tuple[int, str]]] = {}
    for key in where:
        m = re.fullmatch(r"(.+)\.ngram_embedding(?:\.shard_(\d+))?\.weight", key)
        if m:
            parts.setdefault(m.group(1), []).append((int(m.group(2) or 0), key))
    if not parts:
        raise ValueError(f"{model_dir} holds no n-gram table (no '*.ngram_embedding.weight' or '*.ngram_embedding.shard_N.weight' "
                         "tensor); point --model at a qwen4_exp checkpoint folder")  # fmt: skip
    modules = sorted(parts, key=layer_of)
    ple_ids = sorted(config.get("ple_layer_ids") or [])
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, layouts, shapes = {}, [], []
    for k, module in enumerate(modules):
        layer_idx = layer_of(module)
        if layer_idx + 1 not in ple_ids:
            raise ValueError(f"{model_dir}: {module} is no PLE layer of its config.json (ple_layer_ids {ple_ids})")
        layout = qwen4_layout_from_config(SimpleNamespace(**config), ple_ids.index(layer_idx + 1))
        keys = [key for _, key in sorted(parts[module])]
        try:
            shape = _stacked_shape(model_dir, where, keys)
            if shape[0] != layout.padded_rows:
                raise ValueError(f"{model_dir}: {module}'s table has {shape[0]:,} rows, its config's layout "
                                 f"{layout.padded_rows:,}: the checkpoint and config.json disagree")  # fmt: skip
            chunks = (part for key in keys for part in _row_chunks(model_dir / where[key], key))
            layers[str(k)] = write_table(chunks, shape[0], shape[1], dtype, out_dir / f"layer-{k}.bin")
        except SafetensorError as exc:
            raise ValueError(f"cannot read the table of {module} in {model_dir}: {exc}; the shard is truncated or "
                             "damaged: download it again") from None  # fmt: skip
        layouts.append(layout.fingerprint)
        shapes.append(list(shape))
    return write_manifest(out_dir, {"format": FORMAT, "fingerprint": None, "layouts": layouts, "shapes": shapes,
                                    "dtype": dtype, "head_dim": shapes[0][1], "modules": modules, "layers": layers,
                                    "checkpoint": str(model_dir)})  # fmt: skip


def layer_of(module_name: str) -> int:
    """The decoder layer a module name belongs to ('model.layers.3.ple.ple_embedding' -> 3)."""
    return int(re.search(r"layers\.(\d+)\.", module_name).group(1))


def _model_type(model_dir: Path) -> str:
    try:
        return str(json.loads((model_dir / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""  # _read_config says what is wrong


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{model_dir / 'config.json'} is missing or not JSON ({err}); point --model at a checkpoint folder") from None
    config = config.get("text_config", config)  # the multimodal config nests the text model's
    if config.get("model_type") not in ("qwen4_exp", "qwen4_exp_text"):
        raise ValueError(f"{model_dir} holds a {config.get('model_type')!r} model; n-gram tables are exported from "
                         "qwen4_exp checkpoints")  # fmt: skip
    return config


def _tensor_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it (index.json, or the single model.safetensors)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise ValueError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(single), framework="pt") as f:
            return {key: single.name for key in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"cannot read {single}: {exc}; the file is truncated or damaged: download it again") from None


def _stacked_shape(model_dir: Path, where: dict[str, str], keys: list[str]) -> tuple[int, int]:
    from safetensors import safe_open

    rows, dims = 0, set()
    for key in keys:
        with safe_open(str(model_dir / where[key]), framework="pt") as f:
            shape = f.get_slice(key).get_shape()
        rows, dims = rows + shape[0], dims | {shape[1]}
    if len(dims) != 1:
        raise ValueError(f"{model_dir}: the parts of one table have different widths {sorted(dims)}")
    return rows, dims.pop()


def _row_chunks(path: Path, key: str):
    """One stored tensor's rows as fp32, CHUNK_ROWS at a time."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        part = f.get_slice(key)
        rows = part.get_shape()[0]
        for a in range(0, rows, CHUNK_ROWS):
            yield part[a : min(rows, a + CHUNK_ROWS)].float()
