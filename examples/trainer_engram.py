"""Train Engram (and LoRA, through peft, with --lora-r) on a Hugging Face causal LM with
`transformers.Trainer`, through `engram_lm.hf.trainer.EngramTrainer`.

    python examples/pretrain_hf_llama.py --out runs/hf-llama --steps 300
    python examples/trainer_engram.py --model runs/hf-llama --data bible --steps 200 --out runs/hf-llama-trainer
    python examples/trainer_engram.py --model runs/hf-llama --data bible --steps 200 --lora-r 16 --out runs/hf-lora-engram

The base stays frozen; the tables train with sparse-row Adam at 5x the learning rate, the rest
of the module (and LoRA) with AdamW, stepped by Trainer as one optimizer. The memory is saved
with `save_engram` to OUT/adapter (and LoRA with peft to OUT/adapter/lora: `load_adapter`
puts both onto a fresh base); Trainer's own checkpoints
(OUT/checkpoint-N, every --save-steps) resume with --resume. `engram retrofit` does the same
with its own loop; this is the path for code that already trains with Trainer (or TRL).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainingArguments, set_seed

from engram_lm.hf.adapter import save_engram
from engram_lm.hf.retrofit import add_engram
from engram_lm.hf.trainer import EngramTrainer
from engram_lm.training.data import prepare_data


class Windows(torch.utils.data.Dataset):
    """Consecutive, non-overlapping windows of a token array, as Trainer's causal-LM examples."""

    def __init__(self, tokens, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.tokens[i * self.seq_len : (i + 1) * self.seq_len].astype("int64"))
        return {"input_ids": ids, "labels": ids}


def main(argv: list[str] | None = None):
    """Train and save; returns (the trained model, the result printed as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a local Hugging Face model folder with its tokenizer.json")
    ap.add_argument("--data", default="bible")
    ap.add_argument("--out", default="runs/hf-trainer")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, nargs="+", default=[1])
    ap.add_argument("--table-size", type=int, default=50_000)
    ap.add_argument("--lora-r", type=int, default=0)
    ap.add_argument("--save-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="LoRA's and the memory's initial weights, and Trainer's seed")
    ap.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoint-N")
    args = ap.parse_args(argv)
    tok_file = Path(args.model) / "tokenizer.json"
    data = prepare_data(args.data, str(tok_file))
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32)
    model.requires_grad_(False)
    set_seed(args.seed)  # LoRA's initial weights (Trainer seeds itself only later, when it is built)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear",
                                                 lora_dropout=0.0))  # fmt: skip
    add_engram(model, str(tok_file), layers=tuple(args.layers), table_size=args.table_size, eod_id=data.eod_id,
               pad_id=data.eod_id, init_seed=args.seed)  # fmt: skip
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                 per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=0,
                                 save_strategy="steps", save_steps=args.save_steps, logging_steps=10, report_to=[],
                                 seed=args.seed, use_cpu=not torch.cuda.is_available())  # fmt: skip
    trainer = EngramTrainer(model=model, args=training, train_dataset=Windows(data.train, args.seq_len),
                            eval_dataset=Windows(data.val, args.seq_len))  # fmt: skip
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    out = Path(args.out)
    save_engram(model, out / "adapter")
    if args.lora_r:  # peft's format inside the adapter folder: engram_lm.hf.adapter.load_adapter puts both back
        model.save_pretrained(out / "adapter" / "lora")
    result = {"eval_loss": trainer.evaluate()["eval_loss"], "adapter": str(out / "adapter"), "steps": args.steps}
    print(json.dumps(result))
    return model, result


if __name__ == "__main__":
    main()
