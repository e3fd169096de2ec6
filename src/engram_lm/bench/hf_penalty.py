"""`engram bench penalty --shape gemma4-e2b | qwen3.8-slice`: the penalty of a released model's table,
in `transformers`' own class.

The model is built from the shape's class at its configuration (bench/hf_shapes.py), random
weights in the released dtype, its table a placeholder on the meta device (never held): the
class is built with exactly that `nn.Embedding` made on meta. The table is then served as
`offload_tables` serves a loaded model's (hf/offload.py: the same `ServedTable` found, the same
`TierEmbedding` with Gemma's scale, with `+prefetch` the same forward pre-hook requesting the
rows - qwen4_exp's hashed by the official layout - as soon as a forward's ids are known), reading
a file of random rows through each tier. The timing loop, workloads and penalty are
bench/penalty.py's; "none" is the same model with its table's path switched off (Gemma: its
own per-layer test; qwen4_exp: the PLE module off its layer). Both tables are read at the start
of the forward (Gemma's at the input, qwen4_exp's at block 2 after one linear-attention block),
so prefetch has little or no compute to overlap: the table layer's measured wait per call is
reported beside every tier (`waited_ms_per_call`), cold and warm.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engram_lm.bench.hf_shapes import HFShape
from engram_lm.bench.penalty import (CPU_WORKLOADS, GPU_WORKLOADS, _cold, _peak_rss, _warm, check_fits_bytes, tier_names,
                                     timed, workload_ids, workloads)
from engram_lm.memory.codec import decode_rows, encode_rows, row_bytes


@contextlib.contextmanager
def _table_on_meta(rows: int, dim: int):
    """Inside the block, an `nn.Embedding` of exactly (rows, dim) is created on the meta device: the
    table is served from a file, never held; every other weight and buffer is real."""
    original = nn.Embedding.__init__

    def init(self, num_embeddings, embedding_dim, *args, **kwargs):
        if (num_embeddings, embedding_dim) == (rows, dim):
            kwargs["device"] = "meta"
        original(self, num_embeddings, embedding_dim, *args, **kwargs)

    nn.Embedding.__init__ = init
    try:
        yield
    finally:
        nn.Embedding.__init__ = original


def build_hf_model(shape: HFShape):
    """The model with random weights in the shape's dtype; its table a placeholder on the meta device."""
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(shape.dtype)
    try:
        with _table_on_meta(*shape.table_shape):
            model = shape.model_class()(shape.config()).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def hf_params(shape: HFShape) -> int:
    """Parameters besides the table (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        model = shape.model_class()(shape.config())
    rows, dim = shape.table_shape
    return sum(p.numel() for p in model.parameters()) - rows * dim


def write_rows(path: Path, rows: int, dim: int, dtype: str, chunk: int = 1 << 16) -> None:
    """Random rows encoded as `dtype`, chunk by chunk (the table is never in memory whole)."""
    g = torch.Generator().manual_seed(1)
    with path.open("wb") as f:
        for start in range(0, rows, chunk):
            f.write(encode_rows(torch.randn(min(chunk, rows - start), dim, generator=g) * 0.02, dtype).tobytes())


class HFRunner:
    """How the timing loop drives a `transformers` model whose table a tier serves: the shape's table
    module found and swapped for `TierEmbedding`, the model's table path switched on and off."""

    def __init__(self, model, shape: HFShape, path: Path, device: torch.device) -> None:
        self.model, self.shape, self.path, self.device = model, shape, path, device
        self.rows, self.dim = shape.table_shape
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.hook = None
        self.served = served_table(model, shape)
        self.scale = self.served.scale
        self.switch = _switch(model, shape, self.served)
        setattr(self.served.holder, self.served.attr, nn.Module())  # the meta placeholder out, so the model moves
        model.to(device)

    def make_table(self, name: str):
        from engram_lm.hf.offload import TierEmbedding

        tier = name.removesuffix("+prefetch")
        if tier == "ram":
            from engram_lm.memory.host import HostTable

            table = HostTable(rows_in_memory(self.path, self.rows, self.dim, self.shape.table_dtype, self.shape.dtype),
                              device=self.device)  # fmt: skip
        elif tier == "device":  # CUDA only (tier_names): a plain gather from GPU memory
            from engram_lm.memory.dense import DenseTable

            with torch.device("meta"):
                table = DenseTable(self.rows, self.dim)
            weight = rows_in_memory(self.path, self.rows, self.dim, self.shape.table_dtype, self.shape.dtype)
            table.weight = torch.nn.Parameter(weight.to(self.device), requires_grad=False)
        else:
            from engram_lm.bench.offload import file_table

            table = file_table(tier, self.path, self.rows, self.dim, self.shape.table_dtype, self.device)
        if name.endswith("+prefetch"):
            from engram_lm.memory.prefetch import PrefetchingTable

            table = PrefetchingTable(table, device=self.device, policy="always")
        return TierEmbedding(table, self.rows, self.dim, self.shape.dtype, scale=self.scale)

    def install(self, embedding) -> None:
        """The tier's table as the model's table, or (None) the model with its table's path off."""
        from engram_lm.hf.offload import install_prefetch

        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.switch(embedding is not None)
        if embedding is None:
            return
        setattr(self.served.holder, self.served.attr, embedding)
        if embedding.table.placement().get("prefetch"):
            self.hook = install_prefetch(self.model, [self.served])

    def time(self, work, ids: torch.Tensor) -> dict[str, Any]:
        """Seconds for the workload (and each decode step's), on `ids` of shape (B, T); the cache lives in
        a one-item list, replaced by each forward's."""
        model = self.model

        def start(prompt, _total):
            out = model(input_ids=prompt, use_cache=True)
            return out.logits[:, -1].argmax(-1, keepdim=True), [_cache_of(out)]

        def step(nxt, state):
            out = model(input_ids=nxt, use_cache=True, **{self.cache_kw: state[0]})
            state[0] = _cache_of(out)
            return out.logits[:, -1].argmax(-1, keepdim=True)

        return timed(work, ids, self.device, lambda x: model(input_ids=x, use_cache=False), start, step)

    def placement(self, embedding) -> dict[str, Any]:
        out = {k: v for k, v in embedding.table.placement().items() if isinstance(v, (int, float, str))}
        return out | embedding.stats()

    def close(self, embedding) -> None:
        embedding.table.close()


