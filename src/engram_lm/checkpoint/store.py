"""Checkpoints: safetensors + JSON, written atomically, refused loudly when wrong.

A checkpoint is a folder `<run>/checkpoints/step-000123/` holding
    model.safetensors            every model tensor except the memory tables
    optimizer.safetensors        dense optimizer tensors, "<optimizer>/<param name>/<key>"
    table-shard-RRR.safetensors  one per rank: its rows [start, end) of every table
                                 ("<param>") and their Adam moments ("<param>.exp_avg",
                                 "<param>.exp_avg_sq")
    state.json                   format, step, configs, layout fingerprint, optimizer
                                 hyper-parameters and scalars, table shapes and shard bounds
    tokenizer.json               the tokenizer the model was trained with
A single process writes one shard holding whole tables; P ranks write P shards. Any
reader can ask for any row range (`read_table_rows`), so a checkpoint loads with a
different number of ranks (resharding) or in one process. Everything is written into
`step-000123.tmp/` and renamed into place only when complete, so a crash mid-save never
leaves a damaged "latest"; `latest_checkpoint` ignores *.tmp folders. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


FORMAT = "engram-lm-checkpoint/2"
KEEP_LAST = 3
MOMENTS = ("exp_avg", "exp_avg_sq")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").exists())
    return done[-1] if done else None


def table_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Parameter name -> table module, for every trainable table (dense or sharded): any
    module with `num_rows`, `dim` and a `weight` parameter (the MemoryTable interface; by
    duck type, so this layer imports nothing from the memory tiers above it)."""
    return {f"{name}.weight": m for name, m in model.named_modules()
            if hasattr(m, "num_rows") and hasattr(m, "dim") and isinstance(getattr(m, "weight", None), torch.nn.Parameter)}  # fmt: skip


def _row_range(table: torch.nn.Module) -> tuple[int, int]:
    return getattr(table, "start", 0), getattr(table, "end", table.num_rows)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    tokenizer_path: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """Collective when world_size > 1: every rank calls it; rank 0 writes the shared files.
    A failed save (disk full, I/O error) removes its partial folder and leaves the earlier
    checkpoints untouched."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        return _save_checkpoint(final, tmp, model, optimizers, state, tokenizer_path, step, rank, world_size)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_checkpoint(final: Path, tmp: Path, model, optimizers, state, tokenizer_path, step, rank, world_size) -> Path:
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world_size)
    tables = table_modules(model)
    table_opt = optimizers.get("table")
    shard: dict[str, torch.Tensor] = {}
    for name, table in tables.items():
        shard[name] = table.weight.detach().contiguous()
        moments = table_opt.state.get(table.weight, {}) if table_opt is not None else {}
        for key in MOMENTS:
            if key in moments:
                shard[f"{name}.{key}"] = moments[key].contiguous()
    ranges = {name: list(_row_range(table)) for name, table in tables.items()}
    tag = {"format": FORMAT, "fingerprint": str(state.get("fingerprint")), "step": str(step), "rank": str(rank),
           "world_size": str(world_size), "ranges": json.dumps(ranges)}  # fmt: skip
    save_file(shard, tmp / f"table-shard-{rank:03d}.safetensors", metadata=tag)
    if rank == 0:
        dense = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tables}
        save_file(dense, tmp / "model.safetensors")
        opt_tensors, opt_meta = _flatten_optimizers(model, optimizers, set(tables))
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        shapes = {name: {"rows": t.num_rows, "dim": t.dim} for name, t in tables.items()}
        payload = {"format": FORMAT, "step": step, "optimizers": opt_meta, "tables": shapes,
                   "table_shards": world_size, **state}  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(payload, indent=2))
    _barrier(world_size)
    if rank == 0:
        _write_shard_index(tmp, world_size)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune(final.parent)
    _barrier(world_size)
    return final


def _write_shard_index(folder: Path, world_size: int) -> None:
    """Record each shard's row range per table in state.json (read from the shard files)."""
    state = json.loads((folder / "state.json").read_text())
    index: dict[str, list[list[int]]] = {}
    start = {name: 0 for name in state["tables"]}
    for r in range(world_size):
        with safe_open(str(folder / f"table-shard-{r:03d}.safetensors"), framework="pt") as f:
            for name in state["tables"]:
                rows = f.get_slice(name).get_shape()[0]
                index.setdefault(name, []).append([start[name], start[name] + rows])
                start[name] += rows
    state["table_shard_ranges"] = index
    (folder / "state.json").write_text(json.dumps(state, indent=2))


