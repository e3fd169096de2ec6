"""`engram bench ...`: benchmarks that print figures (ratios measured side by side)."""

from __future__ import annotations

import argparse
from typing import Any

from engram_lm.cli.args import int_list


def cmd_bench_hashing(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.bench.hashing import bench_hashing

    return bench_hashing(batch=args.batch, seq=args.seq, repeats=args.repeats)


def _print_hashing(r: dict[str, Any]) -> None:
    print(f"hashing, {r['layout']} layout, batch ({r['batch']}, {r['seq']}), {r['layers']} layers x "
          f"{r['hash_columns_per_layer']} columns")  # fmt: skip
    print(f"  torch ({r['torch_threads']} threads) {r['torch_tokens_per_s']:>14,.0f} tokens/s")
    print(f"  numpy reference   {r['numpy_tokens_per_s']:>14,.0f} tokens/s")
    print(f"  speedup {r['speedup_vs_numpy']:.2f}x   outputs equal: {r['outputs_equal']}")


def cmd_bench_train_scaling(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.bench.train_scaling import bench_train_scaling

    return bench_train_scaling(slots=args.slots, steps=args.steps, warmup=args.warmup)


def _print_train_scaling(r: dict[str, Any]) -> None:
    print(f"train step time vs Engram table size ({r['steps']} timed steps, batch {r['batch']}x{r['seq']})")
    for c in r["configs"]:
        print(f"  {c['slots']:>12,} slots  {c['table_gb']:6.2f} GB   {c['step_ms']:8.1f} ms/step  "
              f"(median; rows touched/step {c['rows_touched']:,})")  # fmt: skip
    print(f"  ratio largest/smallest: {r['ratio']:.3f}")


def cmd_bench_offload(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.bench.offload import bench_offload

    return bench_offload(table_gb=args.table_gb, cache_rows=args.cache_rows, repeats=args.repeats, device=args.device,
                         workdir=Path(args.workdir) if args.workdir else None)  # fmt: skip


def _print_offload(r: dict[str, Any]) -> None:
    ref = r["reference"]
    print(f"Engram table {r['table_bytes'] / 1e9:.2f} GB ({r['table_rows']:,} rows), batch {r['batch']} x "
          f"{r['prompt_len']} prompt tokens, {r['new_tokens']} decoded; cache {r['cache_rows']:,} rows, "
          f"hit rate {r['cache_hit_rate']:.1%}")  # fmt: skip
    print(f"reference, random 4 KiB reads of the file ({ref['tool']}): {ref['qd1_iops']:,.0f} IOPS at queue depth 1, "
          f"{ref['qd32_iops']:,.0f} at 32; backbone without Engram: {r['no_engram']['prefill_tok_s']:,.0f} prefill tok/s")  # fmt: skip
    print(f"  {'config':<26}{'state':<6}{'prefill tok/s':>14}{'decode tok/s':>13}{'rows/s':>13}")
    for state in ("warm", "cold"):
        for name, c in r[state].items():
            if state == "cold" and name == "ram":
                continue  # RAM has no cold state (listed in the JSON with the warm numbers)
            print(f"  {name:<26}{state:<6}{c['prefill_tok_s']:>14,.0f}{c['decode_tok_s']:>13,.0f}{c['rows_per_s']:>13,.0f}")
    k = r["checks"]
    print(f"cold SSD-tier rows/s vs the file's queue-depth-32 IOPS: {k['ssd_cold_rows_vs_qd32_iops']:.2f}x; "
          f"cold prefill ssd vs mmap_sync: {k['cold_prefill_ssd_vs_mmap']:.1f}x "
          f"(best cold: {k['cold_prefill_best'][0]}, {k['cold_prefill_best'][1]:,.0f} tok/s)")  # fmt: skip
    w = k["warm_best_offload"]
    print(f"warm, best offloaded config: {w['name']}, {w['penalty_vs_ram']:+.1%} vs ram")
    worst = min(k["prefetch_vs_without"].items(), key=lambda kv: kv[1])
    print(f"prefetch vs the same config without it: worst {worst[0]} at {worst[1]:.3f}x (1.0 = equal)")
    print("warm, paired turn by turn (median, bootstrap 95% interval; an interval without 1.0 is resolved):")
    for name, v in k["paired_warm"].items():
        print(f"  {name:<45}{v['median']:7.3f}  [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")


def cmd_bench_big_table(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.bench.big_table import bench_big_table

    progress = None if args.json else print
    return bench_big_table(table_gb=args.table_gb, workdir=args.workdir, tier=args.tier, repeats=args.repeats,
                           keep=args.keep, progress=progress)  # fmt: skip


def _print_big_table(r: dict[str, Any]) -> None:
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    peak = r["peak_rss_bytes_while_serving"]
    print(f"table {gb(r['table_bytes'])} ({r['table_rows']:,} rows) on a machine with {gb(r['mem_total_bytes'])} RAM, "
          f"tier {r['tier']} ({r['placement'].get('engine', 'page cache')}); written in {r['write_seconds']:.0f} s")  # fmt: skip
    print(f"batch {r['batch']} x {r['prompt_len']} prompt tokens, {r['new_tokens']} decoded: "
          f"prefill {r['prefill_tok_s']:,.0f} tok/s, decode {r['decode_tok_s']:,.0f} tok/s")  # fmt: skip
    print(f"resident memory: {gb(r['rss_bytes_before_serving'])} before serving, {gb(r['rss_bytes_after_serving'])} after"
          + (f", peak while serving {gb(peak)}" if peak else ""))  # fmt: skip


def cmd_bench_penalty(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from engram_lm.bench.penalty import bench_penalty

    if args.turns < 1:
        raise ValueError(f"--turns {args.turns}: give 1 or more")
    tiers = tuple(t.strip() for t in args.tiers.split(",") if t.strip())
    unknown = sorted(set(tiers) - {"device", "ram", "tiered", "mmap", "ssd"})
    if unknown:
        raise ValueError(f"--tiers {','.join(unknown)}: choose from device, ram, tiered, mmap, ssd")
    return bench_penalty(args.shape, table_gb=args.table_gb, workdir=Path(args.workdir) if args.workdir else None,
                         device=args.device, turns=args.turns, tiers=tiers, prefill=tuple(args.prefill or ()) or None,
                         decode=tuple(args.decode or ()) or None, new_tokens=args.new_tokens, cold=not args.no_cold,
                         offline=_offline_arg(args.offline))  # fmt: skip


def _offline_arg(value: str | None) -> tuple[int, int, int, int] | None:
    if value is None:
        return None
    try:
        sequences, low, high, wave = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--offline {value}: give SEQUENCES,LOW,HIGH,WAVE, four integers (the paper: 512,100,1024 and "
                         "a wave the memory holds, e.g. 512,100,1024,32 on a GPU, 8,16,64,4 on a CPU)") from None  # fmt: skip
    return sequences, low, high, wave


def _print_penalty(r: dict[str, Any]) -> None:
    print(f"{r['shape']}: {r['params'] / 1e9:.2f}B parameters ({r['source']}); table {r['table_rows']:,} rows = "
          f"{r['table_bytes'] / 1e9:.2f} GB; {r['device']}, {r['torch_threads']} threads, {r['turns']} turns"
          + ("; workloads scaled down for a CPU" if r["scaled_for_cpu"] else ""))  # fmt: skip
    print(f"  {'config':<22}{'workload':<14}{'tok/s':>10}{'penalty':>10}{'95% interval':>20}{'p50 ms':>9}{'p99 ms':>9}")
    for state in ("warm", "cold"):
        for name, works in r[state].items():
            for work, e in works.items():
                if not isinstance(e, dict) or "tok_s" not in e:
                    continue
                ci = f"[{e['ci95'][0]:+.1%}, {e['ci95'][1]:+.1%}]" if "ci95" in e else ""
                value = e.get("penalty")  # cold: one turn, against the backbone timed just before it
                pen = f"{value:+.1%}" if value is not None else ""
                lat = f"{e['p50_ms']:>9.2f}{e['p99_ms']:>9.2f}" if "p50_ms" in e else ""
                print(f"  {name + (' cold' if state == 'cold' else ''):<22}{work:<14}{e['tok_s']:>10,.1f}{pen:>10}{ci:>20}{lat}")
    waits = [(f"{name}{' cold' if state == 'cold' else ''}", e["placement"]["waited_ms_per_call"])
             for state in ("warm", "cold") for name, e in r[state].items()
             if "waited_ms_per_call" in e.get("placement", {})]  # fmt: skip
    if waits:  # a table read at the model's input: no compute before it to overlap
        print("  the table layer's wait per call (ms): " + ", ".join(f"{n} {w:.2f}" for n, w in waits))
    print(f"peak resident memory {r['peak_rss_gb']:.2f} GB")


def cmd_bench_replicas(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from engram_lm.bench.replicas import MODES, bench_replicas

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if set(modes) - set(MODES):
        raise ValueError(f"--modes {','.join(sorted(set(modes) - set(MODES)))}: choose from {', '.join(MODES)}")
    return bench_replicas(table_gb=args.table_gb, processes=args.processes, budget_gb=args.budget_gb, calls=args.calls,
                          workdir=Path(args.workdir) if args.workdir else None, modes=modes, table=args.table)  # fmt: skip


def _print_replicas(r: dict[str, Any]) -> None:
    print(f"{r['processes']} processes on one {r['table_gb']:.2f} GB table ({r['rows']:,} rows x {r['dim']} {r['dtype']}), "
          f"tiered budget {r['budget_gb']:.2f} GB each (private) or in all (shared); {r['calls']} calls a phase")  # fmt: skip
    print(f"  {'mode':<9}{'PSS GB':>8}{'table GB':>9}{'cold dec rows/s':>17}{'cold pre rows/s':>17}{'warm dec rows/s':>17}"
          f"{'warm pre rows/s':>17}{'p50 ms':>8}{'p99 ms':>8}{'newcomer hits':>15}")  # fmt: skip
    for mode, m in r["modes"].items():
        hits = f"{m['newcomer_hit_rate']:.1%}" if m.get("newcomer_hit_rate") is not None else "-"
        print(f"  {mode:<9}{m['total_pss_gb']:>8.2f}{m['table_pss_gb']:>9.2f}{m['cold_decode_rows_s']:>17,.0f}{m['cold_prefill_rows_s']:>17,.0f}"
              f"{m['warm_decode_rows_s']:>17,.0f}{m['warm_prefill_rows_s']:>17,.0f}{m['warm_decode_p50_ms']:>8.3f}"
              f"{m['warm_decode_p99_ms']:>8.3f}{hits:>15}")  # fmt: skip
    if "shared_vs_private" in r:
        print("shared / private: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["shared_vs_private"].items()))


def cmd_bench_formats(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.bench.formats import bench_formats

    return bench_formats(checkpoint=args.checkpoint, retrofit=args.retrofit, batches=args.batches,
                         budget_fraction=args.budget_fraction)  # fmt: skip


def _print_formats(r: dict[str, Any]) -> None:
    print(f"{r['model']}: {r['tables']} table(s), the first {r['table_rows']:,} rows x {r['dim']}; tiered budget "
          f"{r['budget_bytes'] / 2**20:,.1f} MiB ({r['budget_fraction']:.0%} of it in fp32)")  # fmt: skip
    print(f"  {'format':<7}{'bytes/row':>10}{'rows/GB':>13}{'hit rate':>10}{'loss +':>10}{'KL':>10}")
    for name, f in r["formats"].items():
        print(f"  {name:<7}{f['bytes_per_row']:>10}{f['rows_per_gb']:>13,}{f['hit_rate']:>10.1%}{f['loss_increase']:>+10.4f}"
              f"{f['kl']:>10.5f}")  # fmt: skip


def cmd_bench_real_table(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.bench.real_table import bench_real_table

    tiers = tuple(t.strip() for t in args.tiers.split(",") if t.strip())
    unknown = sorted(set(tiers) - {"mmap", "ssd", "ssd+cache", "tiered"})
    if unknown or not tiers:
        raise ValueError(f"--tiers {args.tiers!r}: choose among mmap, ssd, ssd+cache, tiered (comma-separated)")
    return bench_real_table(model=args.model, workdir=args.workdir, keep=args.keep, tiers=tiers,
                            progress=None if args.json else print)  # fmt: skip


def _print_real_table(r: dict[str, Any]) -> None:
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    made = "reused" if r["reused_file"] else f"written in {r['write_seconds']:.0f} s"
    print(f"{r['model']} n-gram table: {r['table_rows']:,} rows x {r['dim']} {r['dtype']} = {gb(r['table_bytes'])} "
          f"({made}) on a machine with {gb(r['mem_total_bytes'])} RAM; {r['rows_per_token']} rows per token")  # fmt: skip
    iops = r["reference_iops"]
    fio32 = iops["qd32_iops"]
    print(f"random 4 KiB reads of the file: {iops['qd1_iops']:,.0f}/s at depth 1, {fio32:,.0f}/s at depth 32 ({iops['tool']})")
    print(f"{'tier':<10}{'workload':<14}{'cold tok/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'rows/s':>10}{'x d32':>7}"
          f"{'warm tok/s':>12}{'p50 ms':>9}{'p99 ms':>9}")  # fmt: skip
    for tier, t in r["tiers"].items():
        for work, c in t["cold"].items():
            w = t["warm"][work]
            print(f"{tier:<10}{work:<14}{c['tok_s']:>11,.0f}{c['p50_ms']:>9.2f}{c['p99_ms']:>9.2f}{c['rows_s']:>10,.0f}"
                  f"{c['rows_s'] / fio32:>7.2f}{w['tok_s']:>12,.0f}{w['p50_ms']:>9.2f}{w['p99_ms']:>9.2f}")  # fmt: skip
    peak = r["peak_rss_bytes"]
    print(f"resident memory after serving: {gb(r['rss_bytes_after'])}" + (f", peak {gb(peak)}" if peak else ""))


def cmd_bench_train_throughput(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.bench.train_throughput import bench_train_throughput

    return bench_train_throughput(size=args.size, steps=args.steps, warmup=args.warmup, device=args.device)


def _print_train_throughput(r: dict[str, Any]) -> None:
    print(f"{r['size']} model: {r['params_active'] / 1e6:.1f}M active, {r['params_table'] / 1e6:.1f}M table params; "
          f"batch {r['batch']} x {r['seq']}, {r['dtype']} on {r['device']}, median of {r['steps']} steps")  # fmt: skip
    for memory in ("device", "ram"):
        m = r["placements"][memory]
        mfu = f", MFU {m['mfu']:.1%}" if m["mfu"] is not None else ""
        print(f"  tables on {memory:<6} {m['step_ms']:9.1f} ms/step  {m['tokens_per_s']:12,.0f} tok/s{mfu}")
    print(f"  host-RAM tables / device tables step time: {r['host_vs_device_step_ratio']:.3f}; "
          f"identical losses: {r['same_losses']}")


def cmd_bench_distributed(args: argparse.Namespace) -> dict[str, Any]:
    from engram_lm.bench.distributed import bench_distributed

    return bench_distributed(worlds=tuple(args.processes), steps=args.steps)


def _print_distributed(r: dict[str, Any]) -> None:
    print(f"row-sharded lookup + gradient exchange: table {r['rows']:,} x {r['dim']}, {r['ids_per_rank']:,} ids per rank per step")
    print(f"  unsharded (1 process)  {r['unsharded_step_ms']:8.2f} ms/step")
    for c in r["configs"]:
        print(f"  P = {c['processes']}                  {c['step_ms']:8.2f} ms/step   {c['bytes_sent_per_rank'] / 1e6:8.2f} MB sent to other ranks")
    print(f"  ({r['cpus']} CPUs: with more processes than CPUs the times include oversubscription)")


def cmd_bench_cache_curve(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from engram_lm.bench.cache_curve import cache_curve, plot_cache_curve
    from engram_lm.training.run import write_json

    result = cache_curve(corpus=args.data, table_size=args.table_size, warm_tokens=args.warm_tokens,
                         measure_tokens=args.measure_tokens)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cache_curve.json", result)
    plot_cache_curve(result, out / "cache_curve.png")
    return {**result, "out": str(out)}


def _print_cache_curve(r: dict[str, Any]) -> None:
    from engram_lm.bench.cache_curve import POLICIES

    print(f"{r['corpus']}: {r['table_rows']:,} table rows; warmed on {r['warm_accesses']:,} reads of the training split, "
          f"measured on {r['measured_accesses']:,} held-out reads ({r['distinct_rows_measured']:,} distinct rows)")  # fmt: skip
    print(f"{'share':>7}{'rows':>9}" + "".join(f"{p:>12}" for p in POLICIES))
    for row in r["rows"]:
        print(f"{row['share']:>7.3f}{row['capacity_rows']:>9,}" + "".join(f"{row[p]:>12.3f}" for p in POLICIES))
    print(f"an unbounded cache starting cold (repeats within the held-out reads): {r['unbounded_cold_hit_rate']:.3f}; written: {r['out']}")


def add_bench_commands(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("hashing", help="hashing throughput, torch vs NumPy, paper-demo layout")
    b.add_argument("--batch", type=int, default=64, help="sequences per call")
    b.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    b.add_argument("--repeats", type=int, default=3, help="timed calls (the best is reported)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_hashing, show=_print_hashing)
    b = bench.add_parser("train-scaling", help="train step time with small vs huge Engram tables")
    b.add_argument("--slots", type=int_list, default=[1 << 20, 64 << 20],
                   help="total table slots to compare, e.g. 1e6,64e6")  # fmt: skip
    b.add_argument("--steps", type=int, default=20, help="timed training steps per table size")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_train_scaling, show=_print_train_scaling)
    b = bench.add_parser("distributed", help="sharded-table exchange time and bytes for P processes on loopback")
    b.add_argument("--processes", type=int_list, default=[1, 2, 4], help="process counts P to time, e.g. 1,2,4")
    b.add_argument("--steps", type=int, default=10, help="timed exchanges per P")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_distributed, show=_print_distributed)
    b = bench.add_parser("cache-curve", help="hot-row cache hit rate vs cache size on held-out text (LRU, W-TinyLFU, ours)")
    b.add_argument("--data", default="bible", help="built-in corpus or a path: its held-out text is read")
    b.add_argument("--table-size", type=int, default=20_480, help="base rows per order and head")
    b.add_argument("--warm-tokens", type=int, default=100_000, help="tokens read before the hit rate is counted")
    b.add_argument("--measure-tokens", type=int, default=50_000, help="tokens over which the hit rate is counted")
    b.add_argument("--out", default="runs/cache-curve", help="folder for the curve's CSV and figure")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_cache_curve, show=_print_cache_curve)
    b = bench.add_parser("train-throughput", help="training tok/s and MFU, tables on the device vs in host RAM")
    b.add_argument("--size", default="gpu", choices=("gpu", "cpu"), help="model size: gpu (hundreds of M parameters) or cpu")
    b.add_argument("--steps", type=int, default=10, help="timed training steps per placement")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    b.add_argument("--device", default="cuda", help="compute device")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_train_throughput, show=_print_train_throughput)
    _add_table_benches(bench)
    _add_model_benches(bench)


def _add_table_benches(bench) -> None:
    """The benchmarks of where a table lives: its tiers, formats, processes and what it costs a model."""
    b = bench.add_parser("big-table", help="generate with an Engram table file larger than RAM; report RSS and tok/s")
    b.add_argument("--table-gb", type=float, default=32.0, help="size of the table file written (GB)")
    b.add_argument("--workdir", default=".", help="folder for the temporary table file (needs table-gb + 1 GB free)")
    b.add_argument("--tier", default="ssd", choices=("ssd", "mmap"), help="the tier that serves the file")
    b.add_argument("--repeats", type=int, default=3, help="timed generations (median)")
    b.add_argument("--keep", action="store_true", help="keep the table file")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_big_table, show=_print_big_table)
    b = bench.add_parser("real-table", help="a released model's n-gram table at its real size (larger than RAM): "
                                            "lookup tok/s and latency per tier, cold and warm")  # fmt: skip
    b.add_argument("--model", default="qwen3.8", choices=("qwen3.8", "v4.1"),
                   help="v4.1: layer 1's table (264-byte rows), as many rows as the disk holds, 48 rows a token")
    b.add_argument("--workdir", default=".", help="folder for the table file (qwen3.8: 52.8 GB + 1 GB free)")
    b.add_argument("--tiers", default="mmap,ssd,ssd+cache,tiered", help="comma-separated tiers to time")
    b.add_argument("--keep", action="store_true", help="keep the table file (a later run reuses it)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_real_table, show=_print_real_table)
    b = bench.add_parser("formats", help="per row format: bytes per row, rows per GB, the tiered tier's hit rate at a "
                                         "fixed budget, and quality (loss, KL) on a trained model's own tables")  # fmt: skip
    b.add_argument("--checkpoint", help="an engram-lm run or checkpoint folder")
    b.add_argument("--retrofit", help="an `engram retrofit` run folder (its adapter on its base model)")
    b.add_argument("--batches", type=int, default=8, help="held-out batches for the quality and the hit rate")
    b.add_argument("--budget-fraction", type=float, default=0.1, help="the tiered budget, as a share of the fp32 table")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_formats, show=_print_formats)
    b = bench.add_parser("replicas", help="N processes serving one table: private tiered stores vs one shared store vs "
                                          "mmap (total PSS, cold and warm rows/s, decode p50/p99, a newcomer's hit rate)")  # fmt: skip
    b.add_argument("--table-gb", type=float, default=1.0, help="size of the table file (fp32 rows of 64)")
    b.add_argument("--table", default="random", choices=("random", "qwen3.8"),
                   help="qwen3.8: Qwen3.8-Flash-Next's n-gram table at its real size (52.8 GB, kept in --workdir)")
    b.add_argument("--processes", type=int, default=4, help="processes serving the table at once")
    b.add_argument("--budget-gb", type=float, default=0.25, help="the tiered tier's row budget (each private store's, "
                                                                 "or the one shared store's)")
    b.add_argument("--calls", type=int, default=200, help="decode-sized (16 rows) and prefill-sized (4,096) calls a phase")
    b.add_argument("--modes", default="private,shared,mmap", help="comma-separated: private, shared, mmap")
    b.add_argument("--workdir", help="folder for the table file (default: the system's temporary folder)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_replicas, show=_print_replicas)


def _add_model_benches(bench) -> None:
    """A model with its table on every tier: tokens/s and the penalty against the same model without Engram."""
    b = bench.add_parser("penalty", help="a real-sized model's tokens/s with its Engram table on each tier (+prefetch), "
                                         "warm and cold, against the same model without Engram (the paper's Table 4 claim)")  # fmt: skip
    b.add_argument("--shape", default="quickstart", choices=("quickstart", "paper-4b", "paper-8b", "gemma4-e2b", "qwen3.8-slice"),
                   help="the model (bench/shapes.py and bench/hf_shapes.py say where each number comes from; gemma4-e2b: "
                        "transformers' Gemma 4 class at E2B's released shape, its per-layer table served by the tiers; qwen3.8-slice: "
                        "qwen4_exp at Qwen3.8-Flash-Next's width with its full 52.8 GB n-gram table, 4 layers, 16 experts; "
                        "its table file is kept in --workdir and reused, as `bench real-table --keep` leaves it)")  # fmt: skip
    b.add_argument("--table-gb", type=float, default=1.0,
                   help="size of the Engram table file (fp32 rows); a released shape serves its own table instead")  # fmt: skip
    b.add_argument("--tiers", default="device,ram,tiered,mmap,ssd", help="comma-separated tiers (device: CUDA only)")
    b.add_argument("--turns", type=int, default=5, help="alternating warm turns per configuration (one more untimed)")
    b.add_argument("--prefill", type=int_list, help="prefill lengths (default: 1024,4096 on CUDA, 128 on a CPU)")
    b.add_argument("--decode", type=int_list, help="decode batch sizes (default: 1,8,32 on CUDA, 1 on a CPU)")
    b.add_argument("--new-tokens", type=int, help="tokens decoded per decode workload (default: 64 on CUDA, 16 on a CPU)")
    b.add_argument("--offline", metavar="SEQ,LOW,HIGH,WAVE",
                   help="also the paper's offline batch: SEQ requests of Uniform(LOW, HIGH) prompt and output tokens, "
                        "served in waves of WAVE (paper: 512,100,1024; e.g. 512,100,1024,32 on a GPU, 8,16,64,4 on a CPU); "
                        "throughput in output tokens/s")  # fmt: skip
    b.add_argument("--no-cold", action="store_true", help="skip the cold pass (one configuration at a time, pages dropped)")
    b.add_argument("--workdir", help="folder for the table file (default: the system's temporary folder)")
    b.add_argument("--device", default="cpu", help="compute device (cuda: the table also in GPU memory, pinned RAM)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_penalty, show=_print_penalty)
    b = bench.add_parser("offload", help="prefill/decode throughput with the table on every tier (ram, mmap, ssd, tiered; "
                                         "+prefetch, +cache), warm and cold, beside the backbone without Engram")  # fmt: skip
    b.add_argument("--table-gb", type=float, default=4.0, help="size of the table file written (GB)")
    b.add_argument("--cache-rows", type=int, default=1 << 18, help="rows of the hot-row cache in the _cache configurations")
    b.add_argument("--workdir", help="folder for the temporary table file (needs table-gb + 1 GB free; default: the "
                                     "system's temporary folder, often RAM-backed /tmp: give a disk folder to time a disk)")
    b.add_argument("--repeats", type=int, default=25, help="timed warm passes per config (median), after 6 untimed ones")
    b.add_argument("--device", default="cpu", help="compute device (cuda: pinned host RAM, side-stream prefetch)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=cmd_bench_offload, show=_print_offload)
