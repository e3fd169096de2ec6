"""The training loop, evaluation, and loading a trained model back.

`train(model_cfg, train_cfg, out_dir)` is what `engram train` runs. Rerunning it with the
same configs and out_dir resumes from the newest complete checkpoint: data order, lr
schedule and MoE balancing are functions of the step, and all optimizer state is saved,
so a resumed run reproduces the uninterrupted losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engram_lm.distributed.context import (
    DistContext, all_reduce_dense_grads, all_reduce_moe_loads, replicated_params, shard_tables,
)  # fmt: skip
from engram_lm.memory.host_trainable import HostTableStepper, tables_to_host
from engram_lm.models.accounting import count_params
from engram_lm.models.config import ModelConfig
from engram_lm.models.transformer import EngramLM
from engram_lm.checkpoint import store as ckpt_io
from engram_lm.training.allocator import keep_large_buffers_on_heap
from engram_lm.training.config import TrainConfig
from engram_lm.training.data import TokenData, eval_windows, prepare_data, sample_batch, seed_step
from engram_lm.training.optim import OptimConfig, build_optimizers, lr_multiplier, param_roles, set_lr
from engram_lm.training.run import MetricsLog, Progress, RunLock, read_request, run_metadata, write_json


def resolve_model_config(model_cfg: ModelConfig, data: TokenData) -> ModelConfig:
    """Fill in what the tokenizer decides: vocabulary size, end-of-document id, and the
    tokenizer file Engram hashing compresses with (OverEncoding hashes raw ids)."""
    changes: dict[str, Any] = {"vocab_size": data.vocab_size, "eod_id": data.eod_id}
    if model_cfg.engram is not None:
        changes["engram"] = model_cfg.engram.with_(tokenizer=str(data.tokenizer_path))
    return model_cfg.with_(**changes)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: EngramLM, windows: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in windows:
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


@dataclass
class TrainResult:
    name: str
    run_dir: Path
    counts: dict[str, int]
    val_loss: float
    tokens_seen: int
    tokens_per_s: float
    train_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.counts, "val_loss": self.val_loss, "tokens_seen": self.tokens_seen,
                "tokens_per_s": self.tokens_per_s, "train_seconds": self.train_seconds, "run_dir": str(self.run_dir)}  # fmt: skip


def _run_tokenizer(source: Path, out_dir: Path, ctx: DistContext) -> Path:
    """`out_dir/tokenizer.json`, a copy of `source` (written atomically by the main rank)."""
    stable = out_dir / "tokenizer.json"
    if ctx.is_main and (not stable.exists() or stable.read_bytes() != source.read_bytes()):
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = stable.with_suffix(".json.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, stable)
    ctx.barrier()
    return stable


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    *,
    name: str = "run",
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    allow_data_change: bool = False,
    resume_from: str | Path | None = None,
    memory: str = "device",
) -> TrainResult:
    """Train (or resume) a model; `stop_after` ends early after that step (for tests).
    Under torchrun (WORLD_SIZE > 1) tables are row-sharded across the ranks, the rest is
    data-parallel, each rank reads its slice of the global batch, and rank 0 logs.

    Resuming: the newest complete checkpoint (or `resume_from`), refused when the data or
    tokenizer changed unless `allow_data_change`; `memory="ram"` keeps the Engram tables
    (and their optimizer moments) in host RAM while training (memory/host_trainable.py); a larger `steps` extends a finished run
    (only the schedule's length changes, logged). SIGINT/SIGTERM save a checkpoint at the
    end of the current step and raise `TrainingInterrupted`. A non-finite loss stops the
    run with the last good checkpoint kept. The run folder is locked while training."""
    out_dir = Path(out_dir)
    ctx = DistContext.from_env((torch.device(device) if device else torch.device("cpu")).type)
    if memory not in ("device", "ram"):
        raise ValueError(f"--memory {memory!r}: training keeps tables on the 'device' or in host 'ram'")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder for the run")
    with RunLock(out_dir) if ctx.is_main else contextlib.nullcontext(), _graceful_stop() as stop:
        return _train(model_cfg, train_cfg, out_dir, name, device, progress, stop_after, allow_data_change, resume_from,
                      stop, memory)  # fmt: skip


class TrainingInterrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving the checkpoint of `step`."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved in {run_dir}; rerun the same command to resume")
        self.run_dir, self.step = run_dir, step


@contextlib.contextmanager
def _graceful_stop():
    """A flag set by SIGINT/SIGTERM (main thread only); the loop saves and stops at the end
    of the step. A second Ctrl-C while saving is honoured by the default handler."""
    import signal
    import threading

    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["stop"] = True
        signal.signal(signum, previous[signum])

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _train(model_cfg, train_cfg, out_dir, name, device, progress, stop_after, allow_data_change, resume_from,
           stop=None, memory="device") -> TrainResult:  # fmt: skip
    device = _device(device)
    ctx = DistContext.from_env(device.type)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    if train_cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {train_cfg.batch_size} does not divide over {ctx.world_size} ranks; "
                         f"use a multiple of {ctx.world_size}")  # fmt: skip
    keep_large_buffers_on_heap()
    previous = Path(resume_from) if resume_from else ckpt_io.latest_checkpoint(out_dir)
    tokenizer = train_cfg.tokenizer
    if previous is not None and tokenizer.startswith("bpe:") and (previous / "tokenizer.json").exists():
        # a resumed run keeps the tokenizer it was trained with, read from a copy beside the
        # checkpoints: the checkpoint it came from is pruned later in this run
        tokenizer = str(_run_tokenizer(previous / "tokenizer.json", Path(out_dir), ctx))
    data = _prepare_data_once(train_cfg.with_(tokenizer=tokenizer), ctx)
    resolved = resolve_model_config(model_cfg, data)
    identity = data_identity(data)
    events: list[dict[str, Any]] = []
    latest = (_prepare_run_dir(out_dir, model_cfg, train_cfg, resolved, identity, allow_data_change, events, resume_from)
              if ctx.is_main else None)  # fmt: skip
    ctx.barrier()
    if not ctx.is_main:
        latest = Path(resume_from) if resume_from else ckpt_io.latest_checkpoint(out_dir)

    torch.manual_seed(train_cfg.seed)
    model = EngramLM(resolved)
    shard_tables(model, ctx)
    if memory == "ram":
        tables_to_host(model, device)
    model.to(device)
    optimizers = build_optimizers(model, OptimConfig(lr=train_cfg.lr, table_lr_mult=train_cfg.table_lr_mult,
                                                     weight_decay=train_cfg.weight_decay,
                                                     table_weight_decay=train_cfg.table_weight_decay,
                                                     matrix_optimizer=train_cfg.matrix_optimizer))  # fmt: skip
    fingerprint = model.hasher.layout.fingerprint if model.hasher else None
    stepper = HostTableStepper.for_model(model, optimizers) if memory == "ram" else None
    stepped_here = stepper.others(optimizers) if stepper else optimizers  # the stepper steps and schedules its own
    start = 0
    if latest is not None:
        state = ckpt_io.read_state(latest)
        ckpt_io.load_model_state(model, state, fingerprint)
        ckpt_io.load_optimizers(model, optimizers, state)
        start = state["step"]
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if latest is not None else None) if ctx.is_main else None
    if metrics is not None:
        for event in events:  # deliberate changes on resume, kept with the losses they affect
            metrics.write(step=start, **event)
    if latest is not None and progress and ctx.is_main:
        print(f"{name}: resuming from step {start} ({latest})", file=sys.stderr, flush=True)
    windows = eval_windows(data.val, train_cfg.batch_size, train_cfg.seq_len, train_cfg.eval_batches)
    roles = param_roles(model)
    dense = [p for n, p in model.named_parameters() if roles[n] != "table"]  # clipped
    replicated = replicated_params(model)  # summed across ranks (all but sharded table rows)
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum
    bar = Progress(name, train_cfg.steps, enabled=progress and ctx.is_main, every=train_cfg.log_every)
    val_loss, train_time, last = float("nan"), 0.0, start
    last_save = time.monotonic()
    model.train()

    def log(**record: Any) -> None:
        if metrics is not None:
            metrics.write(**record)

    def save(step: int) -> None:
        if stepper is not None:
            stepper.wait()  # the rows and moments of this step, not of the one before
        state = {"fingerprint": fingerprint, "model_config": resolved.to_dict(), "train_config": train_cfg.to_dict(),
                 "name": name, "corpus": data.corpus}  # fmt: skip
        ckpt_io.save_checkpoint(out_dir, step, model, optimizers, state, data.tokenizer_path,
                                rank=ctx.rank, world_size=ctx.world_size)  # fmt: skip

    for step in range(start, train_cfg.steps):
        t0 = time.perf_counter()
        multiplier = lr_multiplier(step, train_cfg.steps, train_cfg.warmup_steps, train_cfg.decay_at,
                                   train_cfg.decay_factor)  # fmt: skip
        set_lr(stepped_here, multiplier)
        seed_step(train_cfg.seed, step, ctx.rank)
        loss_value = _train_step(model, stepped_here, dense, replicated, data, train_cfg, step, device, ctx,
                                 stepper=stepper, lr_multiplier=multiplier)  # fmt: skip
        train_time += time.perf_counter() - t0
        done = step + 1
        if not math.isfinite(loss_value):
            good = ckpt_io.latest_checkpoint(out_dir)
            raise ValueError(
                f"the training loss became {loss_value} at step {done}: the run diverged; nothing was saved after it"
                f" (last good checkpoint: {good or 'none'}); lower lr (--set lr=...) or table_lr_mult and resume or restart"
            )
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            lr = optimizers[next(iter(optimizers))].param_groups[0]["base_lr"] * multiplier  # not read from a worker
            log(step=done, loss=loss_value, lr=lr, tokens=done * tokens_per_step)
        if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
            val_loss = evaluate(model, windows, device)  # every rank: the lookups are collective
            log(step=done, val_loss=val_loss)
        stopping = ctx.any(bool(stop and stop["stop"]))
        due = time.monotonic() - last_save >= 60 * train_cfg.save_minutes if train_cfg.save_minutes else False
        if (train_cfg.save_every and done % train_cfg.save_every == 0) or done == train_cfg.steps or stopping or ctx.any(due):
            save(done)
            last_save = time.monotonic()
        if stopping:
            bar.close()
            raise TrainingInterrupted(out_dir, done)
        rate = (done - start) * tokens_per_step / max(train_time, 1e-9)
        bar.update(done, loss_value, rate, (train_cfg.steps - done) * tokens_per_step / max(rate, 1e-9))
        last = done
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    if stepper is not None:
        stepper.close()
    if last == start and latest is not None:  # nothing left to train: report the checkpoint
        val_loss = evaluate(model, windows, device)
    return TrainResult(
        name=name,
        run_dir=out_dir,
        counts=count_params(model).to_dict(),
        val_loss=val_loss,
        tokens_seen=last * tokens_per_step,
        tokens_per_s=(last - start) * tokens_per_step / train_time if train_time > 0 else 0.0,
        train_seconds=train_time,
    )


def _train_step(model, optimizers, dense, replicated, data: TokenData, cfg: TrainConfig, step: int, device,
                ctx: DistContext, stepper: HostTableStepper | None = None, lr_multiplier: float = 1.0) -> float:  # fmt: skip
    """One optimizer step over grad_accum micro-batches of this rank's slice; returns the
    global mean loss. The loss is scaled by 1/(accum * P) so summed gradients are means.
    With a `stepper` the host tables' optimizer steps on a worker while `optimizers` (the
    others) step here."""
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = sample_batch(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, step=step, micro=micro,
                            rank=ctx.rank, world_size=ctx.world_size)  # fmt: skip
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        (loss / (cfg.grad_accum * ctx.world_size)).backward()
        loss_sum += loss.item()
    all_reduce_dense_grads(replicated, ctx)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(dense, cfg.grad_clip)
    if stepper is not None:
        stepper.launch(lr_multiplier)  # overlaps the dense steps below and the next forward
    for opt in optimizers.values():
        opt.step()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    all_reduce_moe_loads(model, ctx)
    model.update_route_biases()
    return ctx.mean(loss_sum / cfg.grad_accum)


def _prepare_data_once(cfg: TrainConfig, ctx: DistContext) -> TokenData:
    """Rank 0 builds the tokenizer and token files first; the others then reuse the cache."""
    if ctx.is_main:
        data = prepare_data(cfg.data, cfg.tokenizer)
    ctx.barrier()
    return data if ctx.is_main else prepare_data(cfg.data, cfg.tokenizer)


def data_identity(data: TokenData) -> dict[str, str]:
    """Content hashes of what the run trains on: the corpus documents and the tokenizer file."""
    return {"corpus": data.corpus, "corpus_sha256": data.corpus_digest,
            "tokenizer_sha256": hashlib.sha256(Path(data.tokenizer_path).read_bytes()).hexdigest()}  # fmt: skip


def _device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch build has no CUDA device; use --device cpu or a CUDA build")
    return device


FREE_ON_RESUME = {"train.save_every", "train.save_minutes", "train.log_every"}  # cadence, not results


def _prepare_run_dir(out_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, resolved: ModelConfig,
                     identity: dict[str, str], allow_data_change: bool, events: list[dict[str, Any]],
                     resume_from: str | Path | None = None) -> Path | None:  # fmt: skip
    """Write config.json for a new run, or check it matches and return the checkpoint to
    resume. Allowed differences on resume (a larger `steps`, deliberately changed data)
    are appended to `events` and recorded in config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    requested = json.loads(json.dumps({"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}))
    config_path = out_dir / "config.json"
    latest = _resume_point(out_dir, resume_from)
    if latest is None or not config_path.exists():
        write_json(config_path, {"requested": requested, "resolved_model": resolved.to_dict(), "data_identity": identity,
                                 **run_metadata()})  # fmt: skip
        return latest
    saved = _read_config(config_path)
    old = read_request(saved.get("requested") or {})
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
    before = saved.get("data_identity")
    if before is not None and before != identity:
        changed = [k for k in ("corpus", "corpus_sha256", "tokenizer_sha256") if before.get(k) != identity.get(k)]
        if not allow_data_change:
            shown = ", ".join(f"{k} {str(before.get(k))[:16]} -> {str(identity.get(k))[:16]}" for k in changed)
            raise ValueError(f"{out_dir} was trained on different data or with a different tokenizer ({shown}); "
                             "pass --allow-data-change to continue on the new data deliberately (recorded in "
                             "metrics.jsonl), or a new --out")  # fmt: skip
        events.append({"event": "data_changed", "from": before, "to": identity})
    if events:
        write_json(config_path, {**saved, "requested": requested, "data_identity": identity})
    return latest


def _resume_point(out_dir: Path, resume_from: str | Path | None) -> Path | None:
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
