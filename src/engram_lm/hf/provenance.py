"""What an export of a transformers model's tables was made from, checked before it is served.

An export (`offload_tables(model, dir=...)`, `engram tables export`, `from_pretrained_offloaded`)
records its source in manifest.json:
    "source": {"from": the model it was made from (a checkpoint folder, or the class and name of a
                       model in memory),
               "tables_sha256": per table, the sha256 of its values as little-endian fp32 rows
                                (what every export encodes; the same for a bf16 and an fp32 copy of
                                one table),
               "files": for a checkpoint, {file: [size, mtime_ns]} of the files holding the tables}
A loader that would reuse the export compares first: a table in memory is hashed (one pass over
it, ~1-2 GB/s); a checkpoint whose table files are the very files recorded (same folder, size and
mtime) is not read again, any other is hashed. A difference is refused in one line naming both
sources and the fix; an export that records no source (made before engram-lm recorded them) is
refused too: reusing it would be trusting it blind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

HASHED = "fp32 values, rows in order"


def hashed(chunks: Iterable[torch.Tensor], digest: "hashlib._Hash") -> Iterator[torch.Tensor]:
    """The chunks unchanged, each fed to `digest` as fp32 row bytes on the way (hashing while exporting)."""
    for chunk in chunks:
        digest.update(chunk.detach().float().cpu().contiguous().numpy())
        yield chunk


def values_sha256(chunks: Iterable[torch.Tensor]) -> str:
    """sha256 of a table's values, given as row chunks in order (any float dtype)."""
    digest = hashlib.sha256()
    for _ in hashed(chunks, digest):
        pass
    return digest.hexdigest()


def model_identity(model: torch.nn.Module) -> str:
    """How a model in memory is named in messages: its class and where it was loaded from."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "built in memory"
    return f"{type(model).__name__} ({name})"


def file_stamps(folder: Path, files: Iterable[str]) -> dict[str, list[int]]:
    """{file: [size, mtime_ns]}: any write to a file changes its stamp."""
    return {name: [(st := (Path(folder) / name).stat()).st_size, st.st_mtime_ns] for name in sorted(set(files))}


def memory_source(model: torch.nn.Module, tables_sha256: list[str]) -> dict[str, Any]:
    return {"from": model_identity(model), "tables_sha256": tables_sha256, "hash_of": HASHED}


def checkpoint_source(model_dir: Path, tables_sha256: list[str], files: Iterable[str], hash_of: str = HASHED) -> dict[str, Any]:
    return {"from": str(Path(model_dir).resolve()), "tables_sha256": tables_sha256, "hash_of": hash_of,
            "files": file_stamps(model_dir, files)}  # fmt: skip


def check_source(export_dir: Path, manifest: dict[str, Any], here_from: str, here_sha256: Callable[[], list[str]], *,
                 param: str, same_files: bool = False) -> None:  # fmt: skip
    """Refuse an export made from other tables than `here_from`'s (their hashes, computed only when
    needed by `here_sha256()`); `same_files`: the checkpoint files are the ones recorded, unchanged."""
    there = manifest.get("source")
    if not isinstance(there, dict) or not there.get("tables_sha256"):
        raise ValueError(f"{export_dir} records no source (it was exported before engram-lm recorded what an export "
                         f"is made from): nothing says its tables are this model's; remove {export_dir} to export them "
                         f"again, or pass another {param}")  # fmt: skip
    if same_files:
        return
    here = here_sha256()
    if here == there["tables_sha256"]:
        return
    k = next(i for i, (a, b) in enumerate(zip(there["tables_sha256"], here)) if a != b) if len(here) == len(
        there["tables_sha256"]) else 0  # fmt: skip
    was = f"the tables in {export_dir} were exported from {there['from']} (table sha256 {there['tables_sha256'][k][:12]})"
    if there["from"] == here_from and there.get("files"):  # the same checkpoint folder, its tables rewritten
        now = f"{here_from}'s tables now have sha256 {here[k][:12]}: changed since the export"
    else:  # models in memory have no address: say what the hashes say
        now = f"this model's tables ({here_from}) have sha256 {here[k][:12]}: another model's, or changed since the export"
    raise ValueError(f"{was}; {now}; remove {export_dir} to export this model's tables, or pass another {param}")


def same_checkpoint_files(manifest: dict[str, Any], model_dir: Path) -> bool:
    """True when the export was made from this very folder and its table files have not changed since."""
    there = manifest.get("source")
    if not isinstance(there, dict) or there.get("from") != str(Path(model_dir).resolve()) or not there.get("files"):
        return False
    try:
        return file_stamps(model_dir, there["files"]) == there["files"]
    except OSError:
        return False
