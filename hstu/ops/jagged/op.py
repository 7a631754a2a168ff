"""Public jagged ops: argument checks, then the implementation (vectorised torch on every device)."""

from __future__ import annotations

from typing import Optional

import torch

from hstu.ops._validation import (
    check_index_tensor,
    check_int,
    check_offsets,
    check_same_device,
    check_tensor,
    lengths_of,
    values_are_concrete,
)
from hstu.ops.jagged import reference


def lengths_to_offsets(lengths: torch.Tensor, host_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) non-negative lengths -> (B+1,) offsets starting at 0, same dtype and device.

    host_lengths: a host copy of ``lengths`` the caller already holds; the value check reads it instead of
    ``lengths``, which on GPU would cost a device sync.
    """
    lengths = check_index_tensor("lengths", lengths)
    if host_lengths is not None:
        host_lengths = check_index_tensor("host_lengths", host_lengths, length=lengths.numel())
    checked = lengths if host_lengths is None else host_lengths
    if values_are_concrete(checked) and checked.numel() and bool((checked < 0).any()):
        raise ValueError(f"lengths must be non-negative, got minimum {int(checked.min())}")
    return reference.lengths_to_offsets_reference(lengths)


def _check_values(name: str, values: object, min_dim: int = 1) -> torch.Tensor:
    values = check_tensor(name, values)
    if values.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(values.shape)}")
    return values


def jagged_to_padded_dense(
    values: torch.Tensor, offsets: torch.Tensor, max_length: int, padding_value: float = 0.0
) -> torch.Tensor:
    """(T, *D) jagged -> (B, max_length, *D) dense; sequences longer than max_length keep their first rows."""
    values = _check_values("values", values)
    offsets = check_offsets("offsets", offsets, total=values.shape[0])
    check_same_device("values", values, offsets=offsets)
    max_length = check_int("max_length", max_length, minimum=0)
    return reference.jagged_to_padded_dense_reference(values, offsets, max_length, padding_value)


def dense_to_jagged(dense: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(B, N, *D) dense -> (offsets[-1], *D) jagged, keeping the first length_b rows of each sequence."""
    dense = _check_values("dense", dense, min_dim=2)
    offsets = check_offsets("offsets", offsets)
    check_same_device("dense", dense, offsets=offsets)
    if offsets.numel() - 1 != dense.shape[0]:
        raise ValueError(f"offsets describes {offsets.numel() - 1} sequences but dense has batch {dense.shape[0]}")
    if values_are_concrete(offsets) and offsets.numel() > 1:
        longest = int(lengths_of(offsets).max())
        if longest > dense.shape[1]:
            raise ValueError(f"offsets has a sequence of length {longest} > dense.shape[1]={dense.shape[1]}")
    return reference.dense_to_jagged_reference(dense, offsets)


def _check_pair(values_a, offsets_a, values_b, offsets_b):
    values_a = _check_values("values_a", values_a)
    values_b = _check_values("values_b", values_b)
    if values_a.shape[1:] != values_b.shape[1:]:
        raise ValueError(
            f"values_a rows {tuple(values_a.shape[1:])} and values_b rows {tuple(values_b.shape[1:])} differ"
        )
    if values_a.dtype != values_b.dtype:
        raise TypeError(f"values_a is {values_a.dtype} but values_b is {values_b.dtype}")
    offsets_a = check_offsets("offsets_a", offsets_a, total=values_a.shape[0])
    offsets_b = check_offsets("offsets_b", offsets_b, total=values_b.shape[0])
    if offsets_a.numel() != offsets_b.numel():
        raise ValueError(f"offsets_a has {offsets_a.numel()} entries but offsets_b has {offsets_b.numel()}")
    check_same_device("values_a", values_a, values_b=values_b, offsets_a=offsets_a, offsets_b=offsets_b)
    return values_a, offsets_a, values_b, offsets_b.to(offsets_a.dtype)


def concat_2d_jagged(
    values_a: torch.Tensor, offsets_a: torch.Tensor, values_b: torch.Tensor, offsets_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence b: [a_b; b_b]. Returns (values, offsets) with offsets = offsets_a + offsets_b."""
    return reference.concat_2d_jagged_reference(*_check_pair(values_a, offsets_a, values_b, offsets_b))


def split_2d_jagged(
    values: torch.Tensor, offsets_a: torch.Tensor, offsets_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``concat_2d_jagged``: splits each sequence into its first len_a rows and the remaining len_b."""
    values = _check_values("values", values)
    offsets_a = check_offsets("offsets_a", offsets_a)
    offsets_b = check_offsets("offsets_b", offsets_b)
    if offsets_a.numel() != offsets_b.numel():
        raise ValueError(f"offsets_a has {offsets_a.numel()} entries but offsets_b has {offsets_b.numel()}")
    check_same_device("values", values, offsets_a=offsets_a, offsets_b=offsets_b)
    if values_are_concrete(offsets_a, offsets_b):
        expected = int(offsets_a[-1]) + int(offsets_b[-1])
        if values.shape[0] != expected:
            raise ValueError(f"values has {values.shape[0]} rows but offsets_a[-1] + offsets_b[-1] = {expected}")
    return reference.split_2d_jagged_reference(values, offsets_a, offsets_b.to(offsets_a.dtype))


def candidate_mask(seq_offsets: torch.Tensor, num_candidates: torch.Tensor) -> torch.Tensor:
    """Bool (T,) marking the last num_candidates[b] rows of every sequence b (the ranking candidates)."""
    seq_offsets = check_offsets("seq_offsets", seq_offsets)
    num_candidates = check_index_tensor("num_candidates", num_candidates, length=seq_offsets.numel() - 1)
    check_same_device("seq_offsets", seq_offsets, num_candidates=num_candidates)
    if values_are_concrete(seq_offsets, num_candidates) and num_candidates.numel():
        lengths = lengths_of(seq_offsets).cpu()
        nc = num_candidates.cpu()
        if bool((nc < 0).any()) or bool((nc.to(lengths.dtype) > lengths).any()):
            raise ValueError("num_candidates must be in [0, sequence length] for every sequence")
    total = int(seq_offsets[-1])
    return reference.candidate_mask_reference(seq_offsets, num_candidates, total)


def sequence_positions(seq_offsets: torch.Tensor) -> torch.Tensor:
    """Position of every row inside its sequence, (T,) int64."""
    seq_offsets = check_offsets("seq_offsets", seq_offsets)
    return reference.sequence_ids_and_positions(seq_offsets, int(seq_offsets[-1]))[1]
