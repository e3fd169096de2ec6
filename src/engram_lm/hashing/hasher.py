"""NgramHasher: raw token ids -> per-layer hash rows, with input checks and decoding state.

Binds a HashLayout to a VocabProjection and keeps their constants as tensors per device.
Full-sequence hashing (`__call__`) and incremental hashing (`step`, for decoding from a
(B, N-1) history) share one code path, so they agree at every position by construction
(and tests check it).

Shape legend: B batch, T positions, S new positions, H = (N-1)*K hash columns, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engram_lm.config import EngramConfig
from engram_lm.hashing.layout import HashLayout, build_layout
from engram_lm.hashing.ngram import hash_ngrams, ngram_window_start
from engram_lm.tokenizer.cache import load_projection
from engram_lm.tokenizer.compression import VocabProjection

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass(frozen=True, slots=True)
class NgramHistory:
    """The last N-1 canonical ids of each row, oldest first, and which are blocked (dead,
    before the start, or at/before an end-of-document token)."""

    ids_BK: torch.Tensor  # int64 (B, N-1)
    blocked_BK: torch.Tensor  # bool (B, N-1)


class NgramHasher:
    def __init__(self, layout: HashLayout, projection: VocabProjection) -> None:
        if projection.compressed_size != layout.compressed_vocab_size:
            raise ValueError(
                f"layout was built for {layout.compressed_vocab_size} canonical ids but the "
                f"tokenizer {projection.source!r} compresses to {projection.compressed_size}; "
                "build the layout from this tokenizer's projection"
            )
        self.layout = layout
        self.projection = projection
        self._constants: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config: EngramConfig, projection: VocabProjection | None = None) -> "NgramHasher":
        """Load (or reuse) the tokenizer's projection and build the layout for `config`."""
        projection = projection if projection is not None else load_projection(config.tokenizer)
        if not config.compress_tokens:
            projection = VocabProjection.identity(projection.raw_size)
        if config.pad_id >= projection.raw_size:
            raise ValueError(
                f"invalid EngramConfig.pad_id={config.pad_id}: outside the raw vocabulary "
                f"[0, {projection.raw_size}) of tokenizer {projection.source!r}"
            )
        pad_id = projection.map_id(config.pad_id)
        layout = build_layout(config, projection.compressed_size, pad_id, projection.digest)
        return cls(layout, projection)

    @property
    def num_columns(self) -> int:
        return (self.layout.max_ngram - 1) * self.layout.num_heads

    def __call__(
        self,
        input_ids_BT: torch.Tensor,
        *,
        dead_BT: torch.Tensor | None = None,
        eod_id: int | None = None,
        global_rows: bool = False,
        check: bool = True,
    ) -> dict[int, torch.Tensor]:
        """Hash ids of every Engram layer, keyed by layer id: (B, T, H) int64 each.

        global_rows=False gives per-head local indices (as the reference demo);
        True adds each head's row offset (rows of the layer's single table).
        dead_BT marks tokens that block n-grams (V4.1); eod_id makes n-grams stop at
        document ends so a packed row hashes exactly like its documents hashed apart."""
        rows_LBTH = self.hash_all(
            input_ids_BT, dead_BT=dead_BT, eod_id=eod_id, global_rows=global_rows, check=check
        )
        return dict(zip(self.layout.layer_ids, rows_LBTH.unbind(0)))

    def hash_all(
        self,
        input_ids_BT: torch.Tensor,
        *,
        dead_BT: torch.Tensor | None = None,
        eod_id: int | None = None,
        global_rows: bool = False,
        check: bool = True,
    ) -> torch.Tensor:
        """Like __call__, stacked in layout order: (L, B, T, H) int64."""
        ids_BT = self._checked_ids(input_ids_BT, check)
        dead_BT = self._checked_mask(dead_BT, ids_BT)
        boundary_BT = ids_BT == eod_id if eod_id is not None else None
        start_BT = ngram_window_start(ids_BT.shape[1], dead_BT, boundary_BT, ids_BT.device)
        return self._hash_canonical(self.projection.compress(ids_BT), start_BT, global_rows)

    def init_history(self, batch_size: int, device: torch.device | str = "cpu") -> NgramHistory:
        """History before the first token: every slot blocked (reads the pad id)."""
        width = self.layout.max_ngram - 1
        ids = torch.full((batch_size, width), self.layout.pad_id, dtype=torch.int64, device=device)
        return NgramHistory(ids, torch.ones((batch_size, width), dtype=torch.bool, device=device))

    def step(
        self,
        history: NgramHistory,
        new_ids_BS: torch.Tensor,
        *,
        dead_BS: torch.Tensor | None = None,
        eod_id: int | None = None,
        global_rows: bool = False,
        check: bool = True,
    ) -> tuple[torch.Tensor, NgramHistory]:
        """Hash S new tokens given the history: ((L, B, S, H), updated history).

        Equal to full-sequence hashing at the same positions: the history's blocked slots
        act as dead tokens, which latch exactly like the start of the row."""
        ids_BS = self._checked_ids(new_ids_BS, check)
        dead_BS = self._checked_mask(dead_BS, ids_BS)
        if history.ids_BK.shape[0] != ids_BS.shape[0]:
            raise ValueError(
                f"history holds {history.ids_BK.shape[0]} rows but {ids_BS.shape[0]} new rows were "
                "given; start each batch with init_history(batch_size)"
            )
        width, S = history.ids_BK.shape[1], ids_BS.shape[1]
        canonical_BX = torch.cat([history.ids_BK, self.projection.compress(ids_BS)], dim=1)
        # a decode step is dozens of tiny ops (each ~4 us of dispatch on a CPU): pads, not zeros + cat
        dead_BX = F.pad(history.blocked_BK, (0, S)) if dead_BS is None else torch.cat([history.blocked_BK, dead_BS], 1)
        boundary_BX = F.pad(ids_BS == eod_id, (width, 0)) if eod_id is not None else torch.zeros_like(dead_BX)
        start_BX = ngram_window_start(width + S, dead_BX, boundary_BX)
        rows_LBXH = self._hash_canonical(canonical_BX, start_BX, global_rows)
        blocked_BX = dead_BX | boundary_BX  # a document end blocks everything after it
        new_history = NgramHistory(canonical_BX[:, -width:], blocked_BX[:, -width:])
        return rows_LBXH[:, :, width:], new_history

    def _hash_canonical(
        self, canonical_BT: torch.Tensor, start_BT: torch.Tensor | None, global_rows: bool
    ) -> torch.Tensor:
        multipliers_LN, primes_LOK, offsets_LH = self._device_constants(canonical_BT.device)
        rows_LBTH = hash_ngrams(canonical_BT, multipliers_LN, primes_LOK, self.layout.pad_id, start_BT)
        if global_rows:
            rows_LBTH = rows_LBTH + offsets_LH[:, None, None, :]
        return rows_LBTH

    def _device_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._constants:
            layers = self.layout.layers
            self._constants[key] = (
                torch.tensor([layer.multipliers for layer in layers], dtype=torch.int64, device=device),
                torch.tensor([layer.primes for layer in layers], dtype=torch.int64, device=device),
                torch.tensor([layer.offsets for layer in layers], dtype=torch.int64, device=device),
            )
        return self._constants[key]

    def _checked_ids(self, ids: torch.Tensor, check: bool) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"input ids must be a torch.Tensor of shape (B, T), got {type(ids).__name__}")
        if ids.dtype not in _ID_DTYPES:
            raise TypeError(
                f"input ids must be an integer tensor (int64 preferred), got {ids.dtype}; "
                "pass token ids, e.g. torch.tensor(ids, dtype=torch.long)"
            )
        if ids.dim() != 2:
            raise ValueError(
                f"input ids must have shape (B, T), got rank {ids.dim()} {tuple(ids.shape)}; "
                "add a batch dimension with ids.unsqueeze(0)"
            )
        ids = ids.to(torch.int64)
        if check and ids.numel():
            top = int(ids.max())  # one sync: bad ids would otherwise index out of range
            if top >= self.projection.raw_size:
                raise ValueError(
                    f"token id {top} is outside the raw vocabulary [0, {self.projection.raw_size}) "
                    f"of tokenizer {self.projection.source!r}; tokenize with that tokenizer"
                )
        return ids

    @staticmethod
    def _checked_mask(mask: torch.Tensor | None, ids_BT: torch.Tensor) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.shape != ids_BT.shape:
            raise ValueError(f"dead-token mask has shape {tuple(mask.shape)}, ids have {tuple(ids_BT.shape)}")
        return mask.to(device=ids_BT.device, dtype=torch.bool)
