"""Checkpoints: safetensors + JSON, written atomically, refused loudly when wrong.

A checkpoint is a folder `<run>/checkpoints/step-000123/` holding
    model.safetensors       model state (parameters and buffers such as MoE route biases)
    optimizer.safetensors   optimizer tensors, keyed "<optimizer>/<param name>/<state key>"
    state.json              format tag, step, configs, layout fingerprint, optimizer
                            hyper-parameters and scalar state
    tokenizer.json          the tokenizer the model was trained with
It is written into `step-000123.tmp/` and renamed into place only when complete, so a
crash mid-save never leaves a damaged "latest"; `latest_checkpoint` ignores *.tmp folders.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "engram-lm-checkpoint/1"
KEEP_LAST = 3


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").exists())
    return done[-1] if done else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    tokenizer_path: Path,
) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    opt_tensors, opt_meta = _flatten_optimizers(model, optimizers)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    payload = {"format": FORMAT, "step": step, "optimizers": opt_meta, **state}
    (tmp / "state.json").write_text(json.dumps(payload, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(final.parent)
    return final


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
    if state.get("format") != FORMAT:
        raise ValueError(f"{ckpt} has format {state.get('format')!r}, expected {FORMAT!r}: not a checkpoint of this tool")
    state["path"] = str(ckpt)
    return state


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}. The file is truncated or not a safetensors file") from None


def load_model_state(model: torch.nn.Module, ckpt: Path, expected_fingerprint: str | None, stored: str | None) -> None:
    if expected_fingerprint != stored:
        raise ValueError(
            f"checkpoint {ckpt} was trained with hash layout {stored}, this model has {expected_fingerprint}: "
            "the Engram tables would be read at the wrong rows. Use the checkpoint's own config"
        )
    tensors = load_tensors(Path(ckpt) / "model.safetensors")
    missing, unexpected = _key_diff(model.state_dict(), tensors)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in model.state_dict().items():
        if t.shape != tensors[name].shape:
            raise ValueError(f"checkpoint {ckpt}: {name} has shape {tuple(tensors[name].shape)}, model expects {tuple(t.shape)}")
    model.load_state_dict(tensors)


def load_optimizers(model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], ckpt: Path, meta: dict) -> None:
    tensors = load_tensors(Path(ckpt) / "optimizer.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    for key, opt in optimizers.items():
        if key not in meta:
            raise ValueError(f"checkpoint {ckpt} has no state for optimizer {key!r}; it was saved by another setup")
        sd = opt.state_dict()
        flat = [p for g in opt.param_groups for p in g["params"]]
        state = {}
        for idx, p in enumerate(flat):
            name = names[id(p)]
            entry = {k: v for k, v in meta[key]["scalars"].get(name, {}).items()}
            prefix = f"{key}/{name}/"
            entry.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            if entry:
                state[idx] = entry
        groups = meta[key]["param_groups"]
        if len(groups) != len(sd["param_groups"]):
            raise ValueError(f"checkpoint {ckpt}: optimizer {key!r} has a different group layout")
        for g_saved, g_now in zip(groups, sd["param_groups"]):
            g_saved["params"] = g_now["params"]
        opt.load_state_dict({"state": state, "param_groups": groups})


def _flatten_optimizers(model, optimizers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
                if isinstance(v, torch.Tensor):
                    tensors[f"{key}/{name}/{k}"] = v.detach().contiguous()
                else:
                    scalars.setdefault(name, {})[k] = v
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        meta[key] = {"param_groups": groups, "scalars": scalars}
    return tensors, meta


def _key_diff(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _prune(root: Path) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
