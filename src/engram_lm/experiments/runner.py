"""Planned training runs, run once each: the resumable core of every experiment.

A `RunSpec` names one training run (folder key, model, training config, tags such as
method, rho and seed). `run_specs` trains the specs whose folder has no `result.json`
yet (an interrupted run resumes from its newest checkpoint), then writes `result.json`:
the tags, parameter counts, final and per-evaluation validation losses, tokens, epochs of
the training split and throughput. Several workers (processes running the same plan on the
same root) share the work: a run folder another worker holds is skipped. Finished results are reused, so a killed study goes on
where it stopped, and the small result files can be committed without the checkpoints.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from engram_lm.models.config import ModelConfig
from engram_lm.training.config import TrainConfig
from engram_lm.training.run import RunFolderBusy, read_request, write_json

CADENCE_KEYS = ("save_every", "save_minutes")  # when checkpoints are written; results do not depend on it
DEFAULT_TOKENS_PER_S = 6000.0  # quickstart-size model, 2 CPU cores, one residual branch


@dataclass(frozen=True)
class RunSpec:
    key: str  # folder under the experiment root, e.g. "duration/gutenberg/engram/seed-0"
    model: ModelConfig
    train: TrainConfig
    tags: dict[str, Any] = field(default_factory=dict)
    keep_checkpoint: bool = False  # an analysis reads the trained model: keep it, and never reuse a twin's result

    @property
    def tokens(self) -> int:
        t = self.train
        return t.steps * t.tokens_per_step

    def requested(self) -> dict[str, Any]:
        return json.loads(json.dumps({"model": self.model.to_dict(), "train": self.train.to_dict()}))


def load_result(root: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The finished run's result, or None; a result from a different config is refused."""
    path = Path(root) / spec.key / "result.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it to rerun that run") from None
    if not _same_request(result.get("requested"), spec.requested()):
        raise ValueError(
            f"{path} was produced by a different configuration than the planned run {spec.key!r}; "
            "move that folder away (or pass another --out) to rerun it"
        )
    return result


RESULT_KEYS = ("seed", "val_loss")  # what every section reads


def read_result(path: Path) -> dict[str, Any]:
    """A finished run's result.json, or a one-line error naming the file and the fix."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); delete it to retrain that run, or restore it") from None
    missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise ValueError(f"{path} is not a result of engram study (no {', '.join(missing)}); move it out of the runs folder")
    return result


def _same_request(saved: dict[str, Any] | None, planned: dict[str, Any]) -> bool:
    """Equal configs; a data path counts by its last component (folders move between machines)."""
    if saved is None:
        return False

    return _request_key(saved) == _request_key(planned)


def _request_key(requested: dict[str, Any]) -> str:
    """What decides a run's result: the configs (fields added later take their defaults),
    less checkpoint cadence; data by folder name."""
    read = read_request(requested)
    train = {k: v for k, v in read["train"].items() if k not in CADENCE_KEYS}
    return json.dumps({"model": read["model"], "train": {**train, "data": data_key(train["data"])}}, sort_keys=True)


def data_key(data: str) -> str:
    """A corpus by its folder or file name (folders move between machines); a slice keeps its size:
    first:1000000:../shared/data/gutenberg-novels -> first:1000000:gutenberg-novels."""
    if data.startswith("first:"):
        head, count, inner = (data.split(":", 2) + ["", ""])[:3]
        return f"{head}:{count}:{Path(inner).name}"
    return Path(data).name


def estimate_seconds(specs: list[RunSpec], finished: list[dict[str, Any]]) -> tuple[float, str]:
    """Seconds to train `specs`, from the throughput of finished runs (per branch count)."""
    by_branches: dict[int, list[float]] = {}
    for r in finished:
        by_branches.setdefault(r["num_branches"], []).append(r["tokens_per_s"])
    total = 0.0
    for s in specs:
        rates = by_branches.get(s.model.num_branches)
        rate = statistics.median(rates) if rates else DEFAULT_TOKENS_PER_S / s.model.num_branches
        total += s.tokens / rate
    basis = f"measured on {len(finished)} finished runs" if finished else f"assumed {DEFAULT_TOKENS_PER_S:,.0f} tok/s"
    return total, basis


def run_specs(
    root: Path,
    specs: list[RunSpec],
    *,
    device: str | None = None,
    progress: bool = True,
    keep_checkpoints: bool = False,
    dry_run: bool = False,
    analyse: Callable[[RunSpec, Path], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train what is not finished (in order); return the results of all finished specs.
    `analyse(spec, run_dir)` runs on the kept checkpoint of every `keep_checkpoint` spec once
    it has trained (or, found finished without it, before training starts); what it returns
    is stored as the result's "analysis"."""
    root = Path(root)
    # a checkpoint at every evaluation: a killed study loses at most one interval of a run
    specs = [replace(s, train=s.train.with_(save_every=s.train.eval_every)) for s in specs]
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ValueError("two planned runs share a folder; give each RunSpec its own key")
    finished = {s.key: r for s in specs if (r := load_result(root, s)) is not None}
    by_request = _all_results(root)  # any finished run under root, also of sections not planned now
    by_request.update({_request_key(r["requested"]): r for r in finished.values()})
    todo = [s for s in specs if s.key not in finished]
    _say_plan(specs, finished, todo, by_request)
    if dry_run:
        return list(finished.values())
    for spec in specs:
        if spec.key in finished:
            finished[spec.key] = _analysed(root, spec, finished[spec.key], analyse)
    started = time.time()
    for i, spec in enumerate(todo):
        twin = None if spec.keep_checkpoint else by_request.get(_request_key(spec.requested()))
        if twin is not None:  # the same training already ran under another name: reuse it
            finished[spec.key] = _reuse(root, spec, twin)
            continue
        if load_result(root, spec) is not None:  # another worker finished it meanwhile
            finished[spec.key] = load_result(root, spec)
            continue
        _say(f"[{i + 1}/{len(todo)}] {spec.key} ({spec.train.steps} steps, {spec.tokens:,} tokens); "
             f"elapsed {hms(time.time() - started)}")  # fmt: skip
        record = _train_run(root, spec, device, progress)
        if record is None:
            continue
        record = _analysed(root, spec, record, analyse)
        if not (keep_checkpoints or spec.keep_checkpoint):
            shutil.rmtree(root / spec.key / "checkpoints", ignore_errors=True)
        finished[spec.key] = by_request[_request_key(record["requested"])] = record
    return [finished[s.key] for s in specs if s.key in finished]


