"""`engram retrofit`: train only the memory of a retrofitted Hugging Face causal LM.

The base model is frozen (or fine-tuned too, with `train_base`), the Engram tables train
with sparse-row Adam at 5x the learning rate and the rest of the module with AdamW, on
`--data` tokenized by the model's own tokenizer. The run folder holds `metrics.jsonl`,
`adapter/` (the adapter format), `optimizer.safetensors` and `state.json`; rerunning the
same command resumes. Validation loss of the frozen base and of the retrofitted model are
measured on the same held-out windows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engram_lm.hf.adapter import load_engram, save_engram
from engram_lm.hf.retrofit import add_engram
from engram_lm.training.data import eval_windows, prepare_data, sample_batch, seed_step
from engram_lm.training.optim import SparseRowAdam
from engram_lm.training.run import MetricsLog, Progress, RunLock, run_metadata, write_json


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
    seed: int = 0

    def __post_init__(self) -> None:
        from engram_lm.config import check_field_types

        object.__setattr__(self, "layers", tuple(self.layers))
        check_field_types(self)
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "eval_every", "save_every", "table_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid RetrofitConfig.{name}={getattr(self, name)!r}: must be >= 1")


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
             progress: bool = True) -> dict[str, Any]:  # fmt: skip
    model_path, out_dir = Path(model_path), Path(out_dir)
    tok_file = _check_model_folder(model_path)
    with RunLock(out_dir):
        data = prepare_data(cfg.data, str(tok_file))
        torch.manual_seed(cfg.seed)
        model = _load_base(model_path, out_dir, cfg, data.vocab_size, device)
        windows = eval_windows(data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        base_val = evaluate_lm(model, windows, device)
        start, optimizers, resumed = _attach_or_resume(model, cfg, out_dir, tok_file, data.eod_id)
        metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start if resumed else None)
        if not resumed:
            metrics.write(step=0, base_val_loss=base_val)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        val = _train_memory(model, optimizers, data, windows, cfg, out_dir, start, metrics, device, progress)
        result = {"base_val_loss": base_val, "val_loss": val, "trainable_params": trainable, "total_params": total,
                  "adapter": str(out_dir / "adapter"), "steps": cfg.steps, "val_tokens": sum(y.numel() for _, y in windows)}  # fmt: skip
        write_json(out_dir / "result.json", {**result, "config": asdict(cfg), "model": str(model_path), **run_metadata()})
        return result


def _check_model_folder(model_path: Path) -> Path:
    """The folder's tokenizer.json, after checking it is a Hugging Face model folder with one."""
    tok_file = model_path / "tokenizer.json"
    if not (model_path / "config.json").exists():
        raise ValueError(f"{model_path} is not a Hugging Face model folder (no config.json); point --model at one")
    if not tok_file.exists():
        raise ValueError(f"{model_path} has no tokenizer.json (a fast tokenizer file); save the tokenizer with "
                         "tokenizer.save_pretrained into the model folder")  # fmt: skip
    return tok_file


