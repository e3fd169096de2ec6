"""The training loop, evaluation, and loading a trained model back.

`train(model_cfg, train_cfg, out_dir)` is what `engram train` runs. Rerunning it with the
same configs and out_dir resumes from the newest complete checkpoint: data order, lr
schedule and MoE balancing are functions of the step, and all optimizer state is saved,
so a resumed run reproduces the uninterrupted losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
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
from engram_lm.training.checkpointing import Checkpointer
from engram_lm.training.config import TrainConfig
from engram_lm.training.data import TokenData, eval_windows, prepare_data, sample_batch, seed_step
from engram_lm.training.optim import OptimConfig, build_optimizers, lr_multiplier, param_roles, set_lr
from engram_lm.training.interrupt import TrainingInterrupted, graceful_stop, refuse_divergence
from engram_lm.training.regime import with_row_dropout
from engram_lm.training.resume import checkpoint_to_resume, data_identity, resumed_tokenizer, run_table_regime
from engram_lm.training.run import MetricsLog, Progress, RunLock
from engram_lm.training.threads import ThreadGovernor, process_governor

__all__ = ["TrainResult", "TrainingInterrupted", "autocast", "evaluate", "resolve_model_config", "train"]


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
    later_steps: int = 0,
) -> TrainResult:
    """Train (or resume) a model; `stop_after` ends early after that step (for tests);
    `later_steps`: the steps of runs that follow in the same job (the quickstart's second
    model), counted in the progress line's ETA.
    Under torchrun (WORLD_SIZE > 1) tables are row-sharded across the ranks, the rest is
    data-parallel, each rank reads its slice of the global batch, and rank 0 logs.

    Resuming: the newest complete checkpoint (or `resume_from`), refused when the data or
    tokenizer changed unless `allow_data_change` (training/resume.py); `memory="ram"` keeps
    the Engram tables (and their optimizer moments) in host RAM while training
    (memory/host_trainable.py); a larger `steps` extends a finished run (only the schedule's
    length changes, logged). SIGINT/SIGTERM save a checkpoint at the end of the current step
    and raise `TrainingInterrupted` (training/interrupt.py). A non-finite loss stops the run
    with the last good checkpoint kept. The run folder is locked while training."""
    out_dir = Path(out_dir)
    ctx = DistContext.from_env((torch.device(device) if device else torch.device("cpu")).type)
    if memory not in ("device", "ram"):
        raise ValueError(f"--memory {memory!r}: training keeps tables on the 'device' or in host 'ram'")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder for the run")
    with RunLock(out_dir) if ctx.is_main else contextlib.nullcontext(), graceful_stop() as stop:
        return _train(model_cfg, train_cfg, out_dir, name, device, progress, stop_after, allow_data_change, resume_from,
                      stop, memory, later_steps)  # fmt: skip


@dataclass
class _Trainee:
    """A model on its device with its optimizers, as one step of the loop uses them."""

    model: EngramLM
    optimizers: dict[str, torch.optim.Optimizer]
    stepper: HostTableStepper | None  # steps the host tables' optimizer on a worker (memory="ram")
    stepped_here: dict[str, torch.optim.Optimizer]  # the optimizers the loop steps and schedules itself
    dense: list[torch.nn.Parameter]  # clipped
    replicated: list[torch.nn.Parameter]  # summed across ranks (all but sharded table rows)

    @property
    def fingerprint(self) -> str | None:
        return self.model.hasher.layout.fingerprint if self.model.hasher else None


def _train(model_cfg, train_cfg, out_dir, name, device, progress, stop_after, allow_data_change, resume_from,
           stop=None, memory="device", later_steps=0) -> TrainResult:  # fmt: skip
    device, ctx = _placement(device, train_cfg)
    keep_large_buffers_on_heap()
    data = _prepare_data_once(train_cfg.with_(tokenizer=resumed_tokenizer(train_cfg, out_dir, resume_from, ctx)), ctx)
    resolved = resolve_model_config(model_cfg, data)
    latest, events = checkpoint_to_resume(out_dir, model_cfg, train_cfg, resolved, data_identity(data),
                                          allow_data_change, resume_from, ctx)  # fmt: skip
    regime, chosen_now = run_table_regime(out_dir, latest, train_cfg, resolved, len(data.train), ctx)
    if chosen_now:
        events.append({"event": "table_regime", **regime.to_dict()})
    resolved = with_row_dropout(resolved, regime)
    trainee = _build_trainee(resolved, train_cfg.with_(table_weight_decay=regime.table_weight_decay), ctx, device, memory)
    start = _restore(trainee, latest)
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if latest is not None else None) if ctx.is_main else None
    if metrics is not None:
        for event in events:  # the table regime, deliberate changes on resume: kept with the losses they affect
            metrics.write(step=start, **event)
    said = [f"resuming from step {start} ({latest})"] if latest is not None else []
    said += [regime.line()] if resolved.engram is not None or resolved.overencoding is not None else []  # has tables
    if progress and ctx.is_main and said:
        print(f"{name}: " + "; ".join(said), file=sys.stderr, flush=True)
    state = {"fingerprint": trainee.fingerprint, "model_config": resolved.to_dict(), "train_config": train_cfg.to_dict(),
             "table_regime": regime.to_dict(), "name": name, "corpus": data.corpus}  # fmt: skip
    saver = Checkpointer(out_dir, train_cfg, trainee.model, trainee.optimizers, state, data.tokenizer_path, ctx,
                         trainee.stepper)  # fmt: skip
    bar = Progress(name, train_cfg.steps, enabled=progress and ctx.is_main, every=train_cfg.log_every,
                   later_steps=later_steps)  # fmt: skip
    loop = _StepLoop(trainee, data, train_cfg, device, ctx, metrics, saver, bar, stop)
    last, val_loss = loop.run(start, stop_after)
    if trainee.stepper is not None:
        trainee.stepper.close()
    if last == start and latest is not None:  # nothing left to train: report the checkpoint
        val_loss = evaluate(trainee.model, loop.windows, device)
    return TrainResult(
        name=name,
        run_dir=out_dir,
        counts=count_params(trainee.model).to_dict(),
        val_loss=val_loss,
        tokens_seen=last * loop.tokens_per_step,
        tokens_per_s=(last - start) * loop.tokens_per_step / loop.train_time if loop.train_time > 0 else 0.0,
        train_seconds=loop.train_time,
    )


def _placement(device: str | torch.device | None, train_cfg: TrainConfig) -> tuple[torch.device, DistContext]:
    """The compute device (this rank's GPU under torchrun) and the process group's context."""
    device = _device(device)
    ctx = DistContext.from_env(device.type)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    if train_cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {train_cfg.batch_size} does not divide over {ctx.world_size} ranks; "
                         f"use a multiple of {ctx.world_size}")  # fmt: skip
    return device, ctx


def _build_trainee(resolved: ModelConfig, train_cfg: TrainConfig, ctx: DistContext, device: torch.device,
                   memory: str) -> _Trainee:  # fmt: skip
    """The model (seeded, tables sharded over the ranks and, with memory="ram", kept on the
    host) and its optimizers."""
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
    stepper = HostTableStepper.for_model(model, optimizers) if memory == "ram" else None
    stepped_here = stepper.others(optimizers) if stepper else optimizers  # the stepper steps and schedules its own
    roles = param_roles(model)
    dense = [p for n, p in model.named_parameters() if roles[n] != "table"]
    return _Trainee(model, optimizers, stepper, stepped_here, dense, replicated_params(model))


def _restore(trainee: _Trainee, latest: Path | None) -> int:
    """Load the checkpoint to resume (model, tables, optimizer state); its step, or 0."""
    if latest is None:
        return 0
    state = ckpt_io.read_state(latest)
    ckpt_io.load_model_state(trainee.model, state, trainee.fingerprint)
    ckpt_io.load_optimizers(trainee.model, trainee.optimizers, state)
    return state["step"]


class _StepLoop:
    """The steps from `start` to the end: schedule, one optimizer step, logging, evaluation,
    the divergence check, saving and a requested stop, in that order at each step."""

    def __init__(self, trainee: _Trainee, data: TokenData, cfg: TrainConfig, device: torch.device, ctx: DistContext,
                 metrics: MetricsLog | None, saver: Checkpointer, bar: Progress, stop: dict[str, bool] | None) -> None:  # fmt: skip
        self.trainee, self.data, self.cfg, self.device, self.ctx = trainee, data, cfg, device, ctx
        self.metrics, self.saver, self.bar, self.stop = metrics, saver, bar, stop
        self.windows = eval_windows(data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        self.tokens_per_step = cfg.tokens_per_step
        self.train_time = 0.0
        # on a shared CPU, the cores others leave free (training/threads.py); under torchrun each rank keeps its own
        self.threads = process_governor() if device.type == "cpu" and not ctx.enabled else ThreadGovernor(enabled=False)

    def run(self, start: int, stop_after: int | None) -> tuple[int, float]:
        """Train; returns the last step done and the last validation loss (nan if none)."""
        val_loss, last = float("nan"), start
        self.trainee.model.train()
        for step in range(start, self.cfg.steps):
            val_loss = self.step(step, start, val_loss)
            last = step + 1
            if stop_after is not None and last >= stop_after:
                break
        self.bar.close()
        return last, val_loss

    def step(self, step: int, start: int, val_loss: float) -> float:
        cfg, t, done = self.cfg, self.trainee, step + 1
        t0 = time.perf_counter()
        multiplier = lr_multiplier(step, cfg.steps, cfg.warmup_steps, cfg.decay_at, cfg.decay_factor)
        set_lr(t.stepped_here, multiplier)
        seed_step(cfg.seed, step, self.ctx.rank)
        loss_value = _train_step(t.model, t.stepped_here, t.dense, t.replicated, self.data, cfg, step, self.device,
                                 self.ctx, stepper=t.stepper, lr_multiplier=multiplier)  # fmt: skip
        self.train_time += time.perf_counter() - t0
        if not math.isfinite(loss_value):
            refuse_divergence(loss_value, done, ckpt_io.latest_checkpoint(self.saver.out_dir),
                              "lower lr (--set lr=...) or table_lr_mult and resume or restart")  # fmt: skip
        if done % cfg.log_every == 0 or done == cfg.steps:
            lr = t.optimizers[next(iter(t.optimizers))].param_groups[0]["base_lr"] * multiplier  # not read from a worker
            self.log(step=done, loss=loss_value, lr=lr, tokens=done * self.tokens_per_step)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_loss = evaluate(t.model, self.windows, self.device)  # every rank: the lookups are collective
            self.log(step=done, val_loss=val_loss)
        self.save_or_stop(done)
        if (threads := self.threads.tick()) is not None:
            self.log(step=done, event="threads", threads=threads, busy_elsewhere=self.threads.changes[-1][1])
        rate = (done - start) * self.tokens_per_step / max(self.train_time, 1e-9)
        shared = f" ({self.threads.threads} of {self.threads.cores} cores: the machine is shared)" \
            if self.threads.threads < self.threads.cores else ""  # fmt: skip
        eta = (cfg.steps - done + self.bar.later_steps) * self.tokens_per_step / max(rate, 1e-9)
        self.bar.update(done, loss_value, rate, eta, shared)
        return val_loss

    def save_or_stop(self, done: int) -> None:
        """Save when due; after a stop request (on any rank), save and raise TrainingInterrupted."""
        stopping = self.ctx.any(bool(self.stop and self.stop["stop"]))
        if self.saver.is_due(done, stopping):
            self.saver.save(done)
        if stopping:
            self.bar.close()
            raise TrainingInterrupted(self.saver.out_dir, done)

    def log(self, **record: Any) -> None:
        if self.metrics is not None:
            self.metrics.write(**record)


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


def _device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch build has no CUDA device; use --device cpu or a CUDA build")
    return device
