"""`engram bench penalty --shape gemma4-e2b`: the penalty of a released `transformers` model's table.

The model is built from `transformers`' own class at the shape's released configuration, with
random weights in the released dtype, its table never in memory: the class is built with a
one-row per-layer table, which is then replaced by engram-lm's `TierEmbedding` over the shape's
full row count (bench/hf_shapes.py), reading a file of random rows through each tier, exactly as
`offload_tables` serves a loaded model's table (its scale, and with `+prefetch` its forward
pre-hook, which requests the rows as soon as a forward's ids are known). The timing loop, the
workloads and the penalty are bench/penalty.py's; "none" is the same model with its per-layer
path switched off. The table is read at the model's input, before block 0, so prefetch has no
compute to overlap: the layer's measured wait per call is reported beside every tier
(`waited_ms_per_call`), cold and warm.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_lm.bench.hf_shapes import HFShape
from engram_lm.bench.penalty import _cold, _peak_rss, _sync, _warm, tier_names, workloads
from engram_lm.memory.codec import decode_rows, encode_rows, row_bytes


def build_hf_model(shape: HFShape):
    """(the model with random weights in the shape's dtype, the per-layer holder, the table's scale);
    the per-layer table is built with one row and never filled in."""
    config = shape.config(vocab_size_per_layer_input=1)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(shape.dtype)
    try:
        model = shape.model_class()(config).eval()
    finally:
        torch.set_default_dtype(previous)
    config.vocab_size_per_layer_input = shape.table_shape[0]  # the released value, for whoever reads the config
    holder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    scale = getattr(holder.embed_tokens_per_layer, "embed_scale", None)
    return model, holder, None if scale is None else scale.detach().clone()


def hf_params(shape: HFShape) -> int:
    """Parameters without the per-layer table (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        model = shape.model_class()(shape.config(vocab_size_per_layer_input=1))
    return sum(p.numel() for p in model.parameters()) - shape.table_shape[1]


def write_rows(path: Path, rows: int, dim: int, dtype: str, chunk: int = 1 << 16) -> None:
    """Random rows encoded as `dtype`, chunk by chunk (the table is never in memory whole)."""
    g = torch.Generator().manual_seed(1)
    with path.open("wb") as f:
        for start in range(0, rows, chunk):
            f.write(encode_rows(torch.randn(min(chunk, rows - start), dim, generator=g) * 0.02, dtype).tobytes())


class HFRunner:
    """How the timing loop drives a `transformers` model whose per-layer table a tier serves."""

    def __init__(self, model, holder, scale, shape: HFShape, path: Path, device: torch.device) -> None:
        self.model, self.holder, self.scale, self.shape, self.path, self.device = model, holder, scale, shape, path, device
        self.rows, self.dim = shape.table_shape
        self.width = shape.kwargs["hidden_size_per_layer_input"]
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.hook = None

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
        """The tier's table as the per-layer embedding, or (None) the model with its per-layer path off."""
        from engram_lm.hf.offload import ServedTable, install_prefetch

        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        width = 0 if embedding is None else self.width
        for module in (self.holder, *self.holder.layers):
            module.hidden_size_per_layer_input = width
        if embedding is None:
            return
        self.holder.embed_tokens_per_layer = embedding
        if embedding.table.placement().get("prefetch"):
            rows = self.rows
            served = ServedTable(self.holder, "embed_tokens_per_layer", "bench", lambda ids, _: torch.where(ids < rows, ids, 0))
            self.hook = install_prefetch(self.model, [served])

    def time(self, work, ids: torch.Tensor) -> dict[str, Any]:
        """Seconds for the workload (and each decode step's), on `ids` of shape (B, T)."""
        import time

        device, model = self.device, self.model
        with torch.no_grad():
            if work.kind == "prefill":
                _sync(device)
                t0 = time.perf_counter()
                model(input_ids=ids[:1, : work.size].to(device), use_cache=False)
                _sync(device)
                return {"seconds": time.perf_counter() - t0, "tokens": work.size}
            out = model(input_ids=ids[: work.size, :16].to(device), use_cache=True)
            cache, steps = _cache_of(out), []
            for _ in range(work.new_tokens):
                _sync(device)
                t0 = time.perf_counter()
                out = model(input_ids=out.logits[:, -1].argmax(-1, keepdim=True), use_cache=True, **{self.cache_kw: cache})
                _sync(device)
                steps.append(time.perf_counter() - t0)
                cache = _cache_of(out)
            return {"seconds": sum(steps), "tokens": work.size * work.new_tokens, "steps": steps}

    def placement(self, embedding) -> dict[str, Any]:
        out = {k: v for k, v in embedding.table.placement().items() if isinstance(v, (int, float, str))}
        return out | embedding.stats()

    def close(self, embedding) -> None:
        embedding.table.close()


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
                     new_tokens: int | None = None, cold: bool = True) -> dict[str, Any]:  # fmt: skip
    """Every tier x prefetch against the model without its table, warm (alternating turns) and cold."""
    from engram_lm.bench.penalty import CPU_WORKLOADS, GPU_WORKLOADS, check_fits_bytes

    device = torch.device(device)
    defaults = GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    works = workloads(prefill or defaults["prefill"], decode or defaults["decode"], new_tokens or defaults["new_tokens"])
    rows, dim = shape.table_shape
    table_bytes = rows * row_bytes(shape.table_dtype, dim)
    params = hf_params(shape)
    workdir = Path(workdir or tempfile.gettempdir())
    dtype_bytes = torch.empty(0, dtype=shape.dtype).element_size()
    in_memory = rows * dim * dtype_bytes if {"ram", "device"} & set(tiers) else 0
    check_fits_bytes(shape.name, params, dtype_bytes, in_memory, table_bytes, workdir)
    model, holder, scale = build_hf_model(shape)
    model.to(device)
    longest = max([w.size for w in works if w.kind == "prefill"] + [16])
    batch = max([w.size for w in works if w.kind == "decode"] + [1])
    ids = torch.randint(0, shape.kwargs["vocab_size"], (batch, longest), generator=torch.Generator().manual_seed(2))
    names = tier_names(device, tiers)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "table.bin"
        write_rows(path, rows, dim, shape.table_dtype)
        runner = HFRunner(model, holder, scale, shape, path, device)
        warm = _warm(runner, works, ids, names, turns)
        cold_results = _cold(runner, works, ids, names, warm["none"]) if cold else {}
    return {"shape": shape.name, "source": shape.source, "chosen": shape.chosen, "params": params,
            "table_rows": rows, "table_dim": dim, "table_dtype": shape.table_dtype, "table_bytes": table_bytes,
            "weights_dtype": str(shape.dtype).removeprefix("torch."), "device": str(device),
            "torch_threads": torch.get_num_threads(), "turns": turns, "workloads": [w.name for w in works],
            "new_tokens": works[-1].new_tokens, "scaled_for_cpu": device.type != "cuda", "warm": warm,
            "cold": cold_results, "peak_rss_gb": _peak_rss() / 1e9}  # fmt: skip
