"""Pretrain a small Llama (transformers' own model class) on the built-in Bible and save it
with save_pretrained, so `engram retrofit` has an offline base model to work on.

    python examples/pretrain_hf_llama.py --out runs/hf-llama --steps 300
    engram retrofit --model runs/hf-llama --data bible --layers 1 --steps 200 --out runs/hf-llama-engram

The tokenizer is the project's cached BPE (4096 ids) trained on the Bible's training split,
saved as tokenizer.json in the model folder. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from engram_lm.training.data import prepare_data, sample_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/hf-llama")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = prepare_data("bible", "bpe:4096")
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=data.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=data.eod_id, eos_token_id=data.eod_id, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 if step >= 0.8 * args.steps else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = sample_batch(data.train, args.batch_size, args.seq_len, seed=args.seed + 1000, step=step)
        loss = F.cross_entropy(model(input_ids=x, use_cache=False).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    model.save_pretrained(out)
    shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
    (out / "pretrain.json").write_text(json.dumps({**vars(args), "final_train_loss": loss.item(),
                                                   "seconds": round(time.time() - t0)}, indent=2))  # fmt: skip
    print(f"saved {out} (config.json, model.safetensors, tokenizer.json)")


if __name__ == "__main__":
    main()
