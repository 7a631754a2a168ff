"""Position and time encodings: additive input encodings and the relative attention bias (rab).

Both work on the final token sequence (after interleaving and contextual tokens). Ranking candidates share one
position, the one right after the history, as in the seed: no candidate can tell where it sits among the others.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from hstu.ops import jagged_to_padded_dense
from hstu.ops.hstu_attention.rab_tables import (
    DEFAULT_TIME_DIVISOR,
    TIME_REFERENCES,
    RelativeBiasTables,
    bucket_index,
    log_time_buckets,
    reference_times,
)

POSITION_ENCODINGS = ("absolute", "reverse", "none")
RAB_TIME_REFERENCES = TIME_REFERENCES

__all__ = ["POSITION_ENCODINGS", "RAB_TIME_REFERENCES", "PositionalEncoder", "RelativeAttentionBias",
           "gather_weights", "log_time_buckets", "token_positions"]


def token_positions(
    positions_in_sequence: torch.Tensor, lengths: torch.Tensor, num_targets: torch.Tensor, seq_ids: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """Position ids per token; the targets of sequence b all take position (L_b - targets_b)."""
    history_end = (lengths - num_targets)[seq_ids]
    shared = torch.minimum(positions_in_sequence, history_end)
    if mode == "reverse":
        # Distance from the end of the history: the most recent event is 1, the candidates 0 (the seed's choice).
        return history_end - shared
    return shared


class PositionalEncoder(nn.Module):
    """x * scale + position embedding (+ time-bucket embedding), then dropout."""

    def __init__(
        self,
        embedding_dim: int,
        max_positions: int,
        mode: str = "absolute",
        num_time_buckets: int = 0,
        input_scale: Optional[float] = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if mode not in POSITION_ENCODINGS:
            raise ValueError(f"position encoding must be one of {POSITION_ENCODINGS}, got {mode!r}")
        self.mode = mode
        self.max_positions = int(max_positions)
        self.input_scale = math.sqrt(embedding_dim) if input_scale is None else float(input_scale)
        self.position_embeddings = (
            nn.Embedding(self.max_positions + 1, embedding_dim) if mode != "none" else None
        )
        if self.position_embeddings is not None:
            # Meta: truncated normal with std sqrt(1/D), comparable to the scaled item embeddings.
            std = math.sqrt(1.0 / embedding_dim)
            nn.init.trunc_normal_(self.position_embeddings.weight, std=std, a=-2 * std, b=2 * std)
        self.num_time_buckets = int(num_time_buckets)
        self.time_embeddings = nn.Embedding(self.num_time_buckets + 1, embedding_dim) if num_time_buckets > 0 else None
        if self.time_embeddings is not None:
            nn.init.normal_(self.time_embeddings.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        timestamps: Optional[torch.Tensor] = None,
        query_times: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (T, D) token embeddings; positions: (T,) ids; timestamps/query_times: (T,) seconds (time buckets)."""
        out = x * self.input_scale
        if self.position_embeddings is not None:
            out = out + self.position_embeddings(positions.clamp(max=self.max_positions))
        if self.time_embeddings is not None:
            if timestamps is None or query_times is None:
                raise ValueError("time-bucket encoding needs timestamps and query times")
            buckets = log_time_buckets(query_times - timestamps, self.num_time_buckets)
            out = out + self.time_embeddings(buckets)
        return self.dropout(out)


