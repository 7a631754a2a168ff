"""Where the events of a batch sit among the tokens the HSTU layers see, and which rows the model heads read.

Token sequence b, as the encoder builds it:

    [C contextual tokens] [history tokens] [candidate item tokens]

with the history interleaved as [i1, a1, i2, a2, ...] (item, action) when actions are tokens, else [i1, i2, ...].
The encoder's ``item_outputs`` have one row per event (history + candidates) in event order; the methods of
:class:`TokenLayout` name the rows of that tensor that the losses, heads and metrics use, so nothing outside the
encoder re-derives the layout. All index arithmetic is vectorised and output sizes come from host copies of the
lengths: building the layout and reading its rows make no device-to-host copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, TypeVar

import torch

from hstu.ops import candidate_indices, lengths_to_offsets, sequence_ids_and_positions

Count = TypeVar("Count", int, torch.Tensor)


def sequence_tokens(num_history: Count, num_candidates: Count, num_contextual: int, interleave_actions: bool) -> Count:
    """Tokens of a sequence with ``num_history`` history events and ``num_candidates`` candidates (ints or
    tensors of counts): the contextual tokens, one or two tokens per history event, one per candidate."""
    history_tokens = 2 * num_history if interleave_actions else num_history
    return history_tokens + num_candidates + num_contextual


def rows_with_next(lengths: torch.Tensor, host_lengths: torch.Tensor) -> torch.Tensor:
    """Ascending jagged rows that have a next event in their sequence (all but each sequence's last row).

    Built from per-sequence counts rather than a boolean mask: the host lengths give the output size, so no
    nonzero (a device sync on GPU) is needed.
    """
    lengths = lengths.to(torch.int64)
    offsets = lengths_to_offsets(lengths, host_lengths)
    host_query_lengths = (host_lengths.to(torch.int64) - 1).clamp(min=0)
    query_offsets = lengths_to_offsets((lengths - 1).clamp(min=0), host_query_lengths)
    seq_ids, positions = sequence_ids_and_positions(query_offsets, host_query_lengths)
    return offsets[:-1][seq_ids] + positions


@dataclass
class TokenLayout:
    """The token layout of one batch; built by :meth:`build` (the encoder's preprocessing) from the event counts."""

    event_lengths: torch.Tensor  # (B,) int64 events per sequence (history + candidates)
    host_event_lengths: torch.Tensor  # (B,) int64 host copy
    event_offsets: torch.Tensor  # (B+1,)
    num_candidates: torch.Tensor  # (B,) int64, zeros when the batch has no candidates
    host_num_candidates: torch.Tensor  # (B,) int64 host copy
    has_candidates: bool  # the batch passed candidate counts (ranking): they are attention targets
    num_contextual: int  # contextual tokens in front of every sequence
    interleave_actions: bool
    token_lengths: torch.Tensor  # (B,) tokens per sequence through the layers
    host_token_lengths: torch.Tensor  # (B,) int64 host copy
    token_offsets: torch.Tensor  # (B+1,)
    event_token_offsets: torch.Tensor  # (B+1,) of the event tokens (items and actions: no contextual tokens)
    # With interleaving (else None): the row of every event's item token and of every history action token, counted
    # among the tokens without the contextual ones, which events have an action token (the history), and the event
    # rows of those, ascending (the events whose action embeddings become action tokens, in action token order).
    item_token_rows: Optional[torch.Tensor] = None  # (num_events,)
    action_token_rows: Optional[torch.Tensor] = None  # (num_history_events,)
    action_events: Optional[torch.Tensor] = None  # (num_events,) bool
    history_event_rows: Optional[torch.Tensor] = None  # (num_history_events,)
    context_offsets: Optional[torch.Tensor] = None  # (B+1,) of the contextual tokens when num_contextual > 0

    @staticmethod
    def build(
        lengths: torch.Tensor, host_lengths: torch.Tensor, num_candidates: torch.Tensor,
        host_num_candidates: torch.Tensor, *, has_candidates: bool, num_contextual: int, interleave_actions: bool,
    ) -> "TokenLayout":
        """lengths / num_candidates: (B,) int64 events and candidates per sequence, with their int64 host copies."""
        event_offsets = lengths_to_offsets(lengths, host_lengths)
        token_lengths, host_token_lengths, token_offsets = lengths, host_lengths, event_offsets
        item_rows = action_rows = action_events = history_rows = None
        if interleave_actions:
            history, host_history = lengths - num_candidates, host_lengths - host_num_candidates
            token_lengths = sequence_tokens(history, num_candidates, 0, True)
            host_token_lengths = sequence_tokens(host_history, host_num_candidates, 0, True)
            token_offsets = lengths_to_offsets(token_lengths, host_token_lengths)
            event_seq, event_pos = sequence_ids_and_positions(event_offsets, host_lengths)
            action_events = event_pos < history[event_seq]
            item_slot = torch.where(action_events, 2 * event_pos, history[event_seq] + event_pos)
            item_rows = token_offsets[:-1][event_seq] + item_slot
            # The history events, enumerated from their counts (a boolean index would be a nonzero: a device sync).
            history_seq, history_pos = sequence_ids_and_positions(lengths_to_offsets(history, host_history),
                                                                  host_history)  # fmt: skip
            history_rows = event_offsets[:-1][history_seq] + history_pos
            action_rows = token_offsets[:-1][history_seq] + 2 * history_pos + 1
        context_offsets, event_token_offsets = None, token_offsets
        if num_contextual > 0:
            context_lengths = torch.full_like(lengths, num_contextual)
            context_offsets = lengths_to_offsets(context_lengths, torch.full_like(host_lengths, num_contextual))
            token_lengths = token_lengths + num_contextual
            host_token_lengths = host_token_lengths + num_contextual
            token_offsets = context_offsets + token_offsets
        return TokenLayout(
            event_lengths=lengths, host_event_lengths=host_lengths, event_offsets=event_offsets,
            num_candidates=num_candidates, host_num_candidates=host_num_candidates, has_candidates=has_candidates,
            num_contextual=num_contextual, interleave_actions=interleave_actions, token_lengths=token_lengths,
            host_token_lengths=host_token_lengths, token_offsets=token_offsets,
            event_token_offsets=event_token_offsets, item_token_rows=item_rows,
            action_token_rows=action_rows, action_events=action_events, history_event_rows=history_rows,
            context_offsets=context_offsets,
        )  # fmt: skip

    # ---- sizes --------------------------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return self.event_lengths.numel()

    @property
    def num_events(self) -> int:
        return int(self.host_event_lengths.sum())

    @property
    def num_tokens(self) -> int:
        """Tokens through the HSTU layers (for throughput)."""
        return int(self.host_token_lengths.sum())

    @property
    def num_event_tokens(self) -> int:
        """Tokens of the events (items and actions), without the contextual ones."""
        return self.num_tokens - self.num_contextual * self.num_sequences

    @property
    def max_tokens(self) -> int:
        """The longest token sequence of the batch (0 for an empty batch)."""
        return int(self.host_token_lengths.max()) if self.num_sequences > 0 else 0

    @property
    def sum_squared_lengths(self) -> int:
        """Σ L_b² over the token sequences (attention FLOPs)."""
        return int((self.host_token_lengths**2).sum())

    # ---- what the attention masks need --------------------------------------------------------------------------
    @property
    def host_event_token_lengths(self) -> torch.Tensor:
        """(B,) host counts of the event tokens (items and actions) per sequence, without the contextual ones."""
        return self.host_token_lengths - self.num_contextual

    @property
    def host_context_lengths(self) -> Optional[torch.Tensor]:
        """Host copy of ``context_lengths``."""
        return None if self.context_offsets is None else torch.full_like(self.host_event_lengths, self.num_contextual)

    @property
    def context_lengths(self) -> Optional[torch.Tensor]:
        """(B,) contextual tokens per sequence, None without contextual tokens."""
        return None if self.context_offsets is None else self.context_offsets[1:] - self.context_offsets[:-1]

    @property
    def attention_targets(self) -> Optional[torch.Tensor]:
        """(B,) candidates per sequence, which attend to the history only; None when the batch has no candidates."""
        return self.num_candidates if self.has_candidates else None

    # ---- rows of the encoder's item outputs (one per event) ------------------------------------------------------
    def candidate_rows(self) -> torch.Tensor:
        """(num_candidates_total,) int64 ascending rows of the ranking candidates (the last num_candidates[b] events
        of every sequence b)."""
        return candidate_indices(self.event_offsets, self.num_candidates, host_lengths=self.host_event_lengths,
                                 host_num_candidates=self.host_num_candidates)  # fmt: skip

    def candidate_sequence_ids(self) -> torch.Tensor:
        """(num_candidates_total,) int64: the sequence every candidate belongs to, in candidate order."""
        total = int(self.host_num_candidates.sum())
        batch = torch.arange(self.num_sequences, device=self.num_candidates.device)
        return torch.repeat_interleave(batch, self.num_candidates, output_size=total)

    def rows_with_next(self) -> torch.Tensor:
        """Ascending event rows that have a next event in their sequence (the next-item shift: row r predicts r+1)."""
        return rows_with_next(self.event_lengths, self.host_event_lengths)

    def last_rows(self) -> torch.Tensor:
        """(B,) the row of every sequence's last event; an empty sequence gets row 0 or another sequence's row, so
        select with ``event_lengths > 0``."""
        return (self.event_offsets[1:] - 1).clamp(min=0)
