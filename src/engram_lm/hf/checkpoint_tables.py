"""The n-gram tables of a checkpoint folder, streamed from its safetensors into an engram-lm export.

`export_checkpoint_tables(model_dir, out_dir)` writes the export `offload_tables` and
`from_pretrained_offloaded` serve, one stored part at a time (a table whole, or split into
`ngram_embedding.shard_<i>` parts concatenated in order as transformers does): a table is never
in memory as a whole. qwen4_exp tables are re-encoded in the chosen dtype; a DeepSeek-V4.1
folder's are copied in their own fp8 + ue8m0 rows (hf/v41.py). Every export records its source
(hf/provenance.py): the folder, the sha256 of each table's values and the stamps of the files
holding them; `checkpoint_tables_sha256` hashes them again for a loader that must compare.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from engram_lm.hashing.qwen4 import qwen4_layout_from_config
from engram_lm.hf.provenance import checkpoint_source, hashed
from engram_lm.memory.codec import DTYPES
from engram_lm.memory.export import CHUNK_ROWS, FORMAT, write_manifest, write_table
from engram_lm.memory.quality import unchecked

NGRAM_KEY = re.compile(r"(.+)\.ngram_embedding(?:\.shard_(\d+))?\.weight")


@dataclass(frozen=True)
class CheckpointTables:
    """A qwen4_exp checkpoint's n-gram tables: module -> its stored parts in order, where each lives."""

    model_dir: Path
    config: dict[str, Any]
    where: dict[str, str]  # tensor -> file
    parts: dict[str, list[str]]  # module -> tensor names, in order

    @property
    def modules(self) -> list[str]:
        return sorted(self.parts, key=layer_of)

    @property
    def files(self) -> list[str]:
        return [self.where[key] for module in self.modules for key in self.parts[module]]

    def chunks(self, module: str) -> Iterator[torch.Tensor]:
        """The module's table as fp32 row chunks, part after part."""
        return (chunk for key in self.parts[module] for chunk in _row_chunks(self.model_dir / self.where[key], key))


def checkpoint_tables(model_dir: Path) -> CheckpointTables:
    """The n-gram tables of a qwen4_exp checkpoint folder (refused, with the fix, when it has none)."""
    config, where = _read_config(model_dir), _tensor_files(model_dir)
    parts: dict[str, list[tuple[int, str]]] = {}
    for key in where:
        m = NGRAM_KEY.fullmatch(key)
        if m:
            parts.setdefault(m.group(1), []).append((int(m.group(2) or 0), key))
    if not parts:
        raise ValueError(f"{model_dir} holds no n-gram table (no '*.ngram_embedding.weight' or '*.ngram_embedding.shard_N.weight' "
                         "tensor); point --model at a qwen4_exp checkpoint folder")  # fmt: skip
    return CheckpointTables(model_dir, config, where, {m: [key for _, key in sorted(p)] for m, p in parts.items()})


def checkpoint_tables_sha256(model_dir: Path) -> list[str]:
    """The sha256 of each n-gram table's values, read from the checkpoint (hf/provenance.py)."""
    from engram_lm.hf.provenance import values_sha256

    tables = checkpoint_tables(Path(model_dir))
    return [values_sha256(tables.chunks(module)) for module in tables.modules]


def export_checkpoint_tables(model_dir: str | Path, out_dir: str | Path, dtype: str = "fp32") -> dict[str, Any]:
    """The n-gram tables of a qwen4_exp checkpoint folder as an engram-lm export (the manifest
    `offload_tables` reuses); a DeepSeek-V4.1 folder's Engram tables are copied in their own fp8 +
    ue8m0 rows whatever `dtype` says (hf/v41.py)."""
    from types import SimpleNamespace

    from safetensors import SafetensorError

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"unknown table dtype {dtype!r}; choose one of {DTYPES}")
    if _model_type(model_dir).startswith("deepseek_v4"):  # V4.1: fp8 rows and ue8m0 scales, copied as they are
        from engram_lm.hf.v41 import export_v41_tables

        return export_v41_tables(model_dir, out_dir, _tensor_files(model_dir), json.loads((model_dir / "config.json").read_text()))
    tables = checkpoint_tables(model_dir)
    ple_ids = sorted(tables.config.get("ple_layer_ids") or [])
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, layouts, shapes, sources = {}, [], [], []
    for k, module in enumerate(tables.modules):
        layer_idx = layer_of(module)
        if layer_idx + 1 not in ple_ids:
            raise ValueError(f"{model_dir}: {module} is no PLE layer of its config.json (ple_layer_ids {ple_ids})")
        layout = qwen4_layout_from_config(SimpleNamespace(**tables.config), ple_ids.index(layer_idx + 1))
        try:
            shape = _stacked_shape(model_dir, tables.where, tables.parts[module])
            if shape[0] != layout.padded_rows:
                raise ValueError(f"{model_dir}: {module}'s table has {shape[0]:,} rows, its config's layout "
                                 f"{layout.padded_rows:,}: the checkpoint and config.json disagree")  # fmt: skip
            digest = hashlib.sha256()
            layers[str(k)] = write_table(hashed(tables.chunks(module), digest), shape[0], shape[1], dtype,
                                         out_dir / f"layer-{k}.bin")  # fmt: skip
        except SafetensorError as exc:
            raise ValueError(f"cannot read the table of {module} in {model_dir}: {exc}; the shard is truncated or "
                             "damaged: download it again") from None  # fmt: skip
        layouts.append(layout.fingerprint)
        shapes.append(list(shape))
        sources.append(digest.hexdigest())
    quality = unchecked(dtype, "tables exported from checkpoint files: no model ran to measure the format")
    return write_manifest(out_dir, {"format": FORMAT, "fingerprint": None, "layouts": layouts, "shapes": shapes,
                                    "dtype": dtype, "head_dim": shapes[0][1], "modules": tables.modules, "layers": layers,
                                    "checkpoint": str(model_dir), "quality": quality,
                                    "source": checkpoint_source(model_dir, sources, tables.files)})  # fmt: skip


def layer_of(module_name: str) -> int:
    """The decoder layer a module name belongs to ('model.layers.3.ple.ple_embedding' -> 3)."""
    m = re.search(r"layers\.(\d+)\.", module_name + ".")
    if m is None:
        raise ValueError(f"table module {module_name!r} belongs to no decoder layer ('layers.N.'): not a qwen4_exp "
                         "PLE table; export this checkpoint's own tables (engram tables export --model ...)")  # fmt: skip
    return int(m.group(1))


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


def _row_chunks(path: Path, key: str) -> Iterator[torch.Tensor]:
    """One stored tensor's rows as fp32, CHUNK_ROWS at a time."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        part = f.get_slice(key)
        rows = part.get_shape()[0]
        for a in range(0, rows, CHUNK_ROWS):
            yield part[a : min(rows, a + CHUNK_ROWS)].float()