def _say_plan(specs: list[RunSpec], finished: dict[str, dict[str, Any]], todo: list[RunSpec],
              by_request: dict[str, dict[str, Any]]) -> None:  # fmt: skip
    """One line: how many runs are planned, finished, to train (twins train once) and how long it takes."""
    unique = {_request_key(s.requested()): s for s in reversed(todo) if not s.keep_checkpoint}  # twins train once
    to_train = [s for k, s in unique.items() if k not in by_request] + [s for s in todo if s.keep_checkpoint]
    # throughput from every finished run under root (a subset of sections may have none of its own yet)
    measured = [r for r in by_request.values() if "tokens_per_s" in r and "num_branches" in r]
    seconds, basis = estimate_seconds(to_train, measured)
    twins = len(todo) - len(to_train)  # identical requests that train once, or ran already under another name
    reused = f" ({twins} of them reuse an identical run)" if twins else ""
    _say(f"{len(specs)} runs planned: {len(finished)} finished, {len(todo)} to train{reused}, "
         f"~{hms(seconds)} estimated ({basis})")  # fmt: skip


def _reuse(root: Path, spec: RunSpec, twin: dict[str, Any]) -> dict[str, Any]:
    """The twin's result recorded under this spec's folder and tags."""
    record = {**twin, **spec.tags, "reused_from": twin.get("reused_from", twin["key"])}
    record["key"] = spec.key
    (root / spec.key).mkdir(parents=True, exist_ok=True)
    write_json(root / spec.key / "result.json", record)
    return record


def _train_run(root: Path, spec: RunSpec, device: str | None, progress: bool) -> dict[str, Any] | None:
    """Train one run and write its result.json; None when another worker holds its folder."""
    from engram_lm.training.data import prepare_data
    from engram_lm.training.loop import train

    t0 = time.time()
    try:
        result = train(spec.model, spec.train, root / spec.key, name=spec.key, device=device, progress=progress)
    except RunFolderBusy:  # another `engram study` on the same --out trains it: take the next run
        _say(f"  {spec.key}: another worker is training it; moving on")
        return None
    train_tokens = len(prepare_data(spec.train.data, spec.train.tokenizer).train)
    record = {**spec.tags, **result.counts, "num_branches": spec.model.num_branches, "val_loss": result.val_loss,
              "val_curve": _val_curve(root / spec.key), "tokens_seen": result.tokens_seen,
              "train_tokens": train_tokens, "epochs": result.tokens_seen / max(train_tokens, 1),
              "tokens_per_s": result.tokens_per_s, "wall_s": round(time.time() - t0, 1),
              "data": spec.train.data, "key": spec.key, "requested": spec.requested()}  # fmt: skip
    write_json(root / spec.key / "result.json", record)
    return record


def _analysed(root: Path, spec: RunSpec, record: dict[str, Any],
              analyse: Callable[[RunSpec, Path], dict[str, Any]] | None) -> dict[str, Any]:  # fmt: skip
    """The record with its analysis, computed and saved now if it lacks one and can have one."""
    if analyse is None or not spec.keep_checkpoint or "analysis" in record or not (root / spec.key / "checkpoints").is_dir():
        return record
    record = {**record, "analysis": analyse(spec, root / spec.key)}
    write_json(root / spec.key / "result.json", record)
    return record


def sweep(out_dir: Path, specs: list[RunSpec], write, *, progress: bool = True, device: str | None = None) -> list[dict[str, Any]]:
    """Run an experiment's specs under out_dir, then write its outputs with `write(results, out_dir)`."""
    results = run_specs(Path(out_dir), specs, progress=progress, device=device)
    write(results, Path(out_dir))
    return results


def write_csv(path: Path, rows: list[dict[str, Any]], fields) -> None:
    """One row per run (or milestone), only the named columns, in that order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _all_results(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(Path(root).glob("**/result.json")):
        try:
            record = json.loads(path.read_text())
            out.setdefault(_request_key(record["requested"]), record)
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            continue  # a foreign or damaged file: load_result reports it when it is planned
    return out


def _val_curve(run_dir: Path) -> list[list[float]]:
    """[[step, val_loss], ...] from the run's metrics.jsonl."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "val_loss" in record:
            curve.append([record["step"], record["val_loss"]])
    return curve


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
