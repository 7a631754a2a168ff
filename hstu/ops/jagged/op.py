"""Public jagged ops: argument checks, then the implementation (vectorised torch on every device)."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from hstu.ops._validation import (
    INT64_MAX,
    check_fits_index_dtype,
    check_index_tensor,
    check_int,
    check_not_meta,
    check_offsets,
    check_same_device,
    check_tensor,
    lengths_of,
    to_host,
    values_are_concrete,
)
from hstu.ops.jagged import reference


def _exact_sum(host: torch.Tensor) -> int:
    """The sum of non-negative int64 host values, exact also where an int64 sum would wrap."""
    if host.numel() == 0 or int(host.max()) <= INT64_MAX // host.numel():
        return int(host.sum())
    return sum(host.tolist())


def lengths_to_offsets(lengths: torch.Tensor, host_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) non-negative lengths -> (B+1,) offsets starting at 0, same dtype and device.

    The offsets keep the lengths' dtype: when the total length does not fit it (int32 lengths summing past
    2**31 - 1), a ValueError says so instead of returning wrapped, negative offsets; pass int64 lengths then.
    host_lengths: a host copy of ``lengths`` the caller already holds; the value checks read it instead of
    ``lengths``, which on GPU would cost a device sync.
    """
    lengths = check_index_tensor("lengths", lengths)
    if host_lengths is not None:
        host_lengths = check_index_tensor("host_lengths", host_lengths, length=lengths.numel())
    checked = lengths if host_lengths is None else host_lengths
    if values_are_concrete(checked) and checked.numel():
        host = checked.detach().to("cpu", torch.int64)
        if bool((host < 0).any()):
            raise ValueError(f"lengths must be non-negative, got minimum {int(host.min())}")
        check_fits_index_dtype("lengths", _exact_sum(host), lengths.dtype, "the total length (offsets[-1])")
    return reference.lengths_to_offsets_reference(lengths)


def _check_values(name: str, values: object, min_dim: int = 1) -> torch.Tensor:
    values = check_tensor(name, values)
    if values.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(values.shape)}")
    return values


def _check_padding(padding_value: object, dtype: torch.dtype) -> object:
    """A real number that values of `dtype` hold exactly (any real for floating dtypes, where it rounds)."""
    if isinstance(padding_value, torch.Tensor) or not isinstance(padding_value, numbers.Real):
        raise TypeError(f"padding_value must be a real number, got {type(padding_value).__name__}")
    if dtype.is_floating_point or dtype.is_complex:
        try:
            return float(padding_value)
        except OverflowError:  # an int past the float range
            raise ValueError(f"padding_value {padding_value} is past the float range") from None
    if dtype == torch.bool:
        if padding_value not in (0, 1):
            raise ValueError(f"padding_value must be 0 or 1 for bool values, got {padding_value!r}")
        return bool(padding_value)
    info = torch.iinfo(dtype)
    integral = math.isfinite(padding_value) and padding_value == int(padding_value)
    if not (integral and info.min <= padding_value <= info.max):
        raise ValueError(f"padding_value {padding_value!r} is not a {str(dtype).replace('torch.', '')} value")
    return int(padding_value)


