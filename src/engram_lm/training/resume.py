"""Resuming a run folder: which checkpoint to continue from, whether the request, the data
and the tokenizer still match the run's, and the deliberate changes to record.

A new run writes `config.json` (the request, the resolved model, the data identity and the
run metadata); a resumed one is compared with it. Differences that change results are
refused with the flags that restore them; a larger `steps` and (with `allow_data_change`)
new data are allowed and returned as events for metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from engram_lm.checkpoint import store as ckpt_io
from engram_lm.distributed.context import DistContext
from engram_lm.models.config import ModelConfig
from engram_lm.training.config import TrainConfig
from engram_lm.training.data import TokenData
from engram_lm.training.regime import TableRegime, choose_table_regime, planned_epochs
from engram_lm.training.run import read_request, run_metadata, write_json

FREE_ON_RESUME = {"train.save_every", "train.save_minutes", "train.log_every"}  # cadence, not results


def data_identity(data: TokenData) -> dict[str, str]:
    """Content hashes of what the run trains on: the corpus documents and the tokenizer file."""
    return {"corpus": data.corpus, "corpus_sha256": data.corpus_digest,
            "tokenizer_sha256": hashlib.sha256(Path(data.tokenizer_path).read_bytes()).hexdigest()}  # fmt: skip


def resumed_tokenizer(train_cfg: TrainConfig, out_dir: Path, resume_from: str | Path | None, ctx: DistContext) -> str:
    """The tokenizer a run trains with: a resumed run keeps the BPE it was trained with, read
    from a copy beside the checkpoints (the checkpoint it came from is pruned later in the run)."""
    previous = Path(resume_from) if resume_from else ckpt_io.latest_checkpoint(out_dir)
    tokenizer = train_cfg.tokenizer
    if previous is not None and tokenizer.startswith("bpe:") and (previous / "tokenizer.json").exists():
        tokenizer = str(run_tokenizer(previous / "tokenizer.json", Path(out_dir), ctx))
    return tokenizer


def run_tokenizer(source: Path, out_dir: Path, ctx: DistContext) -> Path:
    """`out_dir/tokenizer.json`, a copy of `source` (written atomically by the main rank)."""
    stable = out_dir / "tokenizer.json"
    if ctx.is_main and (not stable.exists() or stable.read_bytes() != source.read_bytes()):
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = stable.with_suffix(".json.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, stable)
    ctx.barrier()
    return stable


def checkpoint_to_resume(out_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, resolved: ModelConfig,
                         identity: dict[str, str], allow_data_change: bool, resume_from: str | Path | None,
                         ctx: DistContext) -> tuple[Path | None, list[dict[str, Any]]]:  # fmt: skip
    """The checkpoint every rank resumes from (None: a new run) and the deliberate changes
    to record. The main rank checks the run folder first; the others wait for it."""
    events: list[dict[str, Any]] = []
    latest = (prepare_run_dir(out_dir, model_cfg, train_cfg, resolved, identity, allow_data_change, events, resume_from)
              if ctx.is_main else None)  # fmt: skip
    ctx.barrier()
    if not ctx.is_main:
        latest = Path(resume_from) if resume_from else ckpt_io.latest_checkpoint(out_dir)
    return latest, events


def prepare_run_dir(out_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, resolved: ModelConfig,
                    identity: dict[str, str], allow_data_change: bool, events: list[dict[str, Any]],
                    resume_from: str | Path | None = None) -> Path | None:  # fmt: skip
    """Write config.json for a new run, or check it matches and return the checkpoint to
    resume. Allowed differences on resume (a larger `steps`, deliberately changed data)
    are appended to `events` and recorded in config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    requested = json.loads(json.dumps({"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}))
    config_path = out_dir / "config.json"
    latest = resume_point(out_dir, resume_from)
    if latest is None or not config_path.exists():
        write_json(config_path, {"requested": requested, "resolved_model": resolved.to_dict(), "data_identity": identity,
                                 **run_metadata()})  # fmt: skip
        return latest
    saved = _read_config(config_path)
    _check_request(out_dir, read_request(saved.get("requested") or {}), requested, latest, events)
    check_data_identity(out_dir, saved.get("data_identity"), identity, allow_data_change, events)
    if events:
        write_json(config_path, {**saved, "requested": requested, "data_identity": identity})
    return latest


def _check_request(out_dir: Path, old: dict[str, Any], requested: dict[str, Any], latest: Path,
                   events: list[dict[str, Any]]) -> None:  # fmt: skip
    """Refuse a resumed request that differs in anything but cadence or a longer `steps`."""
    diff = _differences(old, requested) - FREE_ON_RESUME
    steps_key = "train.steps"
    if diff - {steps_key}:
        changed = sorted(diff - {steps_key})
        shown = ", ".join(f"{k}: {_get(old, k)!r} -> {_get(requested, k)!r}" for k in changed)
        restore = " ".join(f"--set {_set_key(k)}={json.dumps(_get(old, k))}" for k in changed)
        raise ValueError(f"{out_dir} holds a run with a different configuration ({shown}); pass a new --out to start "
                         f"another run, or the same flags to resume this one (after a default changed: {restore})")  # fmt: skip
    step = ckpt_io.read_state(latest)["step"]
    if steps_key in diff:
        if requested["train"]["steps"] < step:
            raise ValueError(f"--steps {requested['train']['steps']} is below the checkpoint's step {step}; "
                             f"resume with --steps >= {step}, or pass --resume-from an earlier checkpoint")  # fmt: skip
        events.append({"event": "steps_changed", "from": old["train"]["steps"], "to": requested["train"]["steps"],
                       "note": "the learning-rate schedule now spans the new length"})  # fmt: skip


def check_data_identity(out_dir: Path, before: dict[str, str] | None, identity: dict[str, str], allow_data_change: bool,
                events: list[dict[str, Any]]) -> None:  # fmt: skip
    """Refuse resuming on other data or another tokenizer unless `allow_data_change`."""
    if before is None or before == identity:
        return
    changed = [k for k in ("corpus", "corpus_sha256", "tokenizer_sha256") if before.get(k) != identity.get(k)]
    if not allow_data_change:
        shown = ", ".join(f"{k} {str(before.get(k))[:16]} -> {str(identity.get(k))[:16]}" for k in changed)
        raise ValueError(f"{out_dir} was trained on different data or with a different tokenizer ({shown}); "
                         "pass --allow-data-change to continue on the new data deliberately (recorded in "
                         "metrics.jsonl), or a new --out")  # fmt: skip
    events.append({"event": "data_changed", "from": before, "to": identity})


def run_table_regime(out_dir: Path, latest: Path | None, train_cfg: TrainConfig, resolved: ModelConfig,
                     train_tokens: int, ctx: DistContext) -> tuple[TableRegime, bool]:  # fmt: skip
    """The decay and row dropout the run trains its tables with (training/regime.py), and
    whether it was chosen now: a resumed run keeps the one config.json recorded when it
    started (a longer --steps does not switch it); a new one chooses from its planned epochs
    and the main rank records it."""
    config_path = Path(out_dir) / "config.json"
    saved = _read_config(config_path) if config_path.exists() else {}
    if latest is not None and "table_regime" in saved:
        return TableRegime.from_dict(saved["table_regime"]), False
    row_dropout = resolved.engram.row_dropout if resolved.engram is not None else 0.0
    epochs = planned_epochs(train_cfg.steps, train_cfg.tokens_per_step, train_tokens)
    regime = choose_table_regime(epochs, train_cfg.table_weight_decay, row_dropout)
    if ctx.is_main:
        write_json(config_path, {**saved, "table_regime": regime.to_dict()})
    return regime, True


def resume_point(out_dir: Path, resume_from: str | Path | None) -> Path | None:
    if resume_from is None:
        return ckpt_io.latest_checkpoint(out_dir)
    path = Path(resume_from)
    if not (path / "state.json").exists():
        raise ValueError(f"--resume-from {path}: not a checkpoint folder (no state.json); "
                         f"choose one of {out_dir}/checkpoints/step-*")  # fmt: skip
    return path


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or pass a new --out") from None


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys where two nested dicts differ."""
    out = set()
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.add(f"{prefix}{k}")
    return out


def _set_key(dotted: str) -> str:
    """The `--set` key of a dotted config key: train.lr -> lr, model.engram.seed -> engram.seed."""
    return dotted.split(".", 1)[1]


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