REQUIRED_STATE_KEYS = ("format", "step", "model_config", "train_config")


def read_state(ckpt: Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    if ckpt.is_dir() and (ckpt / "checkpoints").is_dir():  # a run folder: take its newest
        latest = latest_checkpoint(ckpt)
        if latest is None:
            raise ValueError(f"run folder {ckpt} has no complete checkpoint")
        ckpt = latest
    path = ckpt / "state.json"
    if not path.exists():
        raise ValueError(f"{ckpt} is not an engram-lm checkpoint (no state.json); pass a checkpoint or run folder")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is damaged ({exc.msg}); use an earlier checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{ckpt} has format {found!r}, expected {FORMAT!r}: not a checkpoint of this tool")
    missing = [k for k in REQUIRED_STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}: the checkpoint is damaged; "
                         "use an earlier one (engram train --resume-from DIR)")  # fmt: skip
    state["path"] = str(ckpt)
    return state


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}. The file is truncated or not a safetensors file") from None


def read_table_rows(state: dict[str, Any], name: str, start: int, end: int, key: str = "") -> torch.Tensor | None:
    """Rows [start, end) of table `name` (or of its moment `key`) from whichever shards hold
    them. None when the checkpoint has no such moment (a table never updated)."""
    ckpt = Path(state["path"])
    if name not in state.get("tables", {}):
        raise ValueError(f"checkpoint {ckpt} has no table {name!r}; it was saved by a different model")
    parts = []
    for r, (lo, hi) in enumerate(state["table_shard_ranges"][name]):
        a, b = max(lo, start), min(hi, end)
        if a >= b:
            continue
        path = ckpt / f"table-shard-{r:03d}.safetensors"
        if not path.exists():
            raise ValueError(f"checkpoint {ckpt} lacks {path.name} (rows {lo}..{hi} of {name}); it is incomplete")
        try:
            with safe_open(str(path), framework="pt") as f:
                _check_shard(f.metadata() or {}, state, r, name, [lo, hi], path)
                tensor = f"{name}.{key}" if key else name
                if tensor not in f.keys():
                    return None
                parts.append(f.get_slice(tensor)[a - lo : b - lo])
        except SafetensorError as exc:
            raise ValueError(f"cannot read {path}: {exc}. The file is truncated or not a safetensors file") from None
    out = torch.cat(parts) if parts else torch.empty(0, state["tables"][name]["dim"])
    if out.shape[0] != end - start:
        raise ValueError(f"checkpoint {ckpt} holds {out.shape[0]} of rows {start}..{end} of {name}: shards are missing")
    return out


def _check_shard(tag: dict, state: dict, rank: int, name: str, rows: list[int], path: Path) -> None:
    expected = {"fingerprint": str(state.get("fingerprint")), "step": str(state["step"]), "rank": str(rank),
                "world_size": str(state["table_shards"])}  # fmt: skip
    got = {k: tag.get(k) for k in expected}
    if got != expected or json.loads(tag.get("ranges", "{}")).get(name) != rows:
        raise ValueError(
            f"{path} belongs to another checkpoint (it says {got}, rows {json.loads(tag.get('ranges', '{}')).get(name)}; "
            f"expected {expected}, rows {rows}); restore the shard files saved with this state.json"
        )