def served_table(model, shape: HFShape):
    """The shape's table as `offload_tables` finds it (hf/offload.py's ServedTable: the holder, the
    rows a forward's ids ask for, the scale), its placeholder still on the meta device."""
    from engram_lm.hf.offload import served_tables

    tables = list(served_tables(model).values())
    if len(tables) != 1:
        raise AssertionError(f"{shape.name}: expected one served table, found {len(tables)}")
    return tables[0]


def _switch(model, shape: HFShape, served):
    """A function turning the table's path on or off: Gemma's own per-layer test (its width 0 skips
    the table, the projection and the gates); qwen4_exp's PLE module on its decoder layer, or None."""
    if shape.table == "per-layer":
        width = shape.kwargs["hidden_size_per_layer_input"]
        holder = served.holder

        def switch(on: bool) -> None:
            for module in (holder, *holder.layers):
                module.hidden_size_per_layer_input = width if on else 0

        return switch
    layer = next(m for m in model.modules() if getattr(m, "ple", None) is not None and served.holder in m.ple.modules())
    ple = layer.ple

    def switch(on: bool) -> None:
        layer.ple = ple if on else None

    return switch


def _write_table(path: Path, rows: int, dim: int, dtype: str) -> None:
    """fp8 tables of a billion rows: `bench real-table`'s writer (one random block repeated: minutes, not
    hours); anything else random rows chunk by chunk."""
    if dtype == "fp8" and rows > 1 << 24:
        from engram_lm.bench.real_table import write_random_fp8_table

        write_random_fp8_table(path, rows, dim)
    else:
        write_rows(path, rows, dim, dtype)


def rows_in_memory(path: Path, rows: int, dim: int, table_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    """The whole file as a (rows, dim) tensor of `dtype`; bf16 rows read as they lie (no fp32 copy)."""
    if table_dtype == "bf16":
        return torch.from_numpy(np.fromfile(path, dtype=np.int16)).view(torch.bfloat16).view(rows, dim).to(dtype)
    raw = np.fromfile(path, dtype=np.uint8).reshape(rows, -1)
    return decode_rows(raw, table_dtype, dim).to(dtype)


def _cache_of(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def bench_hf_penalty(shape: HFShape, *, workdir: Path | None = None, device: str = "cpu", turns: int = 5,
                     tiers: tuple[str, ...] = ("device", "ram", "tiered", "mmap", "ssd"), prefill=None, decode=None,
                     new_tokens: int | None = None, cold: bool = True,
                     offline: tuple[int, int, int, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every tier x prefetch against the model without its table, warm (alternating turns) and cold."""
    device = torch.device(device)
    defaults = GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    works = workloads(prefill or defaults["prefill"], decode or defaults["decode"], new_tokens or defaults["new_tokens"], offline)
    rows, dim = shape.table_shape
    table_bytes = rows * row_bytes(shape.table_dtype, dim)
    params = hf_params(shape)
    workdir = Path(workdir or tempfile.gettempdir())
    dtype_bytes = torch.empty(0, dtype=shape.dtype).element_size()
    in_memory = rows * dim * dtype_bytes if {"ram", "device"} & set(tiers) else 0
    named = workdir / shape.table_file if shape.table_file else None
    reused = named is not None and named.is_file() and named.stat().st_size == table_bytes
    check_fits_bytes(shape.name, params, dtype_bytes, in_memory, 0 if reused else table_bytes, workdir,
                     fix="--tiers without ram and device (the released table, served from its file), or a larger machine")  # fmt: skip
    model = build_hf_model(shape)
    ids = workload_ids(works, shape.kwargs["vocab_size"])
    names = tier_names(device, tiers)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = named or Path(tmp) / "table.bin"  # a named file is kept for the next run (and `bench real-table`)
        if not reused:
            _write_table(path, rows, dim, shape.table_dtype)
        runner = HFRunner(model, shape, path, device)
        warm = _warm(runner, works, ids, names, turns)
        cold_results = _cold(runner, works, ids, names, warm["none"]) if cold else {}
    return {"shape": shape.name, "source": shape.source, "chosen": shape.chosen, "params": params,
            "table_rows": rows, "table_dim": dim, "table_dtype": shape.table_dtype, "table_bytes": table_bytes,
            "weights_dtype": str(shape.dtype).removeprefix("torch."), "device": str(device),
            "torch_threads": torch.get_num_threads(), "turns": turns, "workloads": [w.name for w in works],
            "new_tokens": max(w.new_tokens for w in works), "scaled_for_cpu": device.type != "cuda", "warm": warm,
            "cold": cold_results, "peak_rss_gb": _peak_rss() / 1e9, "table_file": str(named) if named else None,
            "table_file_reused": reused}  # fmt: skip
