"""The relative attention bias given as weight tables (``hstu_attention(..., rab_tables=...)``).

Instead of a dense (B, H or 1, N, N) bias, a call passes the weights it is gathered from, and the bias of row i and
key j of sequence b (head h) is

    rab[b, h, i, j] = w_time[h, bucket(t_ref(i) - t_j)] + w_pos[h, clamp(p_i - p_j, -(M - 1), M - 1) + M - 1]

* w_pos: (2M - 1,) or (H, 2M - 1) position weights (M: the longest distance the table tells apart);
* w_time: (K + 1,) or (H, K + 1) time-bucket weights, K the bucket count;
* bucket(dt) = clamp(trunc(ln(max(|dt|, 1)) / divisor), 0, K), computed in float32 (``log_time_buckets``);
* t_j: the key token's timestamp (int seconds); t_ref(i): the query token's own timestamp (``time_reference=
  "query"``) or the next token's, the last token of a sequence taking ``next_timestamps[b]`` when given, else its own
  (``"next"``: the time of the request that row i predicts);
* p_i: the token's index in its sequence, except that the last ``shared_positions[b]`` tokens of sequence b (ranking
  candidates) all take position L_b - shared_positions[b].

A table that is None adds nothing. The op never builds the (B, N, N) bucket or position matrices outside the
reference's own per-chunk work; this module holds the reference's gathers and scatters: ``chunk_bias`` (the forward)
and ``TableGrads`` (the gradients, one bincount per table and chunk).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from hstu.ops.jagged.reference import pad_to_slots

TIME_REFERENCES = ("query", "next")
DEFAULT_TIME_DIVISOR = 0.301


class RelativeBiasTables(NamedTuple):
    """The relative attention bias of one ``hstu_attention`` call as weight tables (see the module docstring)."""

    position_weights: Optional[torch.Tensor] = None  # (2M - 1,) or (H, 2M - 1)
    time_weights: Optional[torch.Tensor] = None  # (K + 1,) or (H, K + 1)
    timestamps: Optional[torch.Tensor] = None  # (T,) int32/int64 seconds, one per token; needed with time_weights
    time_reference: str = "query"  # "query" or "next"
    next_timestamps: Optional[torch.Tensor] = None  # (B,) with "next": the time after each sequence's last token
    shared_positions: Optional[torch.Tensor] = None  # (B,) trailing tokens that share one position
    time_divisor: float = DEFAULT_TIME_DIVISOR  # the bucket function's divisor of ln|dt|


def log_time_buckets(delta_seconds: torch.Tensor, num_buckets: int,
                     log_base_divisor: float = DEFAULT_TIME_DIVISOR) -> torch.Tensor:
    """Meta HSTU's bucketisation: floor(ln(max(|dt|, 1)) / 0.301), clamped to [0, num_buckets]."""
    magnitude = delta_seconds.abs().clamp(min=1).to(torch.float32)
    return (torch.log(magnitude) / log_base_divisor).to(torch.int64).clamp(0, num_buckets)


def reference_times(padded: torch.Tensor, lengths: torch.Tensor, time_reference: str,
                    next_timestamps: Optional[torch.Tensor]) -> torch.Tensor:
    """t_ref of every padded token: (B, n) from the (B, n) padded timestamps and the (B,) lengths."""
    if time_reference == "query":
        return padded
    last = (lengths.to(torch.int64) - 1).clamp(min=0)
    tail = padded.gather(1, last.unsqueeze(1)).squeeze(1) if next_timestamps is None else next_timestamps
    shifted = torch.cat([padded[:, 1:], padded.new_zeros(padded.shape[0], 1)], dim=1)
    return shifted.scatter(1, last.unsqueeze(1), tail.to(shifted.dtype).unsqueeze(1))


def bucket_index(reference: torch.Tensor, padded: torch.Tensor, num_buckets: int, divisor: float) -> torch.Tensor:
    """(b, n, n) time-bucket ids of t_ref(i) - t_j for the (b, n) reference and key times."""
    return log_time_buckets(reference.unsqueeze(2) - padded.unsqueeze(1), num_buckets, divisor)


