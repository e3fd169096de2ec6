"""Pretrain a small Llama (transformers' own model class) on the built-in Bible and save it
with save_pretrained, so `engram retrofit` has an offline base model to work on.

    python examples/pretrain_hf_llama.py --out runs/hf-llama --steps 300
    engram retrofit --model runs/hf-llama --data bible --layers 1 --steps 200 --out runs/hf-llama-engram

The tokenizer is the project's cached BPE (4096 ids) trained on the Bible's training split,
saved as tokenizer.json in the model folder. A few minutes on 2 CPU cores. The recipe is
engram_lm.hf.pretrain.pretrain_llama (the retrofit experiment's base uses it too).
"""

from __future__ import annotations

import argparse

from engram_lm.hf.pretrain import PretrainConfig, pretrain_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/hf-llama")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    info = pretrain_llama(args.out, PretrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                                   lr=args.lr, seed=args.seed))  # fmt: skip
    print(f"saved {args.out} (config.json, model.safetensors, tokenizer.json): held-out loss {info['val_loss']:.4f} "
          f"after {info['tokens']:,} tokens ({info['epochs']:.2f} epochs)")


if __name__ == "__main__":
    main()
