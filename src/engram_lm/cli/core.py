"""`engram vocab | layout | hash`: the core (compression, layout, hashing) from the shell."""

from __future__ import annotations

import argparse
from typing import Any

from engram_lm.cli.args import int_list
from engram_lm.config import EngramConfig
from engram_lm.presets import PRESETS, get_preset


def _add_layout_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layout (a preset, then any flag overrides it)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset (default paper-demo)")
    g.add_argument("--tokenizer", help="built-in name, tokenizer.json path, or identity:V")
    g.add_argument("--layers", type=int_list, help="Engram layer ids, e.g. 1,15")
    g.add_argument("--table-sizes", type=int_list, help="base table size per order 2..N, e.g. 646400,646400")
    g.add_argument("--max-ngram", type=int, help="N, the largest n-gram order")
    g.add_argument("--heads", type=int, help="hash heads per order")
    g.add_argument("--seed", type=int, help="hash seed: layer l draws its multipliers from NumPy default_rng(seed + 10007 l)")
    g.add_argument("--pad-id", type=int, help="raw pad token id")


def _config_from_flags(args: argparse.Namespace) -> EngramConfig:
    config = get_preset(args.preset or "paper-demo")
    overrides = {
        "tokenizer": args.tokenizer,
        "layer_ids": args.layers,
        "max_ngram": args.max_ngram,
        "num_heads": args.heads,
        "seed": args.seed,
        "pad_id": args.pad_id,
        "table_sizes": args.table_sizes,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.max_ngram is not None and args.table_sizes is None:
        overrides["table_sizes"] = (config.table_sizes[0],) * (args.max_ngram - 1)
    if args.heads is not None:  # keep the head dim valid when only the head count changes
        overrides.setdefault("embed_per_ngram", args.heads * config.head_dim)
    return config.with_(**overrides)


def cmd_vocab(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.tokenizer.cache import load_projection
    from engram_lm.tokenizer.sources import load_tokenizer, resolve_tokenizer

    projection = load_projection(args.tokenizer)
    tokenizer = None if args.tokenizer.startswith("identity:") else load_tokenizer(resolve_tokenizer(args.tokenizer))
    merges = []
    for cid, key, count, examples in projection.top_merges(args.top):
        texts = [tokenizer.decode([i], skip_special_tokens=False) for i in examples] if tokenizer else []
        merges.append({"canonical_id": cid, "text": key, "count": count, "examples": texts, "example_ids": examples})
    return {
        "tokenizer": projection.source,
        "raw_size": projection.raw_size,
        "compressed_size": projection.compressed_size,
        "reduction": projection.reduction,
        "digest": projection.digest,
        "top_merges": merges,
    }


def _print_vocab(r: dict[str, Any]) -> None:
    print(f"tokenizer        {r['tokenizer']}")
    print(f"raw ids          {r['raw_size']:,}")
    print(f"compressed ids   {r['compressed_size']:,}  ({r['reduction']:.2%} fewer)")
    print("top merges (canonical text <- count raw ids, examples):")
    for m in r["top_merges"]:
        print(f"  {m['text']!r:>12} <- {m['count']:4d}  {', '.join(repr(e) for e in m['examples'])}")


def cmd_layout(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.hashing.hasher import NgramHasher

    config = _config_from_flags(args)
    hasher = NgramHasher.from_config(config)
    layout = hasher.layout
    head_dim = args.head_dim or config.head_dim
    return {
        "config": config.to_dict(),
        **layout.to_dict(),
        "fingerprint": layout.fingerprint,
        "total_rows": layout.total_rows,
        "head_dim": head_dim,
        "params": layout.num_params(head_dim),
    }


def _print_layout(r: dict[str, Any]) -> None:
    print(f"compressed vocab {r['compressed_vocab_size']:,}   mapped pad id {r['pad_id']}")
    print(f"fingerprint      {r['fingerprint']}")
    for layer_id, layer in r["layers"].items():
        print(f"layer {layer_id}: rows {layer['rows']:,}   multipliers {layer['multipliers']}")
        for n, primes in enumerate(layer["primes"], start=2):
            print(f"  {n}-gram primes {primes}")
        print(f"  offsets {layer['offsets']}")
    print(f"total rows {r['total_rows']:,} x head dim {r['head_dim']} = {r['params']:,} parameters")


def cmd_hash(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from engram_lm.hashing.hasher import NgramHasher
    from engram_lm.tokenizer.sources import load_tokenizer, resolve_tokenizer

    config = _config_from_flags(args)
    hasher = NgramHasher.from_config(config)
    if args.text is not None:
        if config.tokenizer.startswith("identity:"):
            raise ValueError("--text needs a real tokenizer; with identity:V pass --ids")
        ids = load_tokenizer(resolve_tokenizer(config.tokenizer)).encode(args.text, add_special_tokens=False).ids
    else:
        ids = args.ids
    if any(i < 0 for i in ids) and not args.allow_negative:
        raise ValueError(f"--ids has negative ids {[i for i in ids if i < 0]}: token ids are >= 0; negative ids are "
                         "padding markers that pass through uncompressed (as in the reference demo): pass "
                         "--allow-negative to hash them as such")  # fmt: skip
    ids_BT = torch.tensor([ids], dtype=torch.int64)
    hashes = hasher(ids_BT, global_rows=args.global_rows, eod_id=args.eod_id)
    return {
        "fingerprint": hasher.layout.fingerprint,
        "global_rows": args.global_rows,
        "input_ids": ids,
        "compressed_ids": hasher.projection.compress(ids_BT)[0].tolist(),
        "hashes": {str(layer_id): rows[0].tolist() for layer_id, rows in hashes.items()},
    }


def _print_hash(r: dict[str, Any]) -> None:
    print(f"input ids      {r['input_ids']}")
    print(f"compressed ids {r['compressed_ids']}")
    kind = "global rows" if r["global_rows"] else "per-head local ids"
    for layer_id, positions in r["hashes"].items():
        print(f"layer {layer_id} ({kind}, one line per position):")
        for t, row in enumerate(positions):
            print(f"  t={t:<3d} {row}")


def add_core_commands(sub) -> None:
    p = sub.add_parser("vocab", help="tokenizer compression statistics")
    p.add_argument("--tokenizer", default="deepseek-v3", help="built-in name or tokenizer.json path")
    p.add_argument("--top", type=int, default=10, help="how many top merges to list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_vocab, show=_print_vocab)

    p = sub.add_parser("layout", help="hash layout: multipliers, primes, offsets, fingerprint")
    _add_layout_flags(p)
    p.add_argument("--head-dim", type=int, help="head dim for the parameter count (default from preset)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_layout, show=_print_layout)

    p = sub.add_parser("hash", help="hash a text or a list of token ids")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a text, tokenized with --tokenizer")
    src.add_argument("--ids", type=int_list, help="raw token ids, e.g. 5,17,9")
    _add_layout_flags(p)
    p.add_argument("--global-rows", action="store_true", help="add head offsets (rows of the layer table)")
    p.add_argument("--allow-negative", action="store_true", help="hash negative ids as pass-through padding markers")
    p.add_argument("--eod-id", type=int, help="end-of-document token id: n-grams never cross it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_hash, show=_print_hash)
