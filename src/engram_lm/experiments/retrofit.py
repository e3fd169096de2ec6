"""`engram experiment retrofit` and the page's section `retrofit`: Engram or LoRA, for what?

A small Llama pretrained here on the Bible (hf/pretrain.py; cached in OUT/retrofit/base and
reused) is adapted, at the same steps, batches and data, by each method of METHODS: the frozen
base, the Engram memory alone, LoRA (through peft) of rank 8 and 64, LoRA rank 8 with the
memory, and full fine-tuning. Every batch is half windows of a new domain (code: a slice of the
Python standard library the base never read) and half windows of country facts the base never
read (experiments/knowledge.py, the training templates). Each run measures:
- held-out loss on the new domain (held-out files; `val_loss`);
- knowledge injection: the share of facts completed exactly, in the training templates and in
  paraphrases never trained on (held-out templates);
- forgetting: loss on the base's own held-out Bible, after minus before;
- cost: seconds per step (torch threads fixed per run), peak resident memory of the run's own
  process, trainable parameters, adapter size on disk.
Runs are resumable (a finished run's result.json is kept) and run one at a time, each in its
own process (its peak memory is its own).
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from engram_lm.experiments.knowledge import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, country_facts, fact_tokens, probes, score_probes
from engram_lm.experiments.page import claim_verdict, fmt_estimate, md_table
from engram_lm.experiments.runner import read_result
from engram_lm.experiments.stats import compare, estimate
from engram_lm.hf.pretrain import PretrainConfig
from engram_lm.training.data import eval_windows, prepare_data, sample_batch, seed_step
from engram_lm.training.run import run_metadata, write_json

DOMAIN = "first:1500000:python-stdlib"
BASE = PretrainConfig(steps=1200)  # 2.46M tokens, about 2.6 epochs of the Bible's training split
COMMAND = "engram experiment retrofit --seeds 3 --out results/study"


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    memory: bool = False  # the Engram memory (tables at 5x lr, sparse-row Adam)
    lora_r: int = 0  # LoRA through peft on every linear layer, alpha = 2r
    full: bool = False  # every base weight trains
    lr: float = 1e-3  # the memory's and LoRA's (the base's with `full`)


METHODS = (Method("frozen"), Method("engram", memory=True), Method("lora8", lora_r=8), Method("lora64", lora_r=64),
           Method("lora8+engram", memory=True, lora_r=8), Method("full", full=True, lr=2e-4))  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrofitSettings:
    steps: int = 400
    domain_rows: int = 8  # rows of each batch from the new domain
    fact_rows: int = 8  # rows from the facts
    seq_len: int = 128
    eval_batches: int = 8  # of 16 x seq_len held-out tokens, for the domain and for the Bible
    threads: int = 1  # torch threads in every run (the cost column compares like with like)
    layers: tuple[int, ...] = (1,)
    table_size: int = 50_000
    num_heads: int = 4
    max_ngram: int = 3

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)}" for k in ("steps", "domain_rows", "fact_rows", "seq_len", "eval_batches", "threads",
                                                    "table_size", "num_heads") if getattr(self, k) < 1]  # fmt: skip
        if bad:
            raise ValueError(f"RetrofitSettings {', '.join(bad)}: each must be 1 or more")


def base_model(out: Path, cfg: PretrainConfig = BASE, progress: bool = True) -> Path:
    """The cached base (OUT/retrofit/base), pretrained first if its weights are not there (the
    repository keeps its pretrain.json and config, not its weights: a base pretrained again on
    another machine can differ in the last digits, so compare runs made with the same base)."""
    from engram_lm.hf.pretrain import pretrain_llama

    folder = out / "retrofit" / "base"
    if not (folder / "model.safetensors").is_file():
        if progress:
            print(f"retrofit: pretraining the base once ({cfg.steps} steps) into {folder}", flush=True)
        pretrain_llama(folder, cfg, progress=progress)
    check_base(folder)
    return folder


def check_base(folder: Path) -> None:
    """A base folder this experiment made: its record (pretrain.json) and readable weights; refused
    in one line before any run trains on it."""
    from safetensors import SafetensorError, safe_open

    if not (folder / "pretrain.json").is_file():
        raise ValueError(f"{folder} has no pretrain.json: it was not made by engram experiment retrofit (or lost its "
                         "record); remove the folder and the base is pretrained again")  # fmt: skip
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt"):
            pass  # safetensors checks that the header's tensors cover the file
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{folder / 'model.safetensors'} is truncated or damaged ({exc}); remove it and the base is "
                         "pretrained again") from None  # fmt: skip


def retrofit_sweep(out: Path, *, seeds=(0, 1, 2), methods: tuple[Method, ...] = METHODS,
                   settings: RetrofitSettings = RetrofitSettings(), progress: bool = True,
                   base_config: PretrainConfig = BASE) -> list[dict[str, Any]]:  # fmt: skip
    """Every method at every seed (seed by seed, so that a stopped sweep has whole comparisons),
    each run in its own process; a finished run (its result.json) is kept, refused when it was made
    with other settings. Returns the results."""
    ctx = multiprocessing.get_context("spawn")
    results, base = [], None
    for seed in seeds:
        for method in methods:
            path = out / "retrofit" / method.name / f"seed{seed}" / "result.json"
            if path.is_file():
                _check_same_run(path, method, seed, settings)
            else:
                base = base or base_model(out, base_config, progress=progress)  # only when something trains
                if progress:
                    print(f"retrofit: {method.name} seed {seed}", flush=True)
                proc = ctx.Process(target=run_method, args=(base, method, seed, settings, path))
                proc.start()
                proc.join()
                if proc.exitcode != 0:
                    raise RuntimeError(f"retrofit run {method.name} seed {seed} failed (exit {proc.exitcode}); see above")
            results.append(read_result(path))
    return results


def _check_same_run(path: Path, method: Method, seed: int, settings: RetrofitSettings) -> None:
    """A finished run resumed into a sweep must have been made with the sweep's settings: else its
    row would average runs of different lengths or sizes."""
    saved = read_result(path)
    now = json.loads(json.dumps({**asdict(settings), **{f"method.{k}": v for k, v in asdict(method).items()}}))
    then = {**saved.get("settings", {}), **{f"method.{k}": v for k, v in saved.get("method", {}).items()}}
    differ = [f"{k} {then.get(k)}, now {v}" for k, v in now.items() if k in then and then[k] != v]
    if differ:
        flags = " ".join(f"--{k} {then[k]}" for k in ("steps", "threads") if k in then and then[k] != now[k])
        raise ValueError(f"{method.name} seed {seed} finished with other settings than this sweep's ({'; '.join(differ)}): "
                         f"rerun with {flags or 'the settings it was made with'}, or give another --out")  # fmt: skip


@dataclass(frozen=True)
class RunData:
    """What every run reads: the new domain, the base's own corpus (for forgetting), the fact
    sentences as a token stream, and the fixed held-out windows of both corpora."""

    tokenizer: Any
    domain: Any
    stream: Any
    facts: list
    domain_val: list
    bible_val: list

    @classmethod
    def load(cls, tok_path: Path, settings: RetrofitSettings) -> "RunData":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
        domain, bible = prepare_data(DOMAIN, str(tok_path)), prepare_data("bible", str(tok_path))
        facts = country_facts()
        rows = settings.domain_rows + settings.fact_rows
        return cls(tokenizer, domain, fact_tokens(tokenizer, facts, domain.eod_id), facts,
                   eval_windows(domain.val, rows, settings.seq_len, settings.eval_batches),
                   eval_windows(bible.val, rows, settings.seq_len, settings.eval_batches))  # fmt: skip


def run_method(base: Path, method: Method, seed: int, settings: RetrofitSettings, result_path: Path,
               adapt: Callable | None = None) -> dict[str, Any]:  # fmt: skip
    """One method at one seed, start to finish: adapt, measure, write result.json. `adapt(model,
    method, tokenizer_path, eod_id, settings) -> (model, optimizers, save)` builds the method
    (default: engram-lm's, `adapt_model`; the peer benchmark passes another library's)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(settings.threads)
    tok_path = base / "tokenizer.json"
    data = RunData.load(tok_path, settings)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    before = {"base_val_loss": _loss(model, data.domain_val), "base_forget_loss": _loss(model, data.bible_val)}
    torch.manual_seed(seed)
    model, optimizers, save = (adapt or adapt_model)(model, method, tok_path, data.domain.eod_id, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = settings.steps if optimizers else 0
    seconds = _train(model, optimizers, data, settings, seed, steps)
    result = {"key": f"retrofit/{method.name}/seed{seed}", "section": "retrofit", "variant": method.name, "seed": seed,
              "val_loss": _loss(model, data.domain_val), "forget_loss": _loss(model, data.bible_val), **before,
              **_facts_known(model, data), "facts": len(data.facts), "steps": steps,
              "s_per_step": seconds / steps if steps else None, "trainable_params": trainable,
              "adapter_bytes": _saved_bytes(save), "peak_rss_mb": _peak_rss_mb(),
              "epochs": steps * settings.domain_rows * settings.seq_len / len(data.domain.train),
              "fact_epochs": steps * settings.fact_rows * settings.seq_len / len(data.stream), "data": DOMAIN,
              "method": asdict(method), "settings": asdict(settings),
              "base": json.loads((base / "pretrain.json").read_text()), **run_metadata()}  # fmt: skip
    result_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(result_path, result)
    return result


def _train(model, optimizers, data: RunData, settings: RetrofitSettings, seed: int, steps: int) -> float:
    """`steps` steps on half domain, half fact windows (drawn from the seed and the step alone);
    the seconds they took."""
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        xd, yd = sample_batch(data.domain.train, settings.domain_rows, settings.seq_len, seed=seed, step=step)
        xf, yf = sample_batch(data.stream, settings.fact_rows, settings.seq_len, seed=seed, step=step, micro=1)
        seed_step(seed, step)
        logits = model(input_ids=torch.cat([xd, xf]), use_cache=False).logits
        F.cross_entropy(logits.float().flatten(0, 1), torch.cat([yd, yf]).flatten()).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _facts_known(model, data: RunData) -> dict[str, float]:
    known = {name: score_probes(model, probes(data.tokenizer, data.facts, templates), data.domain.eod_id)
             for name, templates in (("train", TRAIN_TEMPLATES), ("held_out", HELD_OUT_TEMPLATES))}  # fmt: skip
    return {f"facts_{name}_{key}": value for name, scores in known.items()
            for key, value in (("accuracy", scores["accuracy"]), ("nll", scores["answer_nll"]))}  # fmt: skip


def adapt_model(model, method: Method, tok_path: Path, eod_id: int, settings: RetrofitSettings):
    """The model as `method` trains it, its optimizers (none for the frozen base) and what saves
    what a user keeps of the run, as each library saves it: the memory (save_engram), LoRA
    (peft's save_pretrained), or the whole fine-tuned model (None: nothing to keep)."""
    from engram_lm.hf.adapter import save_engram
    from engram_lm.hf.retrofit import add_engram
    from engram_lm.hf.train import engram_optimizers

    if method.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=method.lora_r, lora_alpha=2 * method.lora_r, target_modules="all-linear",
                                                 lora_dropout=0.0))  # fmt: skip
    if method.memory:
        add_engram(model, str(tok_path), layers=settings.layers, table_size=settings.table_size,
                   num_heads=settings.num_heads, max_ngram=settings.max_ngram, eod_id=eod_id, pad_id=eod_id,
                   init_seed=None)  # the run seeded the global generator (run_method): the committed runs' draws  # fmt: skip
    memory = {id(p) for p in model.engram.parameters()} if method.memory else set()
    for name, p in model.named_parameters():
        p.requires_grad_(method.full or id(p) in memory or bool(method.lora_r and "lora_" in name))

    def save(folder: Path) -> None:
        if method.memory:
            save_engram(model, folder / "engram")
        if method.lora_r or method.full:
            model.save_pretrained(folder / "weights")

    if method.memory:
        return model, list(engram_optimizers(model, lr=method.lr).values()), save
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return model, [], None
    return model, [torch.optim.AdamW(params, lr=method.lr, weight_decay=0.0)], save


