"""The training loop, evaluation, and loading a trained model back.

`train(model_cfg, train_cfg, out_dir)` is what `engram train` runs. Rerunning it with the
same configs and out_dir resumes from the newest complete checkpoint: data order, lr
schedule and MoE balancing are functions of the step, and all optimizer state is saved,
so a resumed run reproduces the uninterrupted losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engram_lm.distributed.context import (
    DistContext, all_reduce_dense_grads, all_reduce_moe_loads, shard_tables,
)  # fmt: skip
from engram_lm.models.accounting import count_params
from engram_lm.models.config import ModelConfig
from engram_lm.models.transformer import EngramLM
from engram_lm.training import checkpoint as ckpt_io
from engram_lm.training.allocator import keep_large_buffers_on_heap
from engram_lm.training.config import TrainConfig
from engram_lm.training.data import TokenData, eval_windows, prepare_data, sample_batch
from engram_lm.training.optim import OptimConfig, build_optimizers, lr_multiplier, param_roles, set_lr
from engram_lm.training.run import MetricsLog, Progress, run_metadata, write_json


def resolve_model_config(model_cfg: ModelConfig, data: TokenData) -> ModelConfig:
    """Fill in what the tokenizer decides: vocabulary size, end-of-document id, and the
    tokenizer file Engram/OverEncoding hashing compresses with."""
    changes: dict[str, Any] = {"vocab_size": data.vocab_size, "eod_id": data.eod_id}
    for key in ("engram", "overencoding"):
        sub = getattr(model_cfg, key)
        if sub is not None:
            changes[key] = sub.with_(tokenizer=str(data.tokenizer_path))
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
) -> TrainResult:
    """Train (or resume) a model; `stop_after` ends early after that step (for tests).
    Under torchrun (WORLD_SIZE > 1) tables are row-sharded across the ranks, the rest is
    data-parallel, each rank reads its slice of the global batch, and rank 0 logs."""
    out_dir = Path(out_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = DistContext.from_env(device.type)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    if train_cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {train_cfg.batch_size} does not divide over {ctx.world_size} ranks; "
                         f"use a multiple of {ctx.world_size}")  # fmt: skip
    keep_large_buffers_on_heap()
    data = _prepare_data_once(train_cfg, ctx)
    resolved = resolve_model_config(model_cfg, data)
    latest = _prepare_run_dir(out_dir, model_cfg, train_cfg, resolved) if ctx.is_main else None
    ctx.barrier()
    latest = ckpt_io.latest_checkpoint(out_dir) if not ctx.is_main else latest

    torch.manual_seed(train_cfg.seed)
    model = EngramLM(resolved)
    shard_tables(model, ctx)
    model.to(device)
    optimizers = build_optimizers(model, OptimConfig(lr=train_cfg.lr, table_lr_mult=train_cfg.table_lr_mult,
                                                     weight_decay=train_cfg.weight_decay,
                                                     matrix_optimizer=train_cfg.matrix_optimizer))  # fmt: skip
    fingerprint = model.hasher.layout.fingerprint if model.hasher else None
    start = 0
    if latest is not None:
        state = ckpt_io.read_state(latest)
        ckpt_io.load_model_state(model, state, fingerprint)
        ckpt_io.load_optimizers(model, optimizers, state)
        start = state["step"]
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if latest is not None else None) if ctx.is_main else None
    windows = eval_windows(data.val, train_cfg.batch_size, train_cfg.seq_len, train_cfg.eval_batches)
    roles = param_roles(model)
    dense = [p for n, p in model.named_parameters() if roles[n] != "table"]
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum
    bar = Progress(name, train_cfg.steps, enabled=progress and ctx.is_main, every=train_cfg.log_every)
    val_loss, train_time, last = float("nan"), 0.0, start
    model.train()

    def log(**record: Any) -> None:
        if metrics is not None:
            metrics.write(**record)

    def save(step: int) -> None:
        state = {"fingerprint": fingerprint, "model_config": resolved.to_dict(), "train_config": train_cfg.to_dict(),
                 "name": name, "corpus": data.corpus}  # fmt: skip
        ckpt_io.save_checkpoint(out_dir, step, model, optimizers, state, data.tokenizer_path,
                                rank=ctx.rank, world_size=ctx.world_size)  # fmt: skip

    for step in range(start, train_cfg.steps):
        t0 = time.perf_counter()
        set_lr(optimizers, lr_multiplier(step, train_cfg.steps, train_cfg.warmup_steps, train_cfg.decay_at,
                                          train_cfg.decay_factor))  # fmt: skip
        loss_value = _train_step(model, optimizers, dense, data, train_cfg, step, device, ctx)
        train_time += time.perf_counter() - t0
        done = step + 1
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            lr = optimizers[next(iter(optimizers))].param_groups[0]["lr"]
            log(step=done, loss=loss_value, lr=lr, tokens=done * tokens_per_step)
        if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
            val_loss = evaluate(model, windows, device)  # every rank: the lookups are collective
            log(step=done, val_loss=val_loss)
        if (train_cfg.save_every and done % train_cfg.save_every == 0) or done == train_cfg.steps:
            save(done)
        rate = (done - start) * tokens_per_step / max(train_time, 1e-9)
        bar.update(done, loss_value, rate, (train_cfg.steps - done) * tokens_per_step / max(rate, 1e-9))
        last = done
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
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


def _train_step(model, optimizers, dense, data: TokenData, cfg: TrainConfig, step: int, device, ctx: DistContext) -> float:
    """One optimizer step over grad_accum micro-batches of this rank's slice; returns the
    global mean loss. The loss is scaled by 1/(accum * P) so summed gradients are means."""
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = sample_batch(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, step=step, micro=micro,
                            rank=ctx.rank, world_size=ctx.world_size)  # fmt: skip
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        (loss / (cfg.grad_accum * ctx.world_size)).backward()
        loss_sum += loss.item()
    all_reduce_dense_grads(dense, ctx)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(dense, cfg.grad_clip)
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


def _prepare_run_dir(out_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, resolved: ModelConfig) -> Path | None:
    """Write config.json for a new run, or check it matches and return the checkpoint to resume."""
    out_dir.mkdir(parents=True, exist_ok=True)
    requested = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
    config_path = out_dir / "config.json"
    latest = ckpt_io.latest_checkpoint(out_dir)
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        if saved.get("requested") != json.loads(json.dumps(requested)) and latest is not None:
            raise ValueError(
                f"{out_dir} holds a run with a different configuration; pass a new --out to start "
                "another run, or the same flags to resume this one"
            )
    if latest is None or not config_path.exists():
        write_json(config_path, {"requested": requested, "resolved_model": resolved.to_dict(), **run_metadata()})
    return latest


def load_trained(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[EngramLM, dict[str, Any]]:
    """A trained model from a checkpoint (or a run folder's newest one), in eval mode,
    with its tables on the compute device (see inference/loading.py for other tiers)."""
    from engram_lm.inference.loading import load_for_inference

    return load_for_inference(checkpoint, memory="device", device=device)
