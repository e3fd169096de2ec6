"""Frozen, validated configurations of the memory modules: Engram (hashing + fusion) and
the OverEncoding baseline (its module lives in models/overencoding.py). No torch here.

Field names follow the paper; the reference demo's names are given in comments and
accepted by `EngramConfig.from_reference_dict` (see `compat/reference.py`).
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any


MAX_TABLE_SIZE = 2**40


@dataclass(frozen=True, slots=True, kw_only=True)
class EngramConfig:
    # --- hashing (ENGRAM_SPEC section 3) ---
    tokenizer: str = "deepseek-v3"  # built-in name, a tokenizer.json path, or "identity:V"
    compress_tokens: bool = True  # ablation: False hashes raw ids (identity projection)
    table_sizes: tuple[int, ...] = (646400, 646400)  # engram_vocab_size, one per order 2..N
    max_ngram: int = 3  # max_ngram_size (N)
    num_heads: int = 8  # n_head_per_ngram (K), per order
    layer_ids: tuple[int, ...] = (1, 15)  # 0-based block indices
    pad_id: int = 2  # raw pad id, mapped through the compression
    seed: int = 0
    # --- fusion (ENGRAM_SPEC section 4 / 8) ---
    embed_per_ngram: int = 512  # n_embed_per_ngram; head dim = embed_per_ngram / num_heads
    hidden_size: int = 1024
    num_branches: int = 1  # hc_mult (M); 1 = plain residual stream
    # multi-branch fusion (paper): M key projections, gates and conv norms, one per branch. False
    # (ablation): one of each, reading the mean of the branches, the same output added to every branch
    branch_fusion: bool = True
    kernel_size: int = 4
    use_short_conv: bool = True  # the V4.1 layout has no conv
    use_gating: bool = True  # ablation switch: alpha = 1 when False
    projection_bias: bool = True  # reference: Linear with bias; V4.1 wkv: no bias
    gate_eps: float | None = None  # RMSNorm eps of the gate; None = finfo(dtype).eps (reference)
    conv_eps: float = 1e-5
    zero_init_conv: bool = True  # paper: conv starts at zero (the demo does not)
    zero_init_output: bool = False  # zero value projection: the module adds exactly 0 at init
    # --- controls and regularisers (experiments; the paper uses neither) ---
    single_slot: bool = False  # capacity-1 control: one row per hash column, every n-gram reads it
    dropout: float = 0.0  # element-wise dropout on the retrieved vectors e_t while training
    row_dropout: float = 0.0  # drops whole retrieved rows (one per hash column) while training: embedding dropout
    output_dropout: float = 0.0  # element-wise dropout on the module's output Y while training

    def __post_init__(self) -> None:
        for name in ("table_sizes", "layer_ids"):
            value = getattr(self, name)
            _check(isinstance(value, (list, tuple)), name, value, "give a list of integers")
            ints = (int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v for v in value)
            object.__setattr__(self, name, tuple(ints))  # NumPy integers are fine; bools are not
        check_field_types(self)
        _check(self.max_ngram >= 2, "max_ngram", self.max_ngram, "N-grams start at 2; use max_ngram >= 2")
        _check(self.num_heads >= 1, "num_heads", self.num_heads, "use at least 1 hash head per order")
        _check(
            len(self.table_sizes) == self.max_ngram - 1,
            "table_sizes",
            self.table_sizes,
            f"give one base table size per order 2..{self.max_ngram} ({self.max_ngram - 1} values)",
        )
        for size in self.table_sizes:
            _check(size >= 2, "table_sizes", self.table_sizes, "every table size must be >= 2")
            # row offsets and hashes are int64: keep every layer's rows far below 2**63
            _check(size <= MAX_TABLE_SIZE, "table_sizes", self.table_sizes, f"every table size must be <= {MAX_TABLE_SIZE:,} (2**40)")
        _check(len(self.layer_ids) >= 1, "layer_ids", self.layer_ids, "name at least one Engram layer")
        _check(
            len(set(self.layer_ids)) == len(self.layer_ids),
            "layer_ids",
            self.layer_ids,
            "layer ids must be distinct",
        )
        _check(min(self.layer_ids) >= 0, "layer_ids", self.layer_ids, "layer ids are 0-based and >= 0")
        _check(self.pad_id >= 0, "pad_id", self.pad_id, "the pad id is a raw token id >= 0")
        _check(self.seed >= 0, "seed", self.seed, "use a seed >= 0 (NumPy default_rng)")
        _check(self.embed_per_ngram >= 1, "embed_per_ngram", self.embed_per_ngram, "use >= 1")
        _check(
            self.embed_per_ngram % self.num_heads == 0,
            "embed_per_ngram",
            self.embed_per_ngram,
            f"must be divisible by num_heads={self.num_heads}",
        )
        _check(self.hidden_size >= 1, "hidden_size", self.hidden_size, "use >= 1")
        _check(self.num_branches >= 1, "num_branches", self.num_branches, "use 1 for a plain residual")
        _check(self.kernel_size >= 1, "kernel_size", self.kernel_size, "use >= 1")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "use a probability in [0, 1)")
        _check(0.0 <= self.row_dropout < 1.0, "row_dropout", self.row_dropout, "use a probability in [0, 1)")
        _check(0.0 <= self.output_dropout < 1.0, "output_dropout", self.output_dropout, "use a probability in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.embed_per_ngram // self.num_heads

    @property
    def num_hash_columns(self) -> int:
        """(N-1) * K: hash ids per token per layer."""
        return (self.max_ngram - 1) * self.num_heads

    @property
    def memory_dim(self) -> int:
        """d_mem = (N-1) * embed_per_ngram."""
        return (self.max_ngram - 1) * self.embed_per_ngram

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["table_sizes"] = list(self.table_sizes)
        d["layer_ids"] = list(self.layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngramConfig":
        return cls(**checked_fields(cls, d))

    def with_(self, **changes: Any) -> "EngramConfig":
        return replace(self, **changes)


_SIMPLE = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_field_types(obj: Any) -> None:
    """ValueError naming the field when a value has the wrong type for its annotation
    (int, float, bool, str, optionally `| None`, and tuples of them): `--set steps=true`
    must not train one step because True == 1."""
    for name, f in obj.__dataclass_fields__.items():
        value = getattr(obj, name)
        ann = str(f.type).replace(" ", "")
        optional = ann.endswith("|None")
        base = ann[: -len("|None")] if optional else ann
        if value is None and optional:
            continue
        if base.startswith("tuple[") and base.endswith(",...]"):
            inner = _SIMPLE.get(base[len("tuple[") : -len(",...]")])
            ok = isinstance(value, tuple) and (inner is None or all(_is(v, inner) for v in value))
        elif base in _SIMPLE:
            ok = _is(value, _SIMPLE[base])
        else:
            continue  # nested configs check themselves
        if not ok:
            raise ValueError(f"invalid {type(obj).__name__}.{name}={value!r}: expected {ann.replace('|', ' | ')}")


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # True is an int to Python, never a count or a size to us
    return isinstance(value, types) and not (isinstance(value, float) and value != value)


def checked_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """`d` unchanged if every key is a field of the dataclass `cls`; else a ValueError naming them."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
    return d


