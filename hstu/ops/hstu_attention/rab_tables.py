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

A table that is None adds nothing. This module holds the gathers and scatters of the tables: ``TablePlan`` (the
table ids and bias of a chunk of sequences) and ``TableGrads`` (the gradients, one scatter-sum per table and chunk),
which the reference uses per chunk of its score tensor, and ``dense_bias`` / ``dense_bias_grads``, which write the
bias out as a dense rab and reduce a dense rab's gradient to the tables' for kernels that read a dense rab only.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from hstu.ops.jagged.reference import pad_to_slots, padded_slots

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
    if time_reference == "query" or padded.shape[1] == 0:  # (a batch of empty sequences has no token to shift)
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


# How TableGrads sums a gradient into its table: "bincount" (torch.bincount: sequential on CPU; on CUDA it reads the
# largest id on the host, a device sync, and adds with atomics), "index_add" (index_add_: on CUDA float atomics, no
# sync, run-to-run order varies) or "index_put" (index_put_ with accumulate=True: on CUDA the ids are sorted (a stable
# radix sort) and each run of equal ids is summed in that order, so the result is bitwise reproducible; no sync).
REDUCTIONS = ("bincount", "index_add", "index_put")


def _scatter_sum(index: torch.Tensor, grad: torch.Tensor, table: torch.Tensor, reduction: str) -> torch.Tensor:
    """sum of grad over equal index, as table's (K,) or (H, K) shape; grad (b, 1 or H, n, n), index (b, n, n)."""
    size = table.shape[-1]
    if table.dim() == 2:
        heads = table.shape[0]
        offsets = torch.arange(heads, device=index.device).view(1, heads, 1, 1) * size
        index = index.unsqueeze(1) + offsets
    flat = grad.reshape(-1)
    flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    ids = index.reshape(-1)
    if reduction == "bincount":
        counted = torch.bincount(ids, weights=flat, minlength=table.numel())
    elif reduction == "index_add":
        counted = flat.new_zeros(table.numel()).index_add_(0, ids, flat)
    else:
        counted = flat.new_zeros(table.numel()).index_put_((ids,), flat, accumulate=True)
    return counted.view(table.shape)


class TableGrads:
    """Accumulates the tables' gradients from the score gradients dS (alpha included) of every chunk."""

    def __init__(self, tables: RelativeBiasTables, reduction: str = "bincount"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.tables = tables
        self.reduction = reduction
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
            counted = _scatter_sum(idx, grad, table, self.reduction)
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


# (b, n, n) table ids that dense_bias / dense_bias_grads materialise at once (int64: 256 MiB).
_DENSE_CHUNK_ELEMENTS = 1 << 25


def _dense_plan(tables: RelativeBiasTables, seq_offsets: torch.Tensor, total: int, n: int):
    """The TablePlan of a (B, n) padded layout of the jagged sequences and their row chunks."""
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    batch = lengths.numel()
    plan = TablePlan.build(tables, lengths, padded_slots(seq_offsets, total, n), n)
    step = max(1, _DENSE_CHUNK_ELEMENTS // max(1, n * n))
    return plan, [slice(start, min(batch, start + step)) for start in range(0, batch, step)]


def dense_heads(tables: RelativeBiasTables, heads: int) -> int:
    """The head count of the tables' dense bias: H when a table is per head, else 1."""
    return heads if any(w is not None and w.dim() == 2 for w in (tables.position_weights, tables.time_weights)) else 1


def dense_bias(tables: RelativeBiasTables, seq_offsets: torch.Tensor, total: int, n: int, heads: int,
               dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The tables' bias as a dense rab: (B, 1 or H, n, n) in ``dtype`` on seq_offsets' device (time part plus
    position part summed in the tables' dtype, then cast). Entries outside a sequence hold the weights their padded
    ids read; attention never sees them. ``total``: the token count (the timestamps' length); reads no device value."""
    plan, chunks = _dense_plan(tables, seq_offsets, total, n)
    device = seq_offsets.device
    rab = torch.empty(seq_offsets.numel() - 1, dense_heads(tables, heads), n, n, dtype=dtype, device=device)
    for rows in chunks:
        rab[rows] = plan.bias(plan.index(rows, n, device))
    return rab


def dense_bias_grads(tables: RelativeBiasTables, seq_offsets: torch.Tensor, total: int, drab: torch.Tensor,
                     deterministic: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:  # fmt: skip
    """(d position_weights, d time_weights) from the gradient ``drab`` of ``dense_bias``'s rab: each weight's
    gradient is the sum of drab over the entries that read it, summed in float32 (float64 for float64 tables) and
    cast to the table's dtype. deterministic: a reproducible reduction ("index_put", see REDUCTIONS), else float
    atomics ("index_add"); neither reads a device value."""
    n = drab.shape[-1]
    plan, chunks = _dense_plan(tables, seq_offsets, total, n)
    grads = TableGrads(tables, "index_put" if deterministic else "index_add")
    for rows in chunks:
        chunk = drab[rows]
        grads.add(plan.index(rows, n, drab.device), chunk.float() if chunk.dtype.itemsize < 4 else chunk)
    return grads.result()