def _load_base(model_path: Path, out_dir: Path, cfg: RetrofitConfig, vocab_size: int, device: str):
    """The base model in fp32 on `device` (a resumed fine-tune of the base: its saved copy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch.float32).to(device)
    if cfg.train_base and (out_dir / "base" / "config.json").exists():  # a resumed fine-tune of the base
        model = AutoModelForCausalLM.from_pretrained(out_dir / "base", local_files_only=True, dtype=torch.float32).to(device)
    vocab = model.get_input_embeddings().weight.shape[0]
    if vocab_size > vocab:
        raise ValueError(f"the tokenizer has {vocab_size} ids but the model embeds {vocab}: wrong tokenizer")
    return model


def _attach_or_resume(model, cfg: RetrofitConfig, out_dir: Path, tok_file: Path,
                      eod_id: int) -> tuple[int, dict[str, torch.optim.Optimizer], bool]:  # fmt: skip
    """Add the memory (or load the run's adapter), freeze what does not train and build the
    optimizers (with their saved state on resume): (start step, optimizers, resumed)."""
    state_path, adapter_dir = out_dir / "state.json", out_dir / "adapter"
    resumed = state_path.exists()
    if resumed:
        saved = json.loads(state_path.read_text())
        if saved["config"] != json.loads(json.dumps(asdict(cfg))):
            raise ValueError(f"{out_dir} holds a retrofit with another configuration; pass a new --out")
        load_engram(model, adapter_dir)
    else:
        add_engram(model, str(tok_file), layers=cfg.layers, table_size=cfg.table_size, num_heads=cfg.num_heads,
                   max_ngram=cfg.max_ngram, eod_id=eod_id, pad_id=eod_id)  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("engram.") or cfg.train_base)
    optimizers = _optimizers(model, cfg)
    start = 0
    if resumed:
        start = json.loads(state_path.read_text())["step"]
        _load_optimizers(model, optimizers, out_dir / "optimizer.safetensors")
    return start, optimizers, resumed


def _train_memory(model, optimizers, data, windows, cfg: RetrofitConfig, out_dir: Path, start: int, metrics: MetricsLog,
                  device: str, progress: bool) -> float:  # fmt: skip
    """Steps `start`..cfg.steps, logging, evaluating and saving on their cadences; the last
    validation loss."""
    bar = Progress("retrofit", cfg.steps, enabled=progress)
    model.train()
    val, t0 = float("nan"), time.time()
    for step in range(start, cfg.steps):
        x, y = sample_batch(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, step=step)
        seed_step(cfg.seed, step)  # the base model's own dropout, if it has any
        logits = model(input_ids=x.to(device), use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        done = step + 1
        if not math.isfinite(loss.item()):
            raise ValueError(f"the loss became {loss.item()} at step {done}; lower --lr")
        metrics.write(step=done, loss=loss.item())
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = evaluate_lm(model, windows, device)
            metrics.write(step=done, val_loss=val)
        if done % cfg.save_every == 0 or done == cfg.steps:
            _save(model, optimizers, out_dir, done, cfg)
        rate = (done - start) * cfg.batch_size * cfg.seq_len / max(time.time() - t0, 1e-9)
        bar.update(done, loss.item(), rate, (cfg.steps - done) * cfg.batch_size * cfg.seq_len / max(rate, 1e-9))
    bar.close()
    return evaluate_lm(model, windows, device) if math.isnan(val) else val


def _optimizers(model, cfg: RetrofitConfig) -> dict[str, torch.optim.Optimizer]:
    tables, engram, base = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("engram.") and name.endswith(".memory.weight"):
            tables.append(p)
        elif name.startswith("engram."):
            engram.append(p)
        else:
            base.append(p)
    opts: dict[str, torch.optim.Optimizer] = {"table": SparseRowAdam(tables, lr=cfg.lr * cfg.table_lr_mult)}
    opts["engram"] = torch.optim.AdamW(engram, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    if base:
        opts["base"] = torch.optim.AdamW(base, lr=cfg.base_lr, weight_decay=0.0)
    return opts


def _save(model, optimizers, out_dir: Path, step: int, cfg: RetrofitConfig) -> None:
    save_engram(model, out_dir / "adapter")
    if cfg.train_base:  # the fine-tuned base goes with the adapter (without Engram's keys)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("engram.")}
        model.save_pretrained(out_dir / "base", state_dict=state)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for key, opt in optimizers.items():
        for p, st in opt.state.items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{key}|{names[id(p)]}|{k}"] = v.detach().contiguous().cpu()
    save_file(tensors, str(out_dir / "optimizer.safetensors"))
    write_json(out_dir / "state.json", {"step": step, "config": asdict(cfg)})


def _load_optimizers(model, optimizers, path: Path) -> None:
    params = dict(model.named_parameters())
    for key, tensor in load_file(str(path)).items():
        opt_name, param_name, state_key = key.split("|")
        p = params[param_name]
        optimizers[opt_name].state[p][state_key] = tensor.to(p.device) if tensor.dim() else tensor
