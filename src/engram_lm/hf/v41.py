"""DeepSeek-V4.1-Flash's Engram tables, from a checkpoint folder to an engram-lm export.

V4.1 keeps each Engram layer's table as two tensors (ENGRAM_SPEC s.8; SGLang's
`EngramEmbedding`, sgl-project/sglang 4be612a4, python/sglang/srt/layers/engram.py):
`layers.<L>.engram.embed.weight`, (rows, 256) float8_e4m3fn, and `layers.<L>.engram.embed.scale`,
(rows, 8) float8_e8m0fnu, one power-of-two scale per 32 columns. engram-lm's fp8 row is exactly
those bytes side by side (256 e4m3 bytes, then 8 ue8m0 bytes: 264 bytes; memory/codec.py), so
the export copies them, chunk by chunk from the safetensors, never decoding and never holding a
table whole; the rows and width are checked against config.json (engram_layer_ids,
engram_num_embeddings, engram_head_dim) first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from engram_lm.hf.provenance import checkpoint_source
from engram_lm.memory.export import CHUNK_ROWS, FORMAT, write_manifest, write_table

V41_TABLE = re.compile(r"(?:.*\.)?layers\.(\d+)\.engram\.embed\.(weight|scale)")
SCALE_BLOCK = 32
STORED = "the rows as stored: 256 e4m3 bytes, then 8 ue8m0 bytes"


def v41_table_keys(keys) -> dict[int, dict[str, str]]:
    """Layer -> {"weight": key, "scale": key} for every V4.1 Engram table tensor among `keys`."""
    found: dict[int, dict[str, str]] = {}
    for key in keys:
        m = V41_TABLE.fullmatch(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = key
    return found


def export_v41_tables(model_dir: Path, out_dir: Path, where: dict[str, str], config: dict[str, Any]) -> dict[str, Any]:
    """The V4.1 checkpoint's Engram tables as one fp8 export (`where`: tensor -> file)."""
    from safetensors import SafetensorError, safe_open

    tables = v41_table_keys(where)
    expected, width = _engram_config(model_dir, config)
    if sorted(tables) != sorted(expected):
        raise ValueError(f"{model_dir}: Engram tables for layers {sorted(tables)}, config.json's engram_layer_ids "
                         f"{sorted(expected)}: the checkpoint and its config disagree")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, shapes, modules = {}, [], []
    for k, layer in enumerate(sorted(tables)):
        keys = tables[layer]
        if set(keys) != {"weight", "scale"}:
            raise ValueError(f"{model_dir}: layer {layer}'s Engram table lacks its {'scale' if 'weight' in keys else 'weight'} "
                             "tensor (V4.1 stores fp8 rows and their ue8m0 scales): the checkpoint is incomplete")  # fmt: skip
        try:
            with safe_open(str(model_dir / where[keys["weight"]]), "pt") as fw, \
                    safe_open(str(model_dir / where[keys["scale"]]), "pt") as fs:  # fmt: skip
                weight, scale = fw.get_slice(keys["weight"]), fs.get_slice(keys["scale"])
                rows, dim = weight.get_shape()
                _check_table(model_dir, layer, weight, scale, expected[layer], width)
                chunks = (np.concatenate([_bytes(weight[a : a + CHUNK_ROWS]), _bytes(scale[a : a + CHUNK_ROWS])], 1)
                          for a in range(0, rows, CHUNK_ROWS))  # fmt: skip
                layers[str(k)] = write_table(chunks, rows, dim, "fp8", out_dir / f"layer-{k}.bin", encoded=True)
        except SafetensorError as exc:
            raise ValueError(f"cannot read layer {layer}'s Engram table in {model_dir}: {exc}; the shard is truncated or "
                             "damaged: download it again") from None  # fmt: skip
        shapes.append([rows, dim])
        modules.append(f"layers.{layer}.engram.embed")
    layouts = [f"deepseek-v4.1:layer-{layer}:{rows}x{dim}" for layer, (rows, dim) in zip(sorted(tables), shapes)]
    files = [where[key] for layer in tables for key in tables[layer].values()]
    stored = [layers[str(k)]["sha256"] for k in range(len(tables))]  # rows copied as stored: their hash is the file's
    return write_manifest(out_dir, {"format": FORMAT, "fingerprint": None, "layouts": layouts, "shapes": shapes,
                                    "dtype": "fp8", "head_dim": shapes[0][1], "modules": modules, "layers": layers,
                                    "checkpoint": str(model_dir), "quality": {"checked": True, "lossless": True,
                                                                              "note": "the stored fp8 rows, copied"},
                                    "source": checkpoint_source(model_dir, stored, files, hash_of=STORED)})  # fmt: skip


def _engram_config(model_dir: Path, config: dict[str, Any]) -> tuple[dict[int, int], int | None]:
    """config.json's Engram layers -> rows, and the row width, each checked for its shape."""
    ids, rows, width = (config.get(k) for k in ("engram_layer_ids", "engram_num_embeddings", "engram_head_dim"))
    for key, value in (("engram_layer_ids", ids), ("engram_num_embeddings", rows)):
        if not (isinstance(value, list) and all(isinstance(v, int) for v in value)):
            raise ValueError(f"{model_dir / 'config.json'}: {key} is {value!r}, V4.1's is a list of integers, one per "
                             "Engram layer; fix config.json (the released one lists [1, 14] and both tables' rows)")  # fmt: skip
    if len(ids) != len(rows):
        raise ValueError(f"{model_dir / 'config.json'}: engram_layer_ids {ids} and engram_num_embeddings {rows} differ "
                         "in length (one row count per Engram layer); fix config.json")  # fmt: skip
    if width is not None and not isinstance(width, int):
        raise ValueError(f"{model_dir / 'config.json'}: engram_head_dim is {width!r}, V4.1's is one integer (256); "
                         "fix config.json")  # fmt: skip
    return dict(zip(ids, rows)), width


def _check_table(model_dir: Path, layer: int, weight, scale, rows: int, width: int | None) -> None:
    (w_rows, w_dim), (s_rows, s_dim) = weight.get_shape(), scale.get_shape()
    dtypes = (weight.get_dtype(), scale.get_dtype())
    if dtypes != ("F8_E4M3", "F8_E8M0"):
        raise ValueError(f"{model_dir}: layer {layer}'s Engram table is {dtypes}, V4.1's is (F8_E4M3, F8_E8M0)")
    if w_rows != rows or (width is not None and w_dim != width) or (s_rows, s_dim) != (w_rows, -(-w_dim // SCALE_BLOCK)):
        raise ValueError(f"{model_dir}: layer {layer}'s Engram table is {w_rows:,} x {w_dim} with scales {s_rows:,} x "
                         f"{s_dim}; config.json says {rows:,} rows of {width}: the checkpoint and its config disagree")  # fmt: skip


def _bytes(t) -> np.ndarray:
    import torch

    return t.contiguous().view(torch.uint8).numpy()