def _loss(model, windows) -> float:
    from engram_lm.hf.train import evaluate_lm

    return evaluate_lm(model, windows, "cpu")


def _saved_bytes(save: Callable | None) -> int:
    """The bytes `save` writes (0 without anything to save)."""
    if save is None:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# (claim, method, against, measure, expected direction of method - against)
CLAIMS = (
    ("ours, retrofit: the Engram memory alone beats LoRA r 8 on the new domain's held-out loss", "engram", "lora8", "val_loss", "lower"),
    ("ours, retrofit: LoRA r 8 + Engram beats LoRA r 8 alone on the new domain's held-out loss", "lora8+engram", "lora8", "val_loss", "lower"),
    ("ours, retrofit: the Engram memory alone injects more facts than LoRA r 8 (paraphrases never trained on)", "engram", "lora8", "facts_held_out_accuracy", "higher"),
    ("ours, retrofit: LoRA r 8 + Engram injects more facts than LoRA r 8 alone (paraphrases)", "lora8+engram", "lora8", "facts_held_out_accuracy", "higher"),
    ("ours, retrofit: the Engram memory alone forgets less than LoRA r 8 (base's held-out Bible loss)", "engram", "lora8", "forget_loss", "lower"),
    ("ours, retrofit: the Engram memory alone forgets less than full fine-tuning", "engram", "full", "forget_loss", "lower"),
)  # fmt: skip


