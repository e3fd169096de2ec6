"""engram-lm's retrofit side by side with engram-peft (PyPI `engram-peft`, PEFT-style Engram
adapters), on the same base, batches, steps and scoring. Run it with
benchmarks/peers/run_engram_peft.sh: engram-peft needs Python >= 3.12 (`typing.override`), so it
gets its own virtual environment, with engram-lm installed there too (no dependencies pulled:
the peer's torch, transformers and peft serve both), so that both libraries run on the same
torch in the same process type and are scored by the same function
(engram_lm.experiments.retrofit.run_method: held-out loss on the new domain, facts, forgetting,
s/step, peak memory, adapter size).

    bash benchmarks/peers/run_engram_peft.sh --seeds 3 --out results/bench/peers-engram-peft

Methods: the memory alone (engram-lm's `add_engram`; engram-peft's `train_mode="engram_only"`)
and LoRA r 8 with the memory (peft's LoRA on every linear layer in both; engram-peft's
`preserve_trainable`), with the same table shape (4 heads x 2 orders x ~50k rows of 32 values
before layer 1), the same learning rate (1e-3, tables 5x, sparse Adam for the tables) and each
library's own tokenizer compression. Runs alternate library by library within a seed, each in
its own process. Also measured: where engram-peft's n-gram hashes differ from the reference
demo's on the same compressed ids (`hash_difference`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np

from engram_lm.experiments.retrofit import METHODS, RetrofitSettings, base_model, run_method
from engram_lm.experiments.runner import read_result
from engram_lm.experiments.stats import estimate

LIBRARIES = ("engram-lm", "engram-peft")
COMPARED = ("engram", "lora8+engram")


def adapt_engram_peft(model, method, tok_path: Path, eod_id: int, settings: RetrofitSettings):
    """engram-peft's model for `method`, its optimizer and its save_pretrained."""
    from engram_peft import EngramConfig, get_engram_model
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    eod = Tokenizer.from_file(str(tok_path)).id_to_token(eod_id)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), eos_token=eod, pad_token=eod)
    if method.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=method.lora_r, lora_alpha=2 * method.lora_r, target_modules="all-linear",
                                                 lora_dropout=0.0))  # fmt: skip
    hidden = model.config.hidden_size
    width = max(settings.num_heads, (min(hidden, 512) // settings.num_heads) * settings.num_heads)  # engram-lm's, per order
    orders = settings.max_ngram - 1
    config = EngramConfig(target_layers=list(settings.layers), ngram_sizes=list(range(2, settings.max_ngram + 1)),
                          engram_vocab_size_per_ngram=[settings.table_size * settings.num_heads] * orders,
                          n_head_per_ngram=settings.num_heads, embedding_dim=width * orders,  # its width is for all orders
                          hc_mult=1, combine_mhc=False,
                          conv_kernel_size=4, learning_rate_multiplier=5.0)  # fmt: skip
    peft_model = get_engram_model(model, config, tokenizer,
                                  train_mode="preserve_trainable" if method.lora_r else "engram_only")  # fmt: skip
    optimizer = peft_model.create_optimizer(base_learning_rate=method.lr)
    return peft_model, [optimizer], lambda folder: peft_model.save_pretrained(str(folder / "adapter"))


def _run(base: Path, library: str, method_name: str, seed: int, settings: RetrofitSettings, path: Path) -> None:
    method = next(m for m in METHODS if m.name == method_name)
    run_method(base, method, seed, settings, path, adapt=adapt_engram_peft if library == "engram-peft" else None)


def hash_difference(base: Path, settings: RetrofitSettings, tokens: int = 4096) -> dict:
    """engram-peft's hash ids against the reference demo's formula (the suffix n-gram ending at
    position t, its newest token times multiplier 0), with engram-peft's own multipliers and
    primes, on the same compressed ids (held-out code): per n-gram order, the share of positions
    equal to the reference and to each of its variants (window one token late, multipliers in
    the other order), which says exactly how the two differ."""
    import torch
    from engram_peft.hashing import NgramHashMapping

    from engram_lm.experiments.retrofit import DOMAIN
    from engram_lm.training.data import prepare_data

    ids = np.asarray(prepare_data(DOMAIN, str(base / "tokenizer.json")).val[:tokens], dtype=np.int64)[None]
    vocab = int(ids.max()) + 1
    layer = settings.layers[0]
    mapping = NgramHashMapping(compressed_vocab_size=vocab, engram_vocab_size_per_ngram=[settings.table_size *
                               settings.num_heads] * (settings.max_ngram - 1), ngram_sizes=list(range(2, settings.max_ngram + 1)),
                               n_head_per_ngram=settings.num_heads, layer_ids=[layer], pad_id=0)  # fmt: skip
    theirs = mapping.hash(torch.from_numpy(ids))[layer]  # (1, T, orders x heads)
    m = mapping.all_multipliers[layer]
    T = ids.shape[1]
    shifted = [np.pad(ids, ((0, 0), (k, 0)), constant_values=0)[:, :T] for k in range(settings.max_ngram + 1)]  # t-k
    out, col = {}, 0
    for i, n in enumerate(range(2, settings.max_ngram + 1)):
        def mix(lag: int, oldest_first: bool) -> np.ndarray:
            """The n tokens ending at t - lag, each times its multiplier: the reference weights the
            newest token by m[0]; `oldest_first` weights the oldest by m[0]."""
            x = None
            for k in range(n):  # k = age of the token within the window
                weight = m[n - 1 - k] if oldest_first else m[k]
                x = shifted[lag + k] * weight if x is None else np.bitwise_xor(x, shifted[lag + k] * weight)
            return x

        primes = mapping.prime_tables[layer][i]
        got = theirs[:, :, col : col + len(primes)]
        col += len(primes)
        valid = slice(settings.max_ngram + 1, None)  # past the padded start
        match = {}
        for lag in (0, 1):
            for oldest_first in (False, True):
                want = np.stack([mix(lag, oldest_first) % p for p in primes], axis=-1)
                name = f"window ending at t{'-1' if lag else ''}, {'oldest' if oldest_first else 'newest'} token x m[0]"
                match[name] = float((got[:, valid] == want[:, valid]).mean())
        out[f"{n}-gram"] = {"equal_to_reference": match["window ending at t, newest token x m[0]"],
                            "share_of_positions_equal_to": match}  # fmt: skip
    return {"tokens": T, **out}


def summary(out: Path, seeds: list[int]) -> dict:
    rows = {}
    for library in LIBRARIES:
        for name in COMPARED:
            runs = [read_result(out / library / name / f"seed{s}" / "result.json") for s in seeds
                    if (out / library / name / f"seed{s}" / "result.json").is_file()]  # fmt: skip
            if not runs:
                continue

            def stat(key: str, scale: float = 1.0) -> dict:
                values = [r[key] * scale for r in runs]
                e = estimate(values)  # the page's mean and standard error
                return {"mean": e.mean, "se": e.se, "per_seed": values}

            rows[f"{library} {name}"] = {"val_loss": stat("val_loss"), "s_per_step": stat("s_per_step"),
                                         "facts_held_out_pct": stat("facts_held_out_accuracy", 100),
                                         "facts_train_pct": stat("facts_train_accuracy", 100),
                                         "forgetting": {"per_seed": [r["forget_loss"] - r["base_forget_loss"] for r in runs]},
                                         "trainable_params": runs[0]["trainable_params"],
                                         "adapter_mb": runs[0]["adapter_bytes"] / 1e6, "peak_mb": stat("peak_rss_mb")}  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base-from", default="results/study", help="the retrofit experiment's --out (its base is reused)")
    ap.add_argument("--out", default="results/bench/peers-engram-peft")
    args = ap.parse_args()
    out = Path(args.out)
    settings = RetrofitSettings(steps=args.steps, threads=args.threads)
    base = base_model(Path(args.base_from))
    ctx = multiprocessing.get_context("spawn")
    seeds = list(range(args.seeds))
    for seed in seeds:
        for name in COMPARED:
            for library in LIBRARIES:  # alternating: each library's run next to the other's
                path = out / library / name / f"seed{seed}" / "result.json"
                if path.is_file():
                    continue
                print(f"{library} {name} seed {seed}", file=sys.stderr, flush=True)
                proc = ctx.Process(target=_run, args=(base, library, name, seed, settings, path))
                proc.start()
                proc.join()
                if proc.exitcode != 0:
                    raise SystemExit(f"{library} {name} seed {seed} failed (exit {proc.exitcode})")
    import engram_peft
    import torch

    result = {"engram_peft": engram_peft.__version__ if hasattr(engram_peft, "__version__") else "1.2.7",
              "torch": torch.__version__, "python": sys.version.split()[0], "settings": vars(args),
              "hash_difference": hash_difference(base, settings), "methods": summary(out, seeds)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
