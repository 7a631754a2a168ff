"""Pure-PyTorch jagged-tensor ops (no argument checks: ``hstu.ops.jagged.op`` validates).

A jagged tensor is ``values`` (T, *D) plus ``offsets`` (B+1,): sequence b is values[offsets[b]:offsets[b+1]].
Everything here is vectorised index arithmetic, differentiable, and runs on any device.
"""

from __future__ import annotations

import torch


def lengths_to_offsets_reference(lengths: torch.Tensor) -> torch.Tensor:
    offsets = lengths.new_zeros(lengths.numel() + 1)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    return offsets


def sequence_ids_and_positions(offsets: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of a jagged tensor: which sequence it belongs to and its position inside it."""
    lengths = (offsets[1:] - offsets[:-1]).to(torch.int64)
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total)
    positions = torch.arange(total, device=offsets.device) - offsets[:-1].to(torch.int64)[seq_ids]
    return seq_ids, positions


def padded_slots(offsets: torch.Tensor, total: int, max_length: int) -> torch.Tensor:
    """For every jagged row, its row in the flattened (B * max_length + 1, *D) padded tensor.

    Rows past max_length all go to the spare last slot, so truncation needs no boolean indexing (on GPU a boolean
    index is a nonzero and a device sync). Compute once per batch and share between every tensor of that layout.
    """
    batch = offsets.numel() - 1
    seq_ids, positions = sequence_ids_and_positions(offsets, total)
    slots = seq_ids * max_length + positions
    return torch.where(positions < max_length, slots, batch * max_length)


def pad_to_slots(values: torch.Tensor, slots: torch.Tensor, batch: int, max_length: int,
                 padding_value: float = 0.0) -> torch.Tensor:
    """(T, *D) jagged -> (B, max_length, *D) dense through the ``padded_slots`` of its offsets."""
    flat = values.new_full((batch * max_length + 1, *values.shape[1:]), padding_value)
    flat = flat.index_put((slots,), values)
    return flat[:-1].view(batch, max_length, *values.shape[1:])


def unpad_from_slots(dense: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pad_to_slots`` for sequences no longer than dense.shape[1]."""
    return dense.reshape(dense.shape[0] * dense.shape[1], *dense.shape[2:])[slots]


def jagged_to_padded_dense_reference(
    values: torch.Tensor, offsets: torch.Tensor, max_length: int, padding_value: float = 0.0
) -> torch.Tensor:
    slots = padded_slots(offsets, values.shape[0], max_length)
    return pad_to_slots(values, slots, offsets.numel() - 1, max_length, padding_value)


def dense_to_jagged_reference(dense: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """total: offsets[-1] when the caller knows it (reading it from a device tensor is a sync)."""
    if total is None:
        total = int(offsets[-1]) if offsets.numel() else 0
    return unpad_from_slots(dense, padded_slots(offsets, total, dense.shape[1]))


def _concat_destinations(offsets_a: torch.Tensor, offsets_b: torch.Tensor, total_a: int, total_b: int):
    """Row indices, in the concatenated jagged tensor, of every row of a and of b."""
    offsets_out = offsets_a + offsets_b
    lengths_a = offsets_a[1:] - offsets_a[:-1]
    ids_a, pos_a = sequence_ids_and_positions(offsets_a, total_a)
    ids_b, pos_b = sequence_ids_and_positions(offsets_b, total_b)
    dest_a = offsets_out[:-1].to(torch.int64)[ids_a] + pos_a
    dest_b = offsets_out[:-1].to(torch.int64)[ids_b] + lengths_a.to(torch.int64)[ids_b] + pos_b
    return offsets_out, dest_a, dest_b


def concat_2d_jagged_reference(
    values_a: torch.Tensor, offsets_a: torch.Tensor, values_b: torch.Tensor, offsets_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    offsets_out, dest_a, dest_b = _concat_destinations(offsets_a, offsets_b, values_a.shape[0], values_b.shape[0])
    total = values_a.shape[0] + values_b.shape[0]
    out = values_a.new_zeros((total, *values_a.shape[1:]))
    out = out.index_put((dest_a,), values_a).index_put((dest_b,), values_b.to(values_a.dtype))
    return out, offsets_out


def split_2d_jagged_reference(
    values: torch.Tensor, offsets_a: torch.Tensor, offsets_b: torch.Tensor, total_a: int | None = None,
    total_b: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """total_a / total_b: offsets_a[-1] / offsets_b[-1] when the caller knows them (reading them is a sync)."""
    total_a = int(offsets_a[-1]) if total_a is None else total_a
    total_b = int(offsets_b[-1]) if total_b is None else total_b
    _, dest_a, dest_b = _concat_destinations(offsets_a, offsets_b, total_a, total_b)
    return values[dest_a], values[dest_b]


def candidate_mask_reference(seq_offsets: torch.Tensor, num_candidates: torch.Tensor, total: int) -> torch.Tensor:
    seq_ids, positions = sequence_ids_and_positions(seq_offsets, total)
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).to(torch.int64)
    return positions >= (lengths - num_candidates.to(torch.int64))[seq_ids]


def candidate_indices_reference(seq_offsets: torch.Tensor, num_candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending rows of the last num_candidates[b] rows of every sequence b; count: sum(num_candidates)."""
    counts = num_candidates.to(torch.int64)
    candidate_offsets = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, dim=0, out=candidate_offsets[1:])
    seq_ids, rank = sequence_ids_and_positions(candidate_offsets, count)
    first = seq_offsets[1:].to(torch.int64) - counts
    return first[seq_ids] + rank