def _check(ok: bool, field: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"invalid EngramConfig.{field}={value!r}: {fix}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OverEncodingConfig:
    slots: int  # m: base rows of each table
    table_dim: int  # W: width of each table, the paper's d / (k (n - 1))
    max_ngram: int = 3  # n
    num_splits: int = 4  # k tables per order
    # "mean": the paper's (E[x] + sum_j W_j T_j) / (1 + H); "add_mean": E[x] + (1/H) sum_j W_j T_j,
    # which leaves the token embedding at full scale (a diagnostic, not the paper's form)
    combine: str = "mean"

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.combine not in ("mean", "add_mean"):
            raise ValueError(f"invalid OverEncodingConfig.combine={self.combine!r}: use 'mean' (paper) or 'add_mean'")
        for name, low in (("slots", 2), ("table_dim", 1), ("max_ngram", 2), ("num_splits", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"invalid OverEncodingConfig.{name}={getattr(self, name)!r}: must be >= {low}")

    @property
    def num_tables(self) -> int:
        return self.num_splits * (self.max_ngram - 1)

    def moduli(self) -> list[tuple[int, int]]:
        """(order, modulus) per table: orders 2..n, k tables each, moduli m + 2t + 1."""
        orders = [i for i in range(2, self.max_ngram + 1) for _ in range(self.num_splits)]
        return [(order, self.slots + 2 * t + 1) for t, order in enumerate(orders)]

    @property
    def total_rows(self) -> int:
        return sum(m for _, m in self.moduli())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OverEncodingConfig":
        return cls(**checked_fields(cls, d))

    def with_(self, **changes: Any) -> "OverEncodingConfig":
        return replace(self, **changes)


def overencoding_for_budget(table_params: int, dim: int, max_ngram: int = 3, num_splits: int = 4) -> OverEncodingConfig:
    """The OE config whose tables hold ~table_params parameters at the paper's width."""
    num_tables = num_splits * (max_ngram - 1)
    table_dim = max(1, dim // num_tables)
    slots = max(2, table_params // (table_dim * num_tables) - num_tables)
    return OverEncodingConfig(slots=slots, table_dim=table_dim, max_ngram=max_ngram, num_splits=num_splits)
