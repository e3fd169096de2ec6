"""A qwen4_exp checkpoint loaded with its n-gram tables served from a tier, never materialised:
`from_pretrained_offloaded(model_dir, tables_dir=..., tier="ssd")`.

The tables are exported from the checkpoint's safetensors first, streamed one stored part at
a time (`export_checkpoint_tables`; reused when `tables_dir` already holds them). Then
transformers loads the model as usual, except that each PLE layer's n-gram module is built
around its table's tier: the placeholder `nn.Embedding` it creates lives on the meta device
(transformers builds models there), is replaced before any weight is read, and the
checkpoint's table tensors are skipped as unexpected keys. So a machine loads the model with
RAM for everything but the tables. Each table's layout fingerprint is checked against the
export's, and the export's recorded source against the checkpoint's tables (hf/provenance.py: not
read again while the recorded files are unchanged): an export made for another model, or from
tables changed since, is refused before loading. `dtype=` (or `torch_dtype=`) is transformers',
the model's; `table_dtype=` is the export's row encoding when it has to be written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from torch import nn

from engram_lm.hashing.qwen4 import qwen4_layout_from_config
from engram_lm.hf.checkpoint_tables import checkpoint_tables_sha256, export_checkpoint_tables, layer_of
from engram_lm.hf.offload import TierEmbedding, install_prefetch, qwen4_served, tier_budgets, tier_table
from engram_lm.hf.provenance import check_source, same_checkpoint_files
from engram_lm.memory.codec import DTYPES
from engram_lm.memory.export import read_manifest

TABLE_KEYS = [r"ngram_embedding\.(shard_\d+\.)?weight$"]  # the checkpoint's table tensors: read from the tier instead


def from_pretrained_offloaded(model_dir: str | Path, *, tables_dir: str | Path, tier: str = "tiered",
                              table_dtype: str = "fp32", cache_rows: int = 0, prefetch: bool = False, verify: bool = False,
                              budget: int | str | None = None, shared: bool = False,
                              **from_pretrained: Any) -> nn.Module:  # fmt: skip
    """`AutoModelForCausalLM.from_pretrained(model_dir, **from_pretrained)` with every n-gram
    table served from `tier` ("tiered": rows held in RAM up to `budget` for all tables, default
    half the available memory, the rest read from the disk at depth; "mmap"; "ssd"; optionally
    behind the hot-row cache and the prefetch hook; `shared`: the tiered tier's rows in one store for every
    process on the host serving the same export); `table_dtype` is the export's row encoding
    when it has to be written; `dtype=` goes to transformers (the model's weights), as every
    other keyword does."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen4_exp import modeling_qwen4_exp as modeling

    if tier not in ("mmap", "ssd", "tiered"):
        raise ValueError(f"tier {tier!r}: a table loaded without materialising it is served from a file (tiered, mmap or ssd); "
                         "for host RAM load the model as usual and call offload_tables(model, tier='ram')")  # fmt: skip
    if from_pretrained.get("dtype") in DTYPES:
        raise ValueError(f"dtype={from_pretrained['dtype']!r} is the model's dtype for transformers (e.g. torch.bfloat16); "
                         f"the tables' row encoding is table_dtype={from_pretrained['dtype']!r}")  # fmt: skip
    if table_dtype not in DTYPES:
        raise ValueError(f"unknown table_dtype {table_dtype!r}; choose one of {DTYPES}")
    model_dir, tables_dir = Path(model_dir), Path(tables_dir)
    if not (tables_dir / "manifest.json").exists():
        export_checkpoint_tables(model_dir, tables_dir, table_dtype)
    manifest = _checked_export(model_dir, tables_dir)
    by_layer = {layer_of(name): k for k, name in enumerate(manifest["modules"])}
    budgets = tier_budgets(tier, budget, tables_dir, [tuple(shape) for shape in manifest["shapes"]])
    built: list[nn.Module] = []

    def build(module: nn.Module, config, layer_idx: int, ple_layer_index: int) -> None:
        if layer_idx not in by_layer:
            raise ValueError(f"{tables_dir} holds no table for layer {layer_idx} (it has layers {sorted(by_layer)}): "
                             f"export this checkpoint's tables there (engram tables export --model {model_dir})")  # fmt: skip
        k = by_layer[layer_idx]
        if manifest["layouts"][k] != qwen4_layout_from_config(config, ple_layer_index).fingerprint:
            raise ValueError(f"{tables_dir} holds tables exported for another model (layer {layer_idx}'s layout "
                             "differs): give another tables_dir, or remove that export")  # fmt: skip
        emb = module.ngram_embedding
        table = tier_table(tables_dir, k, emb.num_embeddings, emb.embedding_dim, tier=tier, cache_rows=cache_rows,
                           prefetch=prefetch, verify=verify, budget=budgets[k], shared=shared)  # fmt: skip
        module.ngram_embedding = TierEmbedding(table, emb.num_embeddings, emb.embedding_dim, emb.weight.dtype)
        built.append(module)

    # the skipped table tensors are expected: said to transformers on the family's base class (it gathers the
    # patterns from PreTrainedModel classes only), so its load report does not call them UNEXPECTED
    with _building_with(modeling.Qwen4ExpTextNGramEmbedding, build), \
            _class_attribute(modeling.Qwen4ExpPreTrainedModel, "_keys_to_ignore_on_load_unexpected",
                             [*(modeling.Qwen4ExpPreTrainedModel._keys_to_ignore_on_load_unexpected or []), *TABLE_KEYS]):
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **from_pretrained)
    if not built:
        raise ValueError(f"{model_dir} built no n-gram module: not a qwen4_exp checkpoint with tables")
    if prefetch:
        install_prefetch(model, [qwen4_served(model, module) for module in built])
    return model


