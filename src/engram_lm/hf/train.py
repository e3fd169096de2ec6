"""`engram retrofit`: train only the memory of a retrofitted Hugging Face causal LM.

The base model is frozen (or fine-tuned too, with `train_base`), the Engram tables train
with sparse-row Adam at 5x the learning rate and the rest of the module with AdamW, on
`--data` tokenized by the model's own tokenizer. Validation loss of the frozen base and of
the retrofitted model are measured on the same held-out windows.

The run folder works as `engram train`'s does, with its machinery (training/): one owner at
a time (RunLock); `checkpoints/step-NNNNNN/` holding the adapter, the optimizer state, the
fine-tuned base (with `train_base`) and `state.json`, written into a `.tmp` folder and
renamed into place when whole, so a crash at any point of a save leaves the previous
checkpoint as the latest and a resume reproduces an unbroken run; the data and tokenizer
identity (sha256 of content) checked on resume, refused on change unless
`allow_data_change` (recorded in metrics.jsonl); SIGINT/SIGTERM save and raise
`TrainingInterrupted`; saves every `save_every` steps and every `save_minutes`; a
non-finite loss stops the run with the last good checkpoint kept. `adapter/` at the top is
the latest checkpoint's adapter, published after the checkpoint (the one a user loads).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engram_lm.checkpoint import store as ckpt_io
from engram_lm.hf.adapter import load_adapter, load_engram, replace_dir, save_engram
from engram_lm.hf.families import FAMILIES
from engram_lm.hf.retrofit import add_engram
from engram_lm.training.allocator import keep_large_buffers_on_heap
from engram_lm.training.checkpointing import SaveCadence
from engram_lm.training.data import TokenData, eval_windows, prepare_data, sample_batch, seed_step
from engram_lm.training.interrupt import TrainingInterrupted, graceful_stop, refuse_divergence
from engram_lm.training.optim import SparseRowAdam
from engram_lm.training.resume import check_data_identity, data_identity
from engram_lm.training.run import MetricsLog, Progress, RunLock, run_metadata, write_json

STATE_FORMAT = "engram-lm-retrofit/2"
FREE_ON_RESUME = {"save_every", "save_minutes", "steps"}  # cadence, and a longer run (the lr is constant)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrofitConfig:
    data: str = "bible"
    layers: tuple[int, ...] = (1,)
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    table_lr_mult: float = 5.0
    base_lr: float = 1e-5  # only with train_base
    train_base: bool = False
    table_size: int = 50_000
    num_heads: int = 4
    max_ngram: int = 3
    eval_batches: int = 8
    eval_every: int = 100
    save_every: int = 100
    save_minutes: float = 10.0  # also save after this much wall time (0: only every save_every steps)
    seed: int = 0
    lora_r: int = 0  # > 0: LoRA (through peft) of this rank trains beside the memory
    lora_targets: tuple[str, ...] = ()  # module names for LoRA; empty: every linear layer of the base
    lora_lr: float | None = None  # LoRA's learning rate (default: lr)

    def __post_init__(self) -> None:
        from engram_lm.config import check_field_types

        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        check_field_types(self)
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "eval_every", "save_every", "table_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid RetrofitConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if self.lora_r < 0 or self.lora_r and self.train_base:
            raise ValueError(f"invalid RetrofitConfig.lora_r={self.lora_r!r} (train_base={self.train_base}): LoRA needs "
                             "lora_r >= 1 and a frozen base; choose LoRA or --train-base")  # fmt: skip
        if self.lora_targets and not self.lora_r:
            raise ValueError(f"--lora-targets {','.join(self.lora_targets)} names LoRA's modules, but no LoRA rank is set: "
                             "add --lora-r R (or --set lora_r=R)")  # fmt: skip
        if self.save_minutes < 0:
            raise ValueError(f"invalid RetrofitConfig.save_minutes={self.save_minutes!r}: must be >= 0 (0: by steps only)")


@torch.no_grad()
def evaluate_lm(model, windows, device) -> float:
    was = model.training
    model.eval()
    total = count = 0.0
    for x, y in windows:
        logits = model(input_ids=x.to(device), use_cache=False).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was)
    return total / count


def retrofit(model_path: str | Path, cfg: RetrofitConfig, out_dir: str | Path, *, device: str = "cpu",
             progress: bool = True, allow_data_change: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train (or resume: the newest complete checkpoint under out_dir) the memory of the model
    at `model_path`; returns the held-out losses, parameter counts and the adapter's path."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    keep_large_buffers_on_heap()  # 18-20% faster steps on CPU (training/allocator.py; docs/hf.md)
    tok_file = _check_model_folder(model_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder for the run")
    with RunLock(out_dir), graceful_stop() as stop:
        data = prepare_data(cfg.data, str(tok_file))
        latest, identity = _checkpoint_to_resume(out_dir), data_identity(data)
        events = _check_resume(out_dir, latest, cfg, identity, allow_data_change)
        torch.manual_seed(cfg.seed)
        model = _load_base(model_path, latest, cfg, data.vocab_size, device)
        windows = eval_windows(data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        base_val = evaluate_lm(model, windows, device)
        model, start, optimizers = _attach_or_resume(model, cfg, latest, tok_file, data.eod_id)
        metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if latest is not None else None)
        if latest is None:
            metrics.write(step=0, base_val_loss=base_val)
        for event in events:  # deliberate changes on resume, kept with the losses they affect
            metrics.write(step=start, **event)
        if latest is not None and progress:
            print(f"retrofit: resuming from step {start} ({latest})", file=sys.stderr, flush=True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        saver = _RetrofitSaver(model, optimizers, out_dir, cfg, identity, str(model_path))
        val = _train_memory(model, optimizers, data, windows, cfg, start, metrics, saver, stop, device, progress)
        saver.publish(ckpt_io.latest_checkpoint(out_dir), only_if_stale=True)  # a save killed before it published
        result = {"base_val_loss": base_val, "val_loss": val, "trainable_params": trainable, "total_params": total,
                  "adapter": str(out_dir / "adapter"), "steps": cfg.steps, "val_tokens": sum(y.numel() for _, y in windows)}  # fmt: skip
        write_json(out_dir / "result.json", {**result, "config": asdict(cfg), "model": str(model_path), **run_metadata()})
        return result


def load_retrofit_run(run: str | Path, memory: str = "device"):
    """(the base model with the run's adapter on it, in eval mode; the run's result.json) of an
    `engram retrofit` run folder."""
    from transformers import AutoModelForCausalLM

    result = json.loads((Path(run) / "result.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(result["model"], local_files_only=True, dtype=torch.float32)
    return load_adapter(base, Path(run) / "adapter", memory=memory).eval(), result


def _check_model_folder(model_path: Path) -> Path:
    """The folder's tokenizer.json, after checking it is a Hugging Face model folder with one."""
    tok_file = model_path / "tokenizer.json"
    if not (model_path / "config.json").exists():
        raise ValueError(f"{model_path} is not a Hugging Face model folder (no config.json); point --model at one")
    if not tok_file.exists():
        raise ValueError(f"{model_path} has no tokenizer.json (a fast tokenizer file); save the tokenizer with "
                         "tokenizer.save_pretrained into the model folder")  # fmt: skip
    try:
        model_type = json.loads((model_path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{model_path / 'config.json'} is not a readable model config ({err})") from None
    if model_type not in FAMILIES:
        raise ValueError(f"{model_path} holds a {model_type!r} model; engram retrofit supports the decoder-only families "
                         f"{', '.join(sorted(FAMILIES))} (one entry in engram_lm/hf/families.py adds another)")  # fmt: skip
    return tok_file


def _checkpoint_to_resume(out_dir: Path) -> Path | None:
    if (out_dir / "state.json").exists() and not (out_dir / "checkpoints").is_dir():
        raise ValueError(f"{out_dir} holds a retrofit saved by an older engram-lm (state.json at the top, no "
                         "checkpoints/); its adapter/ still loads, but it cannot be resumed: pass a new --out")  # fmt: skip
    return ckpt_io.latest_checkpoint(out_dir)


def _check_resume(out_dir: Path, latest: Path | None, cfg: RetrofitConfig, identity: dict[str, str],
                  allow_data_change: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Refuse resuming another configuration, or other data or tokenizer without
    `allow_data_change`; the deliberate changes to record."""
    if latest is None:
        return []
    state = _read_retrofit_state(latest)
    now = json.loads(json.dumps(asdict(cfg)))
    saved = {**json.loads(json.dumps(asdict(RetrofitConfig()))), **state["config"]}  # a field added since: its default
    changed = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
    if cfg.steps < state["step"]:
        raise ValueError(f"--steps {cfg.steps} is below the checkpoint's step {state['step']}; resume with --steps >= "
                         f"{state['step']}, or pass a new --out")  # fmt: skip
    if set(changed) - FREE_ON_RESUME:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed if k not in FREE_ON_RESUME)
        raise ValueError(f"{out_dir} holds a retrofit with another configuration ({shown}); pass a new --out, or the "
                         "same flags to resume it")  # fmt: skip
    events: list[dict[str, Any]] = []
    check_data_identity(out_dir, state.get("data_identity"), identity, allow_data_change, events)
    return events


def _read_retrofit_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{ckpt / 'state.json'} is damaged ({err}); delete {ckpt} to resume from the one before") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{ckpt} is not a retrofit checkpoint of this tool (format "
                         f"{state.get('format') if isinstance(state, dict) else '?'!r}); pass a new --out")  # fmt: skip
    return state


def _load_base(model_path: Path, latest: Path | None, cfg: RetrofitConfig, vocab_size: int, device: str):
    """The base model in fp32 on `device` (a resumed fine-tune of the base: the checkpoint's copy)."""
    from transformers import AutoModelForCausalLM

    source = latest / "base" if cfg.train_base and latest is not None else model_path
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch.float32).to(device)
    vocab = model.get_input_embeddings().weight.shape[0]
    if vocab_size > vocab:
        raise ValueError(f"the tokenizer has {vocab_size} ids but the model embeds {vocab}: wrong tokenizer")
    return model


def _attach_or_resume(model, cfg: RetrofitConfig, latest: Path | None, tok_file: Path,
                      eod_id: int) -> tuple[Any, int, dict[str, torch.optim.Optimizer]]:  # fmt: skip
    """Wrap the base in LoRA (with lora_r), add the memory (or load the checkpoint's adapter),
    freeze what does not train and build the optimizers (with their saved state on resume):
    (the model, start step, optimizers)."""
    if cfg.lora_r:
        model = _with_lora(model, cfg, latest / "adapter" / "lora" if latest is not None else None)
    if latest is not None:
        load_engram(model, latest / "adapter")
    else:
        add_engram(model, str(tok_file), layers=cfg.layers, table_size=cfg.table_size, num_heads=cfg.num_heads,
                   max_ngram=cfg.max_ngram, eod_id=eod_id, pad_id=eod_id, init_seed=None)  # seeded by retrofit()  # fmt: skip
    engram = {id(p) for p in model.engram.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in engram or cfg.train_base or bool(cfg.lora_r and "lora_" in name))
    optimizers = _optimizers(model, cfg)
    if latest is None:
        return model, 0, optimizers
    _load_optimizers(model, optimizers, latest / "optimizer.safetensors")
    return model, _read_retrofit_state(latest)["step"], optimizers


def _with_lora(model, cfg: RetrofitConfig, saved: Path | None):
    """The base wrapped in peft's LoRA: new, or the checkpoint's LoRA weights."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError as err:
        raise ValueError(f"--lora-r needs peft ({err}); install the extra: pip install 'engram-lm[hf]'") from None
    if saved is not None:
        return PeftModel.from_pretrained(model, saved, is_trainable=True)
    targets = list(cfg.lora_targets) or "all-linear"
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules=targets,
                                            lora_dropout=0.0))  # fmt: skip


def _train_memory(model, optimizers, data: TokenData, windows, cfg: RetrofitConfig, start: int, metrics: MetricsLog,
                  saver: "_RetrofitSaver", stop: dict[str, bool], device: str, progress: bool) -> float:  # fmt: skip
    """Steps `start`..cfg.steps, logging, evaluating and saving on their cadences; the last
    validation loss. A stop request saves at the end of the step and raises TrainingInterrupted."""
    bar = Progress("retrofit", cfg.steps, enabled=progress)
    model.train()
    val, t0 = float("nan"), time.time()
    for step in range(start, cfg.steps):
        done = step + 1
        loss = _step(model, optimizers, data, cfg, step, device)
        refuse_divergence(loss, done, ckpt_io.latest_checkpoint(saver.out_dir), "lower --lr and resume or restart")
        metrics.write(step=done, loss=loss)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = evaluate_lm(model, windows, device)
            metrics.write(step=done, val_loss=val)
        stopping = stop["stop"]
        if saver.cadence.is_due(done, stopping):
            saver.save(done)
        if stopping:
            bar.close()
            raise TrainingInterrupted(saver.out_dir, done)
        rate = (done - start) * cfg.batch_size * cfg.seq_len / max(time.time() - t0, 1e-9)
        bar.update(done, loss, rate, (cfg.steps - done) * cfg.batch_size * cfg.seq_len / max(rate, 1e-9))
    bar.close()
    return evaluate_lm(model, windows, device) if math.isnan(val) else val


def _step(model, optimizers, data: TokenData, cfg: RetrofitConfig, step: int, device: str) -> float:
    """One optimizer step on the batch of `step` (drawn from the seed and the step alone)."""
    x, y = sample_batch(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, step=step)
    seed_step(cfg.seed, step)  # the base model's own dropout, if it has any
    logits = model(input_ids=x.to(device), use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
    loss.backward()
    for opt in optimizers.values():
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


class _RetrofitSaver:
    """A retrofit checkpoint: `checkpoints/step-NNNNNN/` written whole into a .tmp folder and
    renamed into place (the commit point), older ones pruned, then `adapter/` replaced by its
    adapter (what a user loads)."""

    def __init__(self, model, optimizers, out_dir: Path, cfg: RetrofitConfig, identity: dict[str, str],
                 base_model: str) -> None:  # fmt: skip
        self.model, self.optimizers, self.out_dir, self.cfg = model, optimizers, out_dir, cfg
        self.identity, self.base_model = identity, base_model
        self.cadence = SaveCadence(cfg.steps, cfg.save_every, cfg.save_minutes)

    def save(self, step: int) -> Path:
        final = ckpt_io.checkpoint_dir(self.out_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write(tmp, step)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ckpt_io.prune(final.parent)
        self.publish(final)
        self.cadence.saved()
        return final

    def _write(self, folder: Path, step: int) -> None:
        folder.mkdir(parents=True)
        save_engram(self.model, folder / "adapter")
        if self.cfg.lora_r:  # peft's own format, inside the adapter folder
            self.model.save_pretrained(folder / "adapter" / "lora")
        if self.cfg.train_base:  # the fine-tuned base goes with the adapter (without Engram's keys)
            state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("engram.")}
            self.model.save_pretrained(folder / "base", state_dict=state)
        save_file(_optimizer_tensors(self.model, self.optimizers), str(folder / "optimizer.safetensors"))
        write_json(folder / "state.json", {"format": STATE_FORMAT, "step": step, "config": asdict(self.cfg),
                                           "data_identity": self.identity, "base_model": self.base_model})  # fmt: skip

    def publish(self, checkpoint: Path | None, only_if_stale: bool = False) -> None:
        if checkpoint is None or only_if_stale and _same_file(checkpoint / "adapter" / "adapter_config.json",
                                                              self.out_dir / "adapter" / "adapter_config.json"):
            return
        tmp = self.out_dir / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint / "adapter", tmp)
        replace_dir(tmp, self.out_dir / "adapter")


def engram_optimizers(model, *, lr: float = 1e-3, table_lr_mult: float = 5.0,
                      other_lr: float | None = None) -> dict[str, torch.optim.Optimizer]:  # fmt: skip
    """The optimizers for a model with Engram added (`add_engram`, also on a `peft` model), over
    its parameters that require grad: "table" (the Engram tables: sparse-row Adam at
    lr x table_lr_mult, updating only the rows a step read), "engram" (the rest of the module:
    AdamW at lr) and, when anything else trains (LoRA weights, or the base), "other" (AdamW at
    `other_lr`, default lr). Step and zero every one of them each step (a `Trainer` takes one
    optimizer: see docs/hf.md)."""
    from engram_lm.hf.adapter import _retrofit

    retrofit = _retrofit(model)
    tables = {id(e.memory.weight) for e in retrofit.engrams.values()}
    engram = {id(p) for p in retrofit.parameters()}
    groups: dict[str, list[torch.nn.Parameter]] = {"table": [], "engram": [], "other": []}
    for _, p in model.named_parameters():
        if p.requires_grad:
            groups["table" if id(p) in tables else "engram" if id(p) in engram else "other"].append(p)
    opts: dict[str, torch.optim.Optimizer] = {"table": SparseRowAdam(groups["table"], lr=lr * table_lr_mult)}
    opts["engram"] = torch.optim.AdamW(groups["engram"], lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    if groups["other"]:
        opts["other"] = torch.optim.AdamW(groups["other"], lr=lr if other_lr is None else other_lr, weight_decay=0.0)
    return opts


def _optimizers(model, cfg: RetrofitConfig) -> dict[str, torch.optim.Optimizer]:
    other_lr = cfg.base_lr if cfg.train_base else (cfg.lora_lr if cfg.lora_lr is not None else cfg.lr)
    opts = engram_optimizers(model, lr=cfg.lr, table_lr_mult=cfg.table_lr_mult, other_lr=other_lr)
    if "other" in opts:  # the fine-tuned base or the LoRA weights, by name in the saved state
        opts["base" if cfg.train_base else "lora"] = opts.pop("other")
    return opts


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.read_bytes() == b.read_bytes()


def _optimizer_tensors(model, optimizers) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for key, opt in optimizers.items():
        for p, st in opt.state.items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{key}|{names[id(p)]}|{k}"] = v.detach().contiguous().cpu()
    return tensors


def _load_optimizers(model, optimizers, path: Path) -> None:
    params = dict(model.named_parameters())
    for key, tensor in ckpt_io.load_tensors(path).items():
        opt_name, param_name, state_key = key.split("|")
        p = params[param_name]
        optimizers[opt_name].state[p][state_key] = tensor.to(p.device) if tensor.dim() else tensor