def _per_seed(runs: list[dict[str, Any]], method: str, measure: str) -> dict[int, float]:
    return {r["seed"]: r[measure] for r in runs if r["variant"] == method and r.get(measure) is not None}


def _cell(runs: list[dict[str, Any]], method: str, measure: str, scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in _per_seed(runs, method, measure).values()]
    return fmt_estimate(estimate(values), digits=digits) if values else "-"


def _forgetting(runs: list[dict[str, Any]], method: str) -> str:
    diffs = [r["forget_loss"] - r["base_forget_loss"] for r in runs if r["variant"] == method]
    return fmt_estimate(estimate(diffs), signed=True, digits=3) if diffs else "-"


def retrofit_section(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    title = "## Engram or LoRA, for what? (retrofitting a pretrained model)"
    if not runs:
        return [], [title, "", f"Not run yet (`{COMMAND}`).", ""]
    methods = [m.name for m in METHODS if any(r["variant"] == m.name for r in runs)]
    first = next(r for r in runs if r["steps"])
    base, settings = first["base"], first["settings"]
    seeds = len({r["seed"] for r in runs})
    lines = [title, "", f"`{COMMAND}`. A Llama of {base['params'] / 1e6:.1f}M parameters pretrained here on the Bible "
             f"({base['tokens'] / 1e6:.2f}M tokens, {base['epochs']:.1f} epochs; held-out loss {base['val_loss']:.3f}) is "
             f"adapted by each method for {first['steps']} steps of {settings['domain_rows']} + {settings['fact_rows']} "
             f"windows of {settings['seq_len']} tokens: a new domain (`{first['data']}`: held-out files; "
             f"{first['epochs']:.2f} epochs, nothing repeats) and {first['facts']} country facts the base never read, in 4 "
             f"training templates per relation ({first['fact_epochs']:.1f} epochs of the fact sentences). *Facts* is the share "
             "completed exactly (every answer token the argmax) in the training templates and in 2 paraphrases per relation "
             "never trained on, *answer NLL* the mean loss of the paraphrases' answer tokens; *forgetting* is the base's held-out Bible loss after minus before. Learning rates, not tuned: "
             "1e-3 for the memory (its tables 5x, sparse-row Adam) and for LoRA (alpha = 2r, every linear layer, through "
             "peft), 2e-4 for full fine-tuning. Cost: seconds per step at "
             f"{settings['threads']} torch thread(s) (the runs shared the machine's other core with other work: compare "
             "within the column), peak resident memory of the run's process, the adapter as saved. "
             f"{seeds} seed(s), mean ± SE.", ""]  # fmt: skip
    rows = [[m, f"{_per_seed(runs, m, 'trainable_params').get(first['seed'], 0) / 1e6:.2f}M",
             f"{next(r['adapter_bytes'] for r in runs if r['variant'] == m) / 1e6:.2f}",
             _cell(runs, m, "val_loss"), _cell(runs, m, "facts_train_accuracy", 100, 1),
             _cell(runs, m, "facts_held_out_accuracy", 100, 1), _cell(runs, m, "facts_held_out_nll", digits=2),
             _forgetting(runs, m),
             _cell(runs, m, "s_per_step", digits=3), _cell(runs, m, "peak_rss_mb", digits=0)] for m in methods]  # fmt: skip
    lines += md_table(["method", "trainable", "adapter MB", "held-out loss (new domain)", "facts %, trained templates",
                       "facts %, paraphrases", "answer NLL, paraphrases", "forgetting (nats)", "s/step", "peak MB"],
                      rows)  # fmt: skip
    verdicts = []
    for claim, method, against, measure, expected in CLAIMS:
        a, b = _per_seed(runs, method, measure), _per_seed(runs, against, measure)
        if not set(a) & set(b):
            continue
        c = compare(a, b)
        scale, unit = (100, " points") if "accuracy" in measure else (1, " nats")
        numbers = (f"{method} - {against}: {c.diff.mean * scale:+.3f} ± {c.diff.se * scale:.3f}{unit}" if c.diff.n > 1
                   else f"{method} - {against}: {c.diff.mean * scale:+.3f}{unit}")  # fmt: skip
        verdicts.append([claim, claim_verdict(c.verdict, expected), f"new domain {first['epochs']:.2f} epochs, "
                         f"{c.diff.n} seed(s)", numbers])  # fmt: skip
    return verdicts, lines + [""]