class RelativeAttentionBias(nn.Module):
    """rab[b, 0, i, j] = w_pos[i - j] + w_time[bucket(|t_query(i) - t_j|)] (Meta HSTU's bucketed time + position).

    ``time_reference="query"`` takes t_query(i) = t_i (only the past is seen). ``"next"`` uses the timestamp of the
    event that row i predicts, t_{i+1}, as Meta's reference does (it knows when the next request happens); the last
    row then uses ``next_timestamps`` when given (the request time of the held-out target) or its own time.

    Two forms: :meth:`tables` hands the weights to ``hstu_attention(rab_tables=...)``, which gathers them itself (the
    layers' path: no (B, N, N) matrix is built here); ``forward`` builds the dense (B, 1, n, n) bias from a bucket
    matrix (:meth:`time_bucket_matrix`) and / or explicit relative positions.
    """

    def __init__(self, max_seqlen: int, num_time_buckets: int = 128, time_reference: str = "query",
                 use_time: bool = True, use_position: bool = True):
        super().__init__()
        if time_reference not in RAB_TIME_REFERENCES:
            raise ValueError(f"rab time reference must be one of {RAB_TIME_REFERENCES}, got {time_reference!r}")
        self.max_seqlen = int(max_seqlen)
        self.num_time_buckets = int(num_time_buckets)
        self.time_reference = time_reference
        self.position_weights = nn.Parameter(torch.empty(2 * self.max_seqlen - 1).normal_(0, 0.02)) if use_position else None
        self.time_weights = nn.Parameter(torch.empty(self.num_time_buckets + 1).normal_(0, 0.02)) if use_time else None

    @staticmethod
    def time_bucket_matrix(
        timestamps: torch.Tensor, seq_offsets: torch.Tensor, max_seqlen: int, num_buckets: int, time_reference: str,
        next_timestamps: Optional[torch.Tensor] = None, host_lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(B, N, N) bucket ids, computed once per forward and shared by every layer's bias.

        host_lengths: a host copy of the sequence lengths (the encoder holds one); with it the checks of
        ``seq_offsets`` make no device sync.
        """
        padded = jagged_to_padded_dense(
            timestamps.unsqueeze(-1), seq_offsets, max_seqlen, host_lengths=host_lengths
        ).squeeze(-1)
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        query = reference_times(padded, lengths, time_reference, next_timestamps)
        return bucket_index(query, padded, num_buckets, DEFAULT_TIME_DIVISOR)

    def tables(self, n: int, timestamps: Optional[torch.Tensor], next_timestamps: Optional[torch.Tensor] = None,
               shared_positions: Optional[torch.Tensor] = None) -> Optional[RelativeBiasTables]:
        """This bias as ``hstu_attention``'s rab_tables for sequences of at most n tokens (None: no table in use).

        timestamps: (T,) token times (needed with the time weights); next_timestamps: (B,) the time after each
        sequence (time reference "next"); shared_positions: (B,) trailing tokens (ranking candidates) that share
        the position right after the history, None when positions are the token indices.
        """
        self._check_length(n)
        if self.time_weights is None and self.position_weights is None:
            return None
        use_time = self.time_weights is not None
        if use_time and timestamps is None:
            raise ValueError("the relative attention bias's time weights need the token timestamps "
                             "(AttentionInputs.timestamps) or a time bucket matrix (AttentionInputs.time_buckets)")
        return RelativeBiasTables(
            position_weights=self.position_weights,
            time_weights=self.time_weights,
            timestamps=timestamps if use_time else None,
            time_reference=self.time_reference,
            next_timestamps=next_timestamps if use_time and self.time_reference == "next" else None,
            shared_positions=shared_positions if self.position_weights is not None else None,
        )

    def _check_length(self, n: int) -> None:
        if n > self.max_seqlen:
            raise ValueError(f"sequence of {n} tokens exceeds the relative bias range max_seqlen={self.max_seqlen}")

    def forward(self, time_buckets: Optional[torch.Tensor], batch_size: int, n: int,
                relative_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1, n, n) bias.

        time_buckets: the (B, n, n) output of :meth:`time_bucket_matrix`; relative_positions: (B, n, n) pos_i - pos_j
        when positions are not the token indices (ranking candidates share one position), else None.
        """
        self._check_length(n)
        device = next((t.device for t in (self.position_weights, self.time_weights, time_buckets, relative_positions)
                       if t is not None), torch.device("cpu"))  # fmt: skip
        bias = None
        if self.time_weights is not None:
            if time_buckets is None:
                raise ValueError("time bias needs the time bucket matrix")
            bias = gather_weights(self.time_weights, time_buckets)
        if self.position_weights is not None:
            if relative_positions is None:
                i = torch.arange(n, device=device)
                relative_positions = (i.view(-1, 1) - i.view(1, -1)).unsqueeze(0)
            index = relative_positions.clamp(-(self.max_seqlen - 1), self.max_seqlen - 1) + self.max_seqlen - 1
            position_bias = gather_weights(self.position_weights, index)
            bias = position_bias if bias is None else bias + position_bias
        if bias is None:
            bias = torch.zeros(1, n, n, device=device)
        return bias.expand(batch_size, n, n).unsqueeze(1)


class _GatherWeights(torch.autograd.Function):
    """weights[index] whose backward is one bincount: index_put/embedding backward sort the (B, N, N) indices,
    which dominated the CPU step time."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_weights = weights.numel()
        return weights[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        flat = grad.reshape(-1)
        flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
        grad_weights = torch.bincount(index.reshape(-1), weights=flat, minlength=ctx.num_weights)
        return grad_weights.to(grad.dtype), None


def gather_weights(weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _GatherWeights.apply(weights, index)