def check_fingerprint(ckpt: Path, expected: str | None, stored: str | None) -> None:
    if expected != stored:
        raise ValueError(
            f"checkpoint {ckpt} was trained with hash layout {stored}, this model has {expected}: "
            "the Engram tables would be read at the wrong rows. Use the checkpoint's own config"
        )


def load_model_state(model: torch.nn.Module, state: dict[str, Any], expected_fingerprint: str | None) -> None:
    ckpt = Path(state["path"])
    check_fingerprint(ckpt, expected_fingerprint, state.get("fingerprint"))
    tables = table_modules(model)
    tensors = load_tensors(ckpt / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if k not in tables}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected or set(tables) != set(state.get("tables", {})):
        raise ValueError(f"checkpoint {ckpt} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in expected.items():
        if t.shape != tensors[name].shape:
            raise ValueError(f"checkpoint {ckpt}: {name} has shape {tuple(tensors[name].shape)}, model expects {tuple(t.shape)}")
    model.load_state_dict(tensors, strict=False)
    for name, table in tables.items():
        saved = state["tables"][name]
        if (saved["rows"], saved["dim"]) != (table.num_rows, table.dim):
            raise ValueError(f"checkpoint {ckpt}: table {name} is {saved['rows']} x {saved['dim']}, model has {table.num_rows} x {table.dim}")
        with torch.no_grad():
            table.weight.copy_(read_table_rows(state, name, *_row_range(table)))


def load_optimizers(model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any]) -> None:
    ckpt, meta = Path(state["path"]), state["optimizers"]
    tensors = load_tensors(ckpt / "optimizer.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    tables = table_modules(model)
    for key, opt in optimizers.items():
        if key not in meta:
            raise ValueError(f"checkpoint {ckpt} has no state for optimizer {key!r}; it was saved by another setup")
        sd = opt.state_dict()
        flat = [p for g in opt.param_groups for p in g["params"]]
        opt_state = {}
        for idx, p in enumerate(flat):
            name = names[id(p)]
            entry = dict(meta[key]["scalars"].get(name, {}))
            if name in tables:
                entry = _table_moments(state, name, tables[name], entry)
            prefix = f"{key}/{name}/"
            entry.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            if entry:
                opt_state[idx] = entry
        groups = meta[key]["param_groups"]
        if len(groups) != len(sd["param_groups"]):
            raise ValueError(f"checkpoint {ckpt}: optimizer {key!r} has a different group layout")
        for g_saved, g_now in zip(groups, sd["param_groups"]):
            g_saved["params"] = g_now["params"]
        opt.load_state_dict({"state": opt_state, "param_groups": groups})


def _table_moments(state: dict, name: str, table: torch.nn.Module, scalars: dict) -> dict:
    if "step" not in scalars:
        return {}
    entry: dict[str, Any] = {"step": torch.tensor(float(scalars["step"]), dtype=torch.float64)}
    for key in MOMENTS:
        rows = read_table_rows(state, name, *_row_range(table), key=key)
        if rows is None:
            return {}
        entry[key] = rows
    return entry


def _flatten_optimizers(model, optimizers, table_names: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for key, opt in optimizers.items():
        sd = opt.state_dict()
        flat = [p for g in opt.param_groups for p in g["params"]]
        scalars: dict[str, dict[str, Any]] = {}
        for idx, entry in sd["state"].items():
            name = names[id(flat[idx])]
            for k, v in entry.items():
                if name in table_names:  # moments live in the table shards; keep the step here
                    if k == "step":
                        scalars.setdefault(name, {})[k] = float(v)
                elif isinstance(v, torch.Tensor):
                    tensors[f"{key}/{name}/{k}"] = v.detach().contiguous()
                else:
                    scalars.setdefault(name, {})[k] = v
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        meta[key] = {"param_groups": groups, "scalars": scalars}
    return tensors, meta


def prune(root: Path) -> None:
    """Keep the newest KEEP_LAST complete checkpoints under `root`."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
