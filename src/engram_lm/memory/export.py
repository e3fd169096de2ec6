"""Export a checkpoint's Engram tables to memory-mappable files, and load them back.

Layout of an export folder:
    manifest.json   format, layout fingerprint, dtype, head dim, the checkpoint it came from
                    (path, step and the sha256 of its model.safetensors: what `source_of`
                    compares), and per layer: file, rows, bytes, sha256
    layer-<L>.bin   rows encoded as fp32, bf16 or fp8 (memory/codec.py), row-major
Tables are streamed chunk by chunk from the checkpoint's table shards (never a second full
copy in memory). Loading refuses a manifest for another layout, a wrong dtype or shape, and
missing or truncated files, and files whose content does not match the manifest's sha256:
each file is hashed once and a stamp (`verified.json`: size, mtime and hash per file) lets
later loads skip the hash while the file is unchanged; any write to a file changes its
mtime and forces a new check. `verify=True` (and `engram verify-memory`) always re-hash.
fp8 refuses non-finite rows (a NaN would poison its 32-value block, an inf zero its
neighbours), naming the table and the first such row.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from engram_lm.memory.codec import DTYPES, encode_rows, row_bytes
from engram_lm.memory.host import MmapTable

FORMAT = "engram-lm-memory/1"
CHUNK_ROWS = 1 << 16


def table_key(layer_id: int) -> str:
    return f"blocks.{layer_id}.engram.memory.weight"


def export_memory(checkpoint: Path, out_dir: Path, dtype: str = "bf16", *, check_text: str | None = None,
                  check_batches: int = 8, max_kl: float | None = None, max_loss_increase: float | None = None,
                  check: bool = True) -> dict[str, Any]:  # fmt: skip
    """A checkpoint's tables as `dtype` rows. A lossy format is measured first (memory/quality.py:
    held-out loss and next-token KL with the tables through the format, on `check_text` or the run's
    own corpus) and refused above the gate; `check=False` records it "unchecked"."""
    from engram_lm.checkpoint.store import read_state, read_table_rows
    from engram_lm.memory.quality import DEFAULT_MAX_KL, DEFAULT_MAX_LOSS_INCREASE, measure_export

    if dtype not in DTYPES:
        raise ValueError(f"unknown table dtype {dtype!r}; choose one of {DTYPES}")
    state = read_state(Path(checkpoint))
    layer_ids = (state["model_config"].get("engram") or {}).get("layer_ids")
    if not layer_ids:
        raise ValueError(f"checkpoint {state['path']} has no Engram tables to export")
    if check:
        quality = measure_export(state, dtype, text=check_text, batches=check_batches,
                                 max_kl=DEFAULT_MAX_KL if max_kl is None else max_kl,
                                 max_loss_increase=DEFAULT_MAX_LOSS_INCREASE if max_loss_increase is None else max_loss_increase)  # fmt: skip
    else:
        quality = {"checked": False, "dtype": dtype, "reason": "check=False"}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers: dict[str, Any] = {}
    for layer_id in layer_ids:
        shape = state["tables"][table_key(layer_id)]
        rows, dim = shape["rows"], shape["dim"]
        chunks = (_finite_for(dtype, read_table_rows(state, table_key(layer_id), a, min(rows, a + CHUNK_ROWS)), a,
                              layer_id, state["path"]) for a in range(0, rows, CHUNK_ROWS))  # fmt: skip
        layers[str(layer_id)] = write_table(chunks, rows, dim, dtype, out_dir / f"layer-{layer_id}.bin")
    manifest = {"format": FORMAT, "fingerprint": state["fingerprint"], "dtype": dtype, "head_dim": dim,
                "checkpoint": state["path"], "step": state["step"], "source": source_of(Path(state["path"])),
                "layers": layers, "quality": quality}  # fmt: skip
    return write_manifest(out_dir, manifest)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """manifest.json, written last (an export without it is incomplete), and the stamps of
    its table files, hashed while they were written: the first load need not read them again."""
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / "manifest.json")
    for entry in manifest["layers"].values():
        _stamp(out_dir, entry["file"], entry["sha256"])
    return manifest


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def source_of(checkpoint: Path) -> dict[str, Any]:
    """What an export was made from, by content: the step and the sha256 of the checkpoint's
    dense weights (model.safetensors differs between any two trainings, even of one config)."""
    return {"step": json.loads((Path(checkpoint) / "state.json").read_text())["step"],
            "model_sha256": file_sha256(Path(checkpoint) / "model.safetensors")}  # fmt: skip


def check_source(export_dir: Path, manifest: dict[str, Any], checkpoint: Path) -> None:
    """Refuse tables exported from another checkpoint (or another step of the same run)."""
    here = source_of(checkpoint)
    there = manifest.get("source") or {"step": manifest.get("step")}
    if there.get("step") != here["step"] or there.get("model_sha256", here["model_sha256"]) != here["model_sha256"]:
        raise ValueError(f"the tables in {export_dir} were exported from {manifest.get('checkpoint')} (step "
                         f"{there.get('step')}, weights {str(there.get('model_sha256'))[:12]}), not from {checkpoint} (step "
                         f"{here['step']}, weights {here['model_sha256'][:12]}): export this checkpoint's tables "
                         "(engram export-memory), or pass --allow-other-export to serve them anyway")  # fmt: skip


def _finite_for(dtype: str, chunk, start: int, layer_id: int, checkpoint: str):
    if dtype == "fp8":
        bad = (~chunk.isfinite()).any(dim=1).nonzero()
        if len(bad):
            row = start + int(bad[0])
            raise ValueError(f"the table of layer {layer_id} in {checkpoint} has non-finite values (first at row {row}); "
                             "fp8 cannot hold them (a NaN poisons its 32-value block): export as bf16 or fp32, or "
                             "use an earlier checkpoint")  # fmt: skip
    return chunk


def write_table(chunks, rows: int, dim: int, dtype: str, path: Path, *, encoded: bool = False) -> dict[str, Any]:
    """Write a table file from row chunks (float (R, dim); with `encoded`, rows already in the
    dtype's bytes, (R, row_bytes) uint8) and return its manifest entry with the sha256."""
    digest = hashlib.sha256()
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for chunk in chunks:
            data = (chunk if encoded else encode_rows(chunk, dtype)).tobytes()
            if len(data) % row_bytes(dtype, dim):
                raise ValueError(f"a chunk of {len(data)} bytes is not whole rows of {row_bytes(dtype, dim)} bytes")
            digest.update(data)
            out.write(data)
    os.replace(tmp, path)
    return {"file": path.name, "rows": rows, "bytes": rows * row_bytes(dtype, dim), "sha256": digest.hexdigest()}


def read_manifest(export_dir: Path, fingerprint: str | None) -> dict[str, Any]:
    path = Path(export_dir) / "manifest.json"
    if not path.exists():
        raise ValueError(f"{export_dir} holds no manifest.json: export the tables with `engram export-memory`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise ValueError(
            f"exported tables in {export_dir} have layout {manifest.get('fingerprint')}, the model has {fingerprint}; "
            "export them again from this model's checkpoint"
        )
    if manifest.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: unknown dtype {manifest.get('dtype')!r}")
    return manifest


def open_exported(
    export_dir: Path, layer_id: int, rows: int, dim: int, fingerprint: str | None, *, device="cpu", verify: bool = False,
    tier: str = "mmap", budget_bytes: int | None = None, shared: bool = False,
) -> MmapTable:
    """The exported table of one layer as an mmap table, with tier="ssd" as the deep-queue
    reader (memory/ssd.py), with tier="tiered" as rows held within `budget_bytes` in front of
    that reader (memory/tiered.py; default: the whole file, or half the available memory; with
    `shared`, one row store for every process on the host serving this file, named from its sha256);
    checked against the manifest either way."""
    if shared and tier != "tiered":
        raise ValueError(f"a shared row store is the tiered tier's; the {tier} tier holds no rows of its own "
                         "(mmap shares through the page cache already): use tier 'tiered' or shared=False")  # fmt: skip
    manifest = read_manifest(export_dir, fingerprint)
    entry = manifest["layers"].get(str(layer_id))
    if entry is None:
        raise ValueError(f"exported tables in {export_dir} have no layer {layer_id}")
    if entry["rows"] != rows or manifest["head_dim"] != dim:
        raise ValueError(
            f"exported layer {layer_id} has shape ({entry['rows']}, {manifest['head_dim']}), the model expects ({rows}, {dim})"
        )
    path = Path(export_dir) / entry["file"]
    if tier == "ssd":
        from engram_lm.memory.ssd import SsdTable

        table = SsdTable(path, rows, dim, manifest["dtype"], device=device)  # checks the file size
    elif tier == "tiered":
        from engram_lm.memory.tiered import tiered_table

        table = tiered_table(path, rows, dim, manifest["dtype"], budget_bytes=budget_bytes, device=device,
                             shared_key=entry["sha256"] if shared else None)  # checks the size
    else:
        table = MmapTable(path, rows, dim, manifest["dtype"], device=device)  # checks the file size
    verify_file(Path(export_dir), entry, force=verify, remedy=rewrite_command(manifest))
    return table


def rewrite_command(manifest: dict[str, Any]) -> str:
    """What writes this export again: engram export-memory for an engram-lm checkpoint's, engram tables
    export for a released checkpoint's, offload_tables for a model's in memory."""
    if "modules" not in manifest:
        return f"engram export-memory --checkpoint {manifest.get('checkpoint', 'CHECKPOINT')} --to THIS_FOLDER"
    if manifest.get("checkpoint"):
        return f"engram tables export --model {manifest['checkpoint']} --to THIS_FOLDER"
    return "remove the folder and call offload_tables(model, dir=...) again"


def verify_file(export_dir: Path, entry: dict[str, Any], *, force: bool = False, remedy: str | None = None) -> bool:
    """Check one exported file against the manifest; True when it had to be re-hashed.
    Raises ValueError naming the file and what writes it again (`remedy`) when it does not match."""
    path = export_dir / entry["file"]
    if not force and _stamps(export_dir).get(entry["file"]) == _stamp_key(path, entry["sha256"]):
        return False
    if file_sha256(path) != entry["sha256"]:
        raise ValueError(f"{path} does not match its manifest checksum: the file is damaged; export it again "
                         f"({remedy or 'engram export-memory'})")  # fmt: skip
    _stamp(export_dir, entry["file"], entry["sha256"])
    return True


def verify_memory(export_dir: Path) -> dict[str, Any]:
    """Re-hash every table file of an export: {layer: "ok" | the error}."""
    manifest = read_manifest(Path(export_dir), None)
    report = {}
    for layer_id, entry in manifest["layers"].items():
        try:
            verify_file(Path(export_dir), entry, force=True, remedy=rewrite_command(manifest))
            report[layer_id] = "ok"
        except (ValueError, OSError) as err:
            report[layer_id] = str(err)
    return {"dir": str(export_dir), "layers": report, "ok": all(v == "ok" for v in report.values())}


def _stamp_key(path: Path, sha256: str) -> list[Any]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, sha256]


def _stamps(export_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((export_dir / "verified.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _stamp(export_dir: Path, name: str, sha256: str) -> None:
    stamps = _stamps(export_dir)
    stamps[name] = _stamp_key(export_dir / name, sha256)
    try:
        tmp = export_dir / "verified.json.tmp"
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, export_dir / "verified.json")
    except OSError:
        pass  # a read-only export: every load re-hashes instead
