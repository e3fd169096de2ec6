"""A small Llama (transformers' own class) pretrained here, offline, and saved with
save_pretrained: the base model that `engram retrofit` and the retrofit experiment adapt.

The tokenizer is the project's cached BPE trained on the corpus's training split, saved as
tokenizer.json in the model folder; `pretrain.json` records the run (tokens, epochs, final
training and held-out loss).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engram_lm.training.data import eval_windows, prepare_data, sample_batch


@dataclass(frozen=True, slots=True, kw_only=True)
class PretrainConfig:
    data: str = "bible"
    tokenizer: str = "bpe:4096"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 4
    heads: int = 4

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "hidden_size", "intermediate_size", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid PretrainConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if self.hidden_size % self.heads:
            raise ValueError(f"PretrainConfig.hidden_size={self.hidden_size} does not divide into {self.heads} heads")


def pretrain_llama(out: str | Path, cfg: PretrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train a LlamaForCausalLM from scratch on cfg.data (warm-up 30 steps, lr / 10 over the last
    fifth) and save it at `out`; returns what pretrain.json records."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engram_lm.hf.train import evaluate_lm

    data = prepare_data(cfg.data, cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=data.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=max(256, cfg.seq_len), bos_token_id=data.eod_id,
                         eos_token_id=data.eod_id, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    t0, losses = time.time(), []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 30) * (0.1 if step >= 0.8 * cfg.steps else 1.0)
        x, y = sample_batch(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1000, step=step)
        loss = F.cross_entropy(model(input_ids=x, use_cache=False).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress and (step + 1) % 50 == 0:
            print(f"pretrain step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    val = evaluate_lm(model, eval_windows(data.val, cfg.batch_size, cfg.seq_len, 16), "cpu")
    out = Path(out)
    model.save_pretrained(out)
    shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    tail = losses[-max(1, len(losses) // 10):]
    info = {"config": asdict(cfg), "params": sum(p.numel() for p in model.parameters()), "tokens": tokens,
            "epochs": tokens / len(data.train), "train_loss_end": sum(tail) / len(tail), "val_loss": val,
            "seconds": round(time.time() - t0)}  # fmt: skip
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return info