def position_index(n: int, table_size: int, lengths: Optional[torch.Tensor],
                   shared_positions: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Position-table ids of p_i - p_j: (1, n, n) when positions are the token indices, else (b, n, n) for the
    sequences of ``lengths`` / ``shared_positions``."""
    half = (table_size + 1) // 2
    positions = torch.arange(n, device=device).view(1, n)
    if shared_positions is not None:
        history_end = (lengths.to(torch.int64) - shared_positions.to(torch.int64)).view(-1, 1)
        positions = torch.minimum(positions, history_end)
    relative = positions.unsqueeze(2) - positions.unsqueeze(1)
    return relative.clamp(-(half - 1), half - 1) + half - 1


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] as (b, 1 or H, n, n) for a (K,) or (H, K) table and a (b, n, n) index."""
    if table.dim() == 1:
        return table[index].unsqueeze(1)
    return table[:, index].transpose(0, 1)


class ChunkIndex(NamedTuple):
    """The table ids of one chunk of sequences: time (b, n, n) and position (1 or b, n, n), None without the table."""

    time: Optional[torch.Tensor]
    position: Optional[torch.Tensor]


class TablePlan(NamedTuple):
    """What the reference needs of the tables for a padded width n: padded timestamps and reference times."""

    tables: RelativeBiasTables
    lengths: torch.Tensor  # (B,)
    keys: Optional[torch.Tensor]  # (B, n) padded t_j
    refs: Optional[torch.Tensor]  # (B, n) padded t_ref(i)

    @staticmethod
    def build(tables: RelativeBiasTables, lengths: torch.Tensor, slots: torch.Tensor, n: int) -> "TablePlan":
        keys = refs = None
        if tables.time_weights is not None:
            times = tables.timestamps.to(torch.int64)
            keys = pad_to_slots(times, slots, lengths.numel(), n)
            refs = reference_times(keys, lengths, tables.time_reference, tables.next_timestamps)
        return TablePlan(tables, lengths, keys, refs)

    def index(self, rows: slice, n: int, device: torch.device) -> ChunkIndex:
        t = self.tables
        time = position = None
        if t.time_weights is not None:
            time = bucket_index(self.refs[rows], self.keys[rows], t.time_weights.shape[-1] - 1, t.time_divisor)
        if t.position_weights is not None:
            shared = None if t.shared_positions is None else t.shared_positions[rows]
            position = position_index(n, t.position_weights.shape[-1], self.lengths[rows], shared, device)
        return ChunkIndex(time, position)

    def bias(self, index: ChunkIndex) -> Optional[torch.Tensor]:
        """The chunk's (b or 1, 1 or H, n, n) bias in the tables' dtype: time part first, then the position part."""
        t = self.tables
        bias = None
        if index.time is not None:
            bias = _gather(t.time_weights, index.time)
        if index.position is not None:
            position_bias = _gather(t.position_weights, index.position)
            bias = position_bias if bias is None else bias + position_bias
        return bias


def _bincount(index: torch.Tensor, grad: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """sum of grad over equal index, as table's (K,) or (H, K) shape; grad (b, 1 or H, n, n), index (b, n, n)."""
    size = table.shape[-1]
    if table.dim() == 2:
        heads = table.shape[0]
        offsets = torch.arange(heads, device=index.device).view(1, heads, 1, 1) * size
        index = index.unsqueeze(1) + offsets
    flat = grad.reshape(-1)
    flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    counted = torch.bincount(index.reshape(-1), weights=flat, minlength=table.numel())
    return counted.view(table.shape)


class TableGrads:
    """Accumulates the tables' gradients from the score gradients dS (alpha included) of every chunk."""

    def __init__(self, tables: RelativeBiasTables):
        self.tables = tables
        self.position: Optional[torch.Tensor] = None
        self.time: Optional[torch.Tensor] = None

    def add(self, index: ChunkIndex, dscores: torch.Tensor) -> None:
        """dscores: (b, H, n, n) in the compute dtype."""
        t = self.tables
        heads = dscores.shape[1]
        for name, table, idx in (("time", t.time_weights, index.time), ("position", t.position_weights,
                                                                          index.position)):  # fmt: skip
            if table is None:
                continue
            grad = dscores if table.dim() == 2 or heads == 1 else dscores.sum(dim=1, keepdim=True)
            grad = grad.to(table.dtype)
            if idx.shape[0] == 1 and grad.shape[0] != 1:
                grad = grad.sum(dim=0, keepdim=True)  # the ids do not depend on the sequence
            counted = _bincount(idx, grad, table)
            previous = getattr(self, name)
            setattr(self, name, counted if previous is None else previous + counted)

    def result(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(d position_weights, d time_weights) in the tables' dtypes; zeros for a table no chunk reached."""
        out = []
        for table, grad in ((self.tables.position_weights, self.position), (self.tables.time_weights, self.time)):
            if table is None:
                out.append(None)
            else:
                out.append(torch.zeros_like(table) if grad is None else grad.to(table.dtype))
        return out[0], out[1]