def lengths_to_host(*lengths: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """int64 host copies of 1-D index tensors (lengths, counts) in one device-to-host transfer; None stays None.

    The ``host_lengths`` the other ops take: a caller copies the batch's lengths once and no op reads them again.
    """
    for index, t in enumerate(lengths):
        if t is not None:
            check_index_tensor(f"lengths[{index}]", t)
    return to_host(*lengths)


def _check_host_lengths(name: str, offsets: object, host_lengths: object, total: Optional[int] = None) -> int:
    """The value checks of ``offsets`` made on ``host_lengths``, a host copy of its sequence lengths, so that the
    offsets themselves are never read (on GPU a device sync); returns offsets[-1]. As in ``lengths_to_offsets``,
    the offsets are trusted to match the copy. total: the row count offsets[-1] must equal, when given."""
    offsets = check_index_tensor(name, offsets)
    if offsets.numel() < 1:
        raise ValueError(f"{name} must have at least one element (B+1 entries, starting with 0)")
    host_lengths = check_index_tensor("host_lengths", host_lengths, length=offsets.numel() - 1)
    host = host_lengths.detach().to("cpu", torch.int64)
    if bool((host < 0).any()):
        raise ValueError(f"host_lengths must be non-negative, got minimum {int(host.min())}")
    last = _exact_sum(host)
    check_fits_index_dtype("host_lengths", last, offsets.dtype, f"the total length ({name}[-1])")
    if total is not None and last != total:
        raise ValueError(f"host_lengths sum to {last}, but {name}[-1] must equal the number of rows {total}")
    return last


def jagged_to_padded_dense(
    values: torch.Tensor, offsets: torch.Tensor, max_length: int, padding_value: float = 0.0, *,
    host_lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(T, *D) jagged -> (B, max_length, *D) dense; sequences longer than max_length keep their first rows.

    padding_value: a real number; for integer and bool values it must be one of their values.
    host_lengths: a host copy of the sequence lengths the caller already holds; the checks read it instead of
    ``offsets``, which on GPU would cost a device sync.
    """
    values = _check_values("values", values)
    if host_lengths is None:
        offsets = check_offsets("offsets", offsets, total=values.shape[0])
    else:
        _check_host_lengths("offsets", offsets, host_lengths, total=values.shape[0])
    check_same_device("values", values, offsets=offsets)
    max_length = check_int("max_length", max_length, minimum=0)
    padding_value = _check_padding(padding_value, values.dtype)
    # Sizes, strides and byte counts are int64 (torch counts an empty dimension as 1 in the strides); the padded
    # buffer has one spare row.
    extent = math.prod(max(size, 1) for size in (offsets.numel() - 1, max_length, *values.shape[1:]))
    if (extent + math.prod(values.shape[1:])) * values.element_size() > INT64_MAX:
        raise ValueError(f"max_length={max_length} is too large: the padded tensor's size would pass the int64 range")
    return reference.jagged_to_padded_dense_reference(values, offsets, max_length, padding_value)


def dense_to_jagged(dense: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(B, N, *D) dense -> (offsets[-1], *D) jagged, keeping the first length_b rows of each sequence."""
    dense = _check_values("dense", dense, min_dim=2)
    offsets = check_offsets("offsets", offsets)
    check_same_device("dense", dense, offsets=offsets)
    check_not_meta("offsets", offsets, "dense_to_jagged")
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
    offsets_a, offsets_b = _common_offsets(offsets_a, offsets_b, values_a.shape[0] + values_b.shape[0])
    return values_a, offsets_a, values_b, offsets_b


def _common_offsets(offsets_a: torch.Tensor, offsets_b: torch.Tensor, total: int):
    """Both offsets in their promoted dtype (int64 if either is), which the concatenated offsets also take; raises
    when the total row count does not fit it."""
    dtype = torch.promote_types(offsets_a.dtype, offsets_b.dtype)
    check_fits_index_dtype("offsets_a, offsets_b", total, dtype, "the total row count offsets_a[-1] + offsets_b[-1]")
    return offsets_a.to(dtype), offsets_b.to(dtype)


def concat_2d_jagged(
    values_a: torch.Tensor, offsets_a: torch.Tensor, values_b: torch.Tensor, offsets_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence b: [a_b; b_b]. Returns (values, offsets) with offsets = offsets_a + offsets_b, in the offsets'
    promoted dtype (int64 if either is int64)."""
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
    check_not_meta("offsets_a", offsets_a, "split_2d_jagged")
    if values_are_concrete(offsets_a, offsets_b):
        expected = int(offsets_a[-1]) + int(offsets_b[-1])
        if values.shape[0] != expected:
            raise ValueError(f"values has {values.shape[0]} rows but offsets_a[-1] + offsets_b[-1] = {expected}")
    return reference.split_2d_jagged_reference(values, *_common_offsets(offsets_a, offsets_b, values.shape[0]))


def candidate_mask(seq_offsets: torch.Tensor, num_candidates: torch.Tensor) -> torch.Tensor:
    """Bool (T,) marking the last num_candidates[b] rows of every sequence b (the ranking candidates)."""
    seq_offsets = check_offsets("seq_offsets", seq_offsets)
    num_candidates = check_index_tensor("num_candidates", num_candidates, length=seq_offsets.numel() - 1)
    check_same_device("seq_offsets", seq_offsets, num_candidates=num_candidates)
    check_not_meta("seq_offsets", seq_offsets, "candidate_mask")
    if values_are_concrete(seq_offsets, num_candidates) and num_candidates.numel():
        lengths = lengths_of(seq_offsets).cpu().to(torch.int64)
        nc = num_candidates.cpu().to(torch.int64)
        if bool((nc < 0).any()) or bool((nc > lengths).any()):
            raise ValueError("num_candidates must be in [0, sequence length] for every sequence")
    total = int(seq_offsets[-1])
    return reference.candidate_mask_reference(seq_offsets, num_candidates, total)


def sequence_ids_and_positions(
    seq_offsets: torch.Tensor, host_lengths: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of a jagged tensor: the sequence it belongs to and its position inside it, both (T,) int64.

    host_lengths: a host copy of the sequence lengths the caller already holds; the checks and the output size read
    it instead of ``seq_offsets``, which on GPU would cost a device sync.
    """
    if host_lengths is None:
        seq_offsets = check_offsets("seq_offsets", seq_offsets)
        check_not_meta("seq_offsets", seq_offsets, "sequence_ids_and_positions")
        total = int(seq_offsets[-1])
    else:
        total = _check_host_lengths("seq_offsets", seq_offsets, host_lengths)
    return reference.sequence_ids_and_positions(seq_offsets, total)


def sequence_positions(seq_offsets: torch.Tensor) -> torch.Tensor:
    """Position of every row inside its sequence, (T,) int64."""
    return sequence_ids_and_positions(seq_offsets)[1]
