"""`engram train | eval | generate | quickstart`: the model from the shell."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engram_lm.cli.args import int_list
from engram_lm.models.config import ModelConfig
from engram_lm.recipes import RECIPES, get_recipe
from engram_lm.training.config import TrainConfig


def apply_overrides(model: ModelConfig, train: TrainConfig, pairs: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """--set key=value: a TrainConfig field, a ModelConfig field, or engram.<field>.
    Values are JSON when they parse (numbers, lists, true/false), else strings."""
    train_keys, model_keys = set(TrainConfig.__dataclass_fields__), set(ModelConfig.__dataclass_fields__)
    t_changes: dict[str, Any] = {}
    m_changes: dict[str, Any] = {}
    e_changes: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("engram."):
            if model.engram is None:
                raise ValueError(f"--set {key}: this preset has no Engram; pick a preset with Engram")
            e_changes[key[len("engram.") :]] = value
        elif key in train_keys:
            t_changes[key] = value
        elif key in model_keys:
            m_changes[key] = value
        else:
            raise ValueError(f"unknown config key {key!r}; use a TrainConfig or ModelConfig field, or engram.<field>")
    if e_changes:
        unknown = set(e_changes) - set(model.engram.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted('engram.' + k for k in unknown)}")
        m_changes["engram"] = model.engram.with_(**e_changes)
    return model.with_(**m_changes), train.with_(**t_changes)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.training.loop import train

    model_cfg, train_cfg = get_recipe(args.preset)
    if args.data is not None:
        train_cfg = train_cfg.with_(data=args.data)
    if args.steps is not None:
        train_cfg = train_cfg.with_(steps=args.steps)
    if args.save_every is not None:
        train_cfg = train_cfg.with_(save_every=args.save_every)
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, args.set or [])
    out = Path(args.out or f"runs/{args.preset}")
    return train(model_cfg, train_cfg, out, name=args.preset, device=args.device, progress=not args.quiet,
                 allow_data_change=args.allow_data_change, resume_from=args.resume_from,
                 memory=args.memory).to_dict()  # fmt: skip


def _print_train(r: dict[str, Any]) -> None:
    speed = f"{r['tokens_per_s']:,.0f} tok/s" if r["train_seconds"] > 0 else "finished before: nothing left to train"
    print(f"{r['name']}: val loss {r['val_loss']:.4f} after {r['tokens_seen']:,} tokens "
          f"({speed}); P_tot {r['params_total']:,}, P_act {r['params_active']:,}, "
          f"Engram {r['params_engram']:,}; run folder {r['run_dir']}")  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from engram_lm.training.data import eval_windows, prepare_data
    from engram_lm.inference.loading import load_trained
    from engram_lm.training.loop import evaluate

    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches {args.batches}: evaluate at least 1 batch")
    model, state = load_trained(args.checkpoint, args.device or "cpu")
    train_cfg = TrainConfig.from_dict(state["train_config"])
    batches = args.batches or train_cfg.eval_batches  # the run's own windows: the figure its log holds
    data = prepare_data(args.data or state["corpus"], str(Path(state["path"]) / "tokenizer.json"))
    windows = eval_windows(data.val, train_cfg.batch_size, train_cfg.seq_len, batches)
    loss = evaluate(model, windows, torch.device(args.device or "cpu"))
    tokens = sum(y.numel() for _, y in windows)
    same_windows = batches == train_cfg.eval_batches and args.data in (None, state["corpus"])
    return {"checkpoint": state["path"], "step": state["step"], "data": data.corpus, "val_loss": loss,
            "val_tokens": tokens, "batches": batches, "run_batches": train_cfg.eval_batches,
            "logged_val_loss": _logged_val_loss(Path(state["path"]), state["step"]) if same_windows else None,
            "probes": _probes(args.probes, model, data, state, train_cfg.seq_len, args.device or "cpu")}  # fmt: skip


def _probes(names: str | None, model, data, state: dict[str, Any], context: int, device: str) -> dict[str, Any]:
    from engram_lm.probes.fact_recall import probe_knowledge
    from engram_lm.probes.recall import probe_recall

    out: dict[str, Any] = {}
    for name in filter(None, (names or "").split(",")):
        if name == "knowledge":
            out[name] = probe_knowledge(model, data.tokenizer, state["corpus"], device)
        elif name == "recall":
            out[name] = probe_recall(model, data.tokenizer, state["corpus"], context, device)
        else:
            raise ValueError(f"--probes {name}: unknown probe; available: knowledge, recall")
    return out


def _logged_val_loss(checkpoint: Path, step: int) -> float | None:
    """The validation loss the run logged at `step` (its metrics.jsonl, two folders up), if any."""
    metrics = checkpoint.parent.parent / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().startswith("{")]
    logged = [r["val_loss"] for r in rows if r.get("step") == step and r.get("val_loss") is not None]
    return logged[-1] if logged else None


def _print_eval(r: dict[str, Any]) -> None:
    line = f"{r['checkpoint']} (step {r['step']}): val loss {r['val_loss']:.4f} on {r['val_tokens']:,} held-out tokens of {r['data']}"
    if r["logged_val_loss"] is not None:
        line += (f"; the run logged {r['logged_val_loss']:.4f} on the same {r['batches']} batches (a difference in the "
                 "last digits comes from another thread count)")  # fmt: skip
    elif r["batches"] != r["run_batches"]:
        line += (f" ({r['batches']} batches; the run's log holds its first {r['run_batches']}: without --batches "
                 "eval repeats that figure)")  # fmt: skip
    print(line)
    if "knowledge" in r.get("probes", {}):
        _print_knowledge(r["probes"]["knowledge"])
    if "recall" in r.get("probes", {}):
        _print_recall(r["probes"]["recall"])


def _print_recall(c: dict[str, Any]) -> None:
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    m, n = c["mqar"], c["needle"]
    print(f"in-context recall (fresh instances, at most {c['context']} tokens"
          + ("" if c["trained_on_format"] else "; its corpus held no recall documents: the format is new to it") + "):")
    print(f"  key-value recall {pct(m['accuracy'])} of {m['queries']} queries; by pairs "
          + "  ".join(f"{k}: {pct(v)}" for k, v in m["by_pairs"].items()))  # fmt: skip
    print(f"  needle {pct(n['accuracy'])} of {n['probes']}; by depth " + "  ".join(f"{k}: {pct(v)}" for k, v in n["by_depth"].items()))


def _print_knowledge(k: dict[str, Any]) -> None:
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    print(f"knowledge: {k['people']:,} people, {k['facts']:,} facts; recall {k['template']['recall']:.1%} in a "
          f"training template, {k['question']['recall']:.1%} asked as a question; {k['bits']:,.0f} bits "
          f"({k['bits_per_param']:.4f} per parameter)")  # fmt: skip
    print("  documents per person: " + "  ".join(f"{e}: {pct(v)}" for e, v in k["template"]["by_exposures"].items()))
    if "question_held_out_people" in k:
        q = k["question_held_out_people"]
        print(f"  asked about the people whose answers training never asked: {q['recall']:.1%} (extraction); by "
              "documents per person " + "  ".join(f"{e}: {pct(v)}" for e, v in q["by_exposures"].items()))  # fmt: skip
    if "engram_zeroed" in k:
        z = k["engram_zeroed"]["template"]
        print(f"  Engram zeroed: recall {z['recall']:.1%} (retained {pct(k['retained_recall'])}), "
              f"{k['engram_zeroed']['bits']:,.0f} bits")  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from engram_lm.inference.generate import SamplingConfig, generate
    from engram_lm.inference.loading import load_for_inference

    memory, export_dir = args.memory, args.memory_dir
    if export_dir is not None and memory not in ("mmap", "ssd", "tiered"):
        memory = "mmap"  # an export folder is read in place, in its own dtype
    model, state = load_for_inference(args.checkpoint, memory=memory, cache_rows=args.cache_rows,
                                      prefetch=args.prefetch, device=args.device or "cpu",
                                      export_dir=Path(export_dir) if export_dir else None,
                                      allow_other_export=args.allow_other_export,
                                      memory_budget=args.memory_budget, shared=args.shared)  # fmt: skip
    tokenizer = Tokenizer.from_file(str(Path(state["path"]) / "tokenizer.json"))
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop_id=model.config.eod_id)  # fmt: skip
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in args.prompt]
    outputs = generate(model, prompts, cfg)
    tables = [block.engram.memory for block in model.blocks if block.engram is not None]
    placement = [table.placement() for table in tables]
    for table in tables:  # files, threads, I/O contexts; a shared row store is removed by its last process
        table.close()
    return {"checkpoint": state["path"], "memory": placement, "completions": [
        {"prompt": p, "ids": ids, "text": tokenizer.decode(ids)} for p, ids in zip(args.prompt, outputs)]}  # fmt: skip


def _print_generate(r: dict[str, Any]) -> None:
    for c in r["completions"]:
        print(c["prompt"] + c["text"])


def cmd_tables_export(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.hf.checkpoint_tables import export_checkpoint_tables

    manifest = export_checkpoint_tables(Path(args.model), Path(args.to), args.dtype)
    return {"to": args.to, "modules": manifest["modules"], "shapes": manifest["shapes"], "dtype": manifest["dtype"]}


def cmd_export_memory(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.memory.export import export_memory

    return export_memory(Path(args.checkpoint), Path(args.to), args.dtype, check_text=args.check_text,
                         check_batches=args.check_batches, max_kl=args.max_kl, max_loss_increase=args.max_loss_increase,
                         check=not args.no_check)  # fmt: skip


def cmd_retrofit(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from engram_lm.hf.train import RetrofitConfig, retrofit
    except ImportError as err:
        raise ValueError(f"engram retrofit needs transformers ({err}); install the extra: pip install 'engram-lm[hf]'") from None
    changes: dict[str, Any] = {"data": args.data, "layers": tuple(args.layers), "steps": args.steps, "train_base": args.train_base}
    for pair in args.set or []:
        key, _, raw = pair.partition("=")
        if key not in RetrofitConfig.__dataclass_fields__:
            raise ValueError(f"unknown RetrofitConfig field {key!r}; known: {sorted(RetrofitConfig.__dataclass_fields__)}")
        try:
            changes[key] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key] = raw
    if args.save_every is not None:
        changes["save_every"] = args.save_every
    if args.lora_r:
        changes["lora_r"] = args.lora_r
    if args.lora_targets is not None:  # honoured whichever flag set the rank (--lora-r or --set lora_r=...)
        changes["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return retrofit(args.model, RetrofitConfig(**changes), Path(args.out), device=args.device, progress=not args.quiet,
                    allow_data_change=args.allow_data_change)  # fmt: skip


def _print_retrofit(r: dict[str, Any]) -> None:
    print(f"held-out loss: base {r['base_val_loss']:.4f} -> with Engram {r['val_loss']:.4f} "
          f"({r['val_tokens']:,} tokens); trainable {r['trainable_params']:,} of {r['total_params']:,} parameters; "
          f"adapter in {r['adapter']}")  # fmt: skip


def cmd_verify_memory(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.memory.export import verify_memory

    result = verify_memory(Path(args.dir))
    if not result["ok"]:
        bad = "; ".join(f"layer {k}: {v}" for k, v in result["layers"].items() if v != "ok")
        raise ValueError(f"damaged table files in {args.dir}: {bad}")
    return result


def _print_verify(r: dict[str, Any]) -> None:
    print(f"{r['dir']}: " + ", ".join(f"layer {k} {v}" for k, v in r["layers"].items()))


def _print_export(r: dict[str, Any]) -> None:
    for layer, entry in r["layers"].items():
        print(f"layer {layer}: {entry['rows']:,} rows x {r['head_dim']} ({r['dtype']}) -> {entry['file']}, "
              f"{entry['bytes']:,} bytes, sha256 {entry['sha256'][:16]}...")  # fmt: skip
    print(f"layout fingerprint {r['fingerprint']}")
    q = r.get("quality", {})
    if q.get("lossless"):
        return
    if q.get("checked"):
        print(f"quality ({q['tokens']:,} held-out tokens of {q['text']}): loss {q['loss']:.4f} -> {q['loss_format']:.4f} "
              f"({q['loss_increase']:+.4f}), KL {q['kl']:.5f} nats a token: within the gate ({q['max_loss_increase']}, "
              f"{q['max_kl']})")  # fmt: skip
    else:
        print(f"quality unchecked ({q.get('reason')}): recorded so in the manifest")


def cmd_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.experiments.quickstart import quickstart

    return quickstart(Path(args.out), data=args.data, steps=args.steps, progress=not args.quiet)


def _print_quickstart(r: dict[str, Any]) -> None:
    from engram_lm.experiments.quickstart import format_table

    print(format_table(r))


def add_model_commands(sub) -> None:
    _add_train_commands(sub)
    _add_serving_commands(sub)
    _add_retrofit_command(sub)
    _add_quickstart_command(sub)
    sub.add_parser("lm-eval", help="lm-eval's command line with the model 'engram-lm' registered (the [eval] extra): "
                                   "engram lm-eval --model engram-lm --model_args pretrained=RUN --tasks TASKS; "
                                   "`engram lm-eval --help` for its flags", add_help=False)  # fmt: skip


def _add_train_commands(sub) -> None:
    """`engram train` and `engram eval`."""
    p = sub.add_parser("train", help="train a model from a preset")
    p.add_argument("--preset", default="tiny", choices=sorted(RECIPES), help="model and training recipe")
    p.add_argument("--data", help="built-in corpus (bible, python-stdlib) or a .txt/.jsonl file or folder; "
                                  "bios:PEOPLE:SEED+CORPUS mixes synthetic biographies in, recall:DOCS:SEED+CORPUS "
                                  "in-context recall documents (engram eval --probes)")  # fmt: skip
    p.add_argument("--steps", type=int, help="training steps (default: the preset's; more extends a finished run)")
    p.add_argument("--out", help="run folder (default runs/<preset>); rerun the same command to resume")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default 500; also every 10 minutes)")
    p.add_argument("--resume-from", help="resume from this checkpoint folder instead of the newest")
    p.add_argument("--memory", default="device", choices=("device", "ram"),
                   help="where the Engram tables and their optimizer moments live while training")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the data or tokenizer changed (recorded in metrics.jsonl)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_train, show=_print_train)

    p = sub.add_parser("eval", help="validation loss of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (newest checkpoint)")
    p.add_argument("--data", help="corpus to evaluate on (its held-out split); default: the training corpus")
    p.add_argument("--batches", type=int, help="held-out batches (default: the run's own eval_batches, so the figure "
                                                "is the one its metrics.jsonl logged)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--probes", help="also score probes (comma-separated): knowledge = the facts of a run trained on "
                                    "--data bios:PEOPLE:SEED+CORPUS, recalled against exposures, in bits, and with "
                                    "Engram zeroed; recall = key-value recall and needles on fresh instances (train "
                                    "with --data recall:DOCS:SEED+CORPUS so the model knows the format)")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_eval, show=_print_eval)


def _add_serving_commands(sub) -> None:
    """`engram generate`, `engram export-memory` and `engram verify-memory`."""
    p = sub.add_parser("generate", help="continue prompts with a trained model")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (newest checkpoint)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt (fewer at end of text)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens only (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens holding this "
                                                            "probability (1.0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (greedy decoding ignores it)")
    p.add_argument("--memory", default="device", choices=("device", "ram", "mmap", "ssd", "tiered"),
                   help="where the Engram tables live (mmap, ssd and tiered export them next to the checkpoint once; "
                        "tiered: rows held in RAM up to --memory-budget, misses read from the disk at depth)")
    p.add_argument("--memory-budget", help="--memory tiered: RAM for table rows, all layers together, e.g. 512M or 4G "
                                           "(default: half the available memory)")
    p.add_argument("--shared", action="store_true", help="--memory tiered: one row store in /dev/shm for every process "
                                                          "on this host serving the same tables (named from their hash)")
    p.add_argument("--memory-dir", help="tables exported by `engram export-memory` (implies --memory mmap)")
    p.add_argument("--allow-other-export", action="store_true",
                   help="serve a --memory-dir exported from another checkpoint or step (refused by default)")
    p.add_argument("--cache-rows", type=int, default=0, help="hot-row cache in front of the tables (rows)")
    p.add_argument("--prefetch", action="store_true", help="gather table rows in the background")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_generate, show=_print_generate)

    p = sub.add_parser("export-memory", help="write a checkpoint's Engram tables as mmap-able files")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (newest checkpoint)")
    p.add_argument("--to", required=True, help="output folder (manifest.json + layer-<L>.bin)")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp8", "int8", "int4"),
                   help="row encoding (fp8: e4m3 with a power-of-two scale per 32 values; int8 / int4: integers with "
                        "a bf16 scale per 32 values); a lossy one is measured first and refused above the gate")
    p.add_argument("--check-text", help="corpus to measure the format's cost on (default: the run's own held-out split)")
    p.add_argument("--check-batches", type=int, default=8, help="held-out batches the gate measures")
    p.add_argument("--max-kl", type=float, help="the gate: mean next-token KL in nats (default 0.01)")
    p.add_argument("--max-loss-increase", type=float, help="the gate: held-out loss increase in nats (default 0.01)")
    p.add_argument("--no-check", action="store_true", help="export without measuring (recorded as unchecked)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_export_memory, show=_print_export)

    p = sub.add_parser("tables", help="the n-gram tables of released models (qwen4_exp, DeepSeek-V4.1)")
    tables = p.add_subparsers(dest="tables", required=True)
    t = tables.add_parser("export", help="stream a checkpoint folder's n-gram tables into an engram-lm export")
    t.add_argument("--model", required=True, help="a qwen4_exp or DeepSeek-V4.1 checkpoint folder (config.json and safetensors)")
    t.add_argument("--to", required=True, help="output folder (manifest.json + layer-<k>.bin)")
    t.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp8", "int8", "int4"),
                   help="row encoding for qwen4_exp tables (V4.1's are copied in their own fp8 rows); a lossy one is "
                        "recorded as quality-unchecked: no model runs here")
    t.add_argument("--json", action="store_true")
    t.set_defaults(run=cmd_tables_export, show=lambda r: print(f"{len(r['modules'])} table(s) {r['shapes']} as "
                                                                f"{r['dtype']} in {r['to']}"))  # fmt: skip

    p = sub.add_parser("verify-memory", help="re-hash exported table files against their manifest")
    p.add_argument("dir", help="an export folder (manifest.json + layer-<L>.bin)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_verify_memory, show=_print_verify)


def _add_retrofit_command(sub) -> None:
    p = sub.add_parser("retrofit", help="add Engram to a local Hugging Face causal LM and train only the memory")
    p.add_argument("--model", required=True, help="a local Hugging Face model folder (config.json, weights, tokenizer.json)")
    p.add_argument("--data", default="bible", help="what `engram train --data` takes, tokenized with the model's tokenizer")
    p.add_argument("--layers", type=int_list, default=[1], help="decoder layers that get an Engram module (0-based)")
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--out", default="runs/retrofit", help="run folder (rerun the same command to resume)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a RetrofitConfig field (repeatable)")
    p.add_argument("--train-base", action="store_true", help="fine-tune the base model too (at base_lr)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default 100; also every 10 minutes)")
    p.add_argument("--lora-r", type=int, default=0, help="train LoRA (through peft) of this rank beside the memory")
    p.add_argument("--lora-targets", help="comma-separated module names for LoRA (default: every linear layer)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the data or the model's tokenizer changed (recorded in metrics.jsonl)")
    p.add_argument("--device", default="cpu", help="compute device")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_retrofit, show=_print_retrofit)


def _add_quickstart_command(sub) -> None:
    p = sub.add_parser("quickstart", help="MoE vs iso-parameter MoE+Engram on the built-in corpus (~3-5 min on 2 cores)")
    p.add_argument("--out", default="runs/quickstart", help="folder for both runs (~75 MB with their checkpoints), "
                                                            "summary.json and loss_curves.png")
    p.add_argument("--data", help="run the same comparison on your corpus")
    p.add_argument("--steps", type=int, help="override the number of steps (default from the presets)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_quickstart, show=_print_quickstart)