def _checked_export(model_dir: Path, tables_dir: Path) -> dict[str, Any]:
    """The export's manifest, once it is known to hold this checkpoint's tables: a qwen4_exp export
    (not an engram-lm checkpoint's or another family's) made from these very tables."""
    manifest = read_manifest(tables_dir, None)
    if not manifest.get("modules") or "layouts" not in manifest:
        raise ValueError(f"{tables_dir} holds an `engram export-memory` export (an engram-lm checkpoint's tables), not a "
                         f"qwen4_exp checkpoint's: give another tables_dir")  # fmt: skip
    if not all(".ngram_embedding" not in m and ".ple" in m for m in manifest["modules"]):
        raise ValueError(f"{tables_dir} holds {manifest['modules'][0]!r}'s table, not a qwen4_exp PLE table: give "
                         "another tables_dir")  # fmt: skip
    check_source(tables_dir, manifest, str(model_dir.resolve()), lambda: checkpoint_tables_sha256(model_dir),
                 param="tables_dir", same_files=same_checkpoint_files(manifest, model_dir))  # fmt: skip
    return manifest


@contextlib.contextmanager
def _class_attribute(cls: type, name: str, value: Any):
    """`cls.<name> = value` inside the block only (the class's own attribute restored, or removed, after)."""
    missing = object()
    before = cls.__dict__.get(name, missing)
    setattr(cls, name, value)
    try:
        yield
    finally:
        if before is missing:
            delattr(cls, name)
        else:
            setattr(cls, name, before)


@contextlib.contextmanager
def _building_with(cls: type, build):
    """`cls.__init__` followed by `build(module, config, layer_idx, ple_layer_index)`, inside the block only."""
    original = cls.__init__

    def init(self, config, embedding_dim, layer_idx, ple_layer_index=0):
        original(self, config, embedding_dim, layer_idx, ple_layer_index)  # its table: a placeholder on meta
        build(self, config, layer_idx, ple_layer_index)

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = original


__all__ = ["from_pretrained_offloaded"]
