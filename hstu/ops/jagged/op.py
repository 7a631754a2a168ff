"""Public jagged ops: argument checks, then the implementation (vectorised torch on every device).

Host sizes: every op that needs a size or a value check of an index tensor takes it from the caller on request
(``host_lengths=`` and the like: host copies of the lengths the batch already holds, see ``lengths_to_host``).
Given those, an op neither reads a device value nor uses an output size that depends on one, so on GPU it makes no
device-to-host sync, and it runs on meta tensors too. Without them the op reads what it needs (one sync per read).

The CUDA kernels of csrc/jagged (``cuda.py``) take the same host sizes; ``USE_CUDA_KERNELS`` switches the public
ops over to them for real tensors on a GPU once they have passed tests/ops/test_jagged_cuda.py there.
"""

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
from hstu.ops.jagged import cuda, reference

# Off until the kernels have passed their GPU tests: every op runs its PyTorch reference.
USE_CUDA_KERNELS = False


def _use_kernels(*tensors: torch.Tensor) -> bool:
    """The CUDA kernels take real tensors on a GPU (not fake or meta ones, nor a graph being compiled)."""
    return USE_CUDA_KERNELS and values_are_concrete(*tensors) and cuda.available(*tensors)


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


def _check_host_lengths(name: str, offsets: object, host_lengths: object, total: Optional[int] = None,
                        host_name: str = "host_lengths") -> int:
    """The value checks of ``offsets`` made on ``host_lengths``, a host copy of its sequence lengths, so that the
    offsets themselves are never read (on GPU a device sync); returns offsets[-1]. As in ``lengths_to_offsets``,
    the offsets are trusted to match the copy. total: the row count offsets[-1] must equal, when given; host_name:
    the argument name the errors give the copy."""
    offsets = check_index_tensor(name, offsets)
    if offsets.numel() < 1:
        raise ValueError(f"{name} must have at least one element (B+1 entries, starting with 0)")
    host = _host_counts(host_name, host_lengths, offsets.numel() - 1)
    last = _exact_sum(host)
    check_fits_index_dtype(host_name, last, offsets.dtype, f"the total length ({name}[-1])")
    if total is not None and last != total:
        raise ValueError(f"{host_name} sum to {last}, but {name}[-1] must equal the number of rows {total}")
    return last


def _host_counts(name: str, counts: object, length: int) -> torch.Tensor:
    """A caller's host copy of per-sequence counts: 1-D int32/int64 on the CPU, ``length`` entries, none negative;
    returned as int64."""
    counts = check_index_tensor(name, counts, length=length)
    if counts.device.type != "cpu":
        raise ValueError(f"{name} must be a host (CPU) tensor, got one on {counts.device}")
    host = counts.detach().to(torch.int64)
    if bool((host < 0).any()):
        raise ValueError(f"{name} must be non-negative, got minimum {int(host.min())}")
    return host


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
    if _use_kernels(values, offsets):
        return cuda.jagged_to_padded_dense(values, offsets, max_length, padding_value)
    return reference.jagged_to_padded_dense_reference(values, offsets, max_length, padding_value)


def dense_to_jagged(dense: torch.Tensor, offsets: torch.Tensor, *,
                    host_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, *D) dense -> (offsets[-1], *D) jagged, keeping the first length_b rows of each sequence.

    host_lengths: a host copy of the sequence lengths; the checks and the output size read it instead of
    ``offsets`` (no device sync).
    """
    dense = _check_values("dense", dense, min_dim=2)
    if host_lengths is None:
        offsets = check_offsets("offsets", offsets)
    else:
        total = _check_host_lengths("offsets", offsets, host_lengths)
    check_same_device("dense", dense, offsets=offsets)
    if host_lengths is None:
        check_not_meta("offsets", offsets, "dense_to_jagged")
    if offsets.numel() - 1 != dense.shape[0]:
        raise ValueError(f"offsets describes {offsets.numel() - 1} sequences but dense has batch {dense.shape[0]}")
    if host_lengths is not None:
        longest = int(host_lengths.max()) if host_lengths.numel() else 0
    elif values_are_concrete(offsets) and offsets.numel() > 1:
        longest = int(lengths_of(offsets).max())
    else:
        longest = 0
    if longest > dense.shape[1]:
        raise ValueError(f"offsets has a sequence of length {longest} > dense.shape[1]={dense.shape[1]}")
    if host_lengths is None:
        total = int(offsets[-1]) if offsets.numel() else 0
    if _use_kernels(dense, offsets):
        return cuda.dense_to_jagged(dense, offsets, total)
    return reference.dense_to_jagged_reference(dense, offsets, total)


def _check_pair(values_a, offsets_a, values_b, offsets_b, host_lengths_a=None, host_lengths_b=None):
    values_a = _check_values("values_a", values_a)
    values_b = _check_values("values_b", values_b)
    if values_a.shape[1:] != values_b.shape[1:]:
        raise ValueError(
            f"values_a rows {tuple(values_a.shape[1:])} and values_b rows {tuple(values_b.shape[1:])} differ"
        )
    if values_a.dtype != values_b.dtype:
        raise TypeError(f"values_a is {values_a.dtype} but values_b is {values_b.dtype}")
    offsets_a = _checked_offsets("offsets_a", offsets_a, values_a.shape[0], host_lengths_a, "host_lengths_a")
    offsets_b = _checked_offsets("offsets_b", offsets_b, values_b.shape[0], host_lengths_b, "host_lengths_b")
    if offsets_a.numel() != offsets_b.numel():
        raise ValueError(f"offsets_a has {offsets_a.numel()} entries but offsets_b has {offsets_b.numel()}")
    check_same_device("values_a", values_a, values_b=values_b, offsets_a=offsets_a, offsets_b=offsets_b)
    offsets_a, offsets_b = _common_offsets(offsets_a, offsets_b, values_a.shape[0] + values_b.shape[0])
    return values_a, offsets_a, values_b, offsets_b


def _checked_offsets(name: str, offsets: object, total: Optional[int], host_lengths: Optional[torch.Tensor],
                     host_name: str) -> torch.Tensor:
    """``check_offsets``, or its checks on the caller's host copy of the lengths when there is one."""
    if host_lengths is None:
        return check_offsets(name, offsets, total=total)
    _check_host_lengths(name, offsets, host_lengths, total=total, host_name=host_name)
    return offsets


def _common_offsets(offsets_a: torch.Tensor, offsets_b: torch.Tensor, total: int):
    """Both offsets in their promoted dtype (int64 if either is), which the concatenated offsets also take; raises
    when the total row count does not fit it."""
    dtype = torch.promote_types(offsets_a.dtype, offsets_b.dtype)
    check_fits_index_dtype("offsets_a, offsets_b", total, dtype, "the total row count offsets_a[-1] + offsets_b[-1]")
    return offsets_a.to(dtype), offsets_b.to(dtype)


def concat_2d_jagged(
    values_a: torch.Tensor, offsets_a: torch.Tensor, values_b: torch.Tensor, offsets_b: torch.Tensor, *,
    host_lengths_a: Optional[torch.Tensor] = None, host_lengths_b: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence b: [a_b; b_b]. Returns (values, offsets) with offsets = offsets_a + offsets_b, in the offsets'
    promoted dtype (int64 if either is int64).

    host_lengths_a / host_lengths_b: host copies of the two sides' sequence lengths; the checks read them instead
    of the offsets (with both, no device sync).
    """
    checked = _check_pair(values_a, offsets_a, values_b, offsets_b, host_lengths_a, host_lengths_b)
    if _use_kernels(*checked):
        return cuda.concat_2d_jagged(*checked)
    return reference.concat_2d_jagged_reference(*checked)


def split_2d_jagged(
    values: torch.Tensor, offsets_a: torch.Tensor, offsets_b: torch.Tensor, *,
    host_lengths_a: Optional[torch.Tensor] = None, host_lengths_b: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``concat_2d_jagged``: splits each sequence into its first len_a rows and the remaining len_b.

    host_lengths_a / host_lengths_b: host copies of the two parts' sequence lengths; the checks and the output
    sizes read them instead of the offsets (with both, no device sync).
    """
    values = _check_values("values", values)
    total_a = total_b = None
    if host_lengths_a is None:
        offsets_a = check_offsets("offsets_a", offsets_a)
    else:
        total_a = _check_host_lengths("offsets_a", offsets_a, host_lengths_a, host_name="host_lengths_a")
    if host_lengths_b is None:
        offsets_b = check_offsets("offsets_b", offsets_b)
    else:
        total_b = _check_host_lengths("offsets_b", offsets_b, host_lengths_b, host_name="host_lengths_b")
    if offsets_a.numel() != offsets_b.numel():
        raise ValueError(f"offsets_a has {offsets_a.numel()} entries but offsets_b has {offsets_b.numel()}")
    check_same_device("values", values, offsets_a=offsets_a, offsets_b=offsets_b)
    for name, offsets, total in (("offsets_a", offsets_a, total_a), ("offsets_b", offsets_b, total_b)):
        if total is None:
            check_not_meta(name, offsets, "split_2d_jagged")
    if values_are_concrete(offsets_a, offsets_b) or (total_a is not None and total_b is not None):
        if total_a is None or total_b is None:
            read_a, read_b = to_host(offsets_a[-1:] if total_a is None else None,
                                     offsets_b[-1:] if total_b is None else None)
            total_a = int(read_a[0]) if total_a is None else total_a
            total_b = int(read_b[0]) if total_b is None else total_b
        if values.shape[0] != total_a + total_b:
            raise ValueError(f"values has {values.shape[0]} rows but offsets_a[-1] + offsets_b[-1] = "
                             f"{total_a + total_b}")
    offsets_a, offsets_b = _common_offsets(offsets_a, offsets_b, values.shape[0])
    if _use_kernels(values, offsets_a, offsets_b):
        return cuda.split_2d_jagged(values, offsets_a, offsets_b, total_a, total_b)
    return reference.split_2d_jagged_reference(values, offsets_a, offsets_b, total_a, total_b)


def _candidate_counts(seq_offsets: object, num_candidates: object, host_lengths: Optional[torch.Tensor],
                      host_num_candidates: Optional[torch.Tensor], op: str) -> tuple[torch.Tensor, int, Optional[int]]:
    """The checks of ``candidate_mask`` / ``candidate_indices``: returns the offsets, the row count T and the
    candidate count (None where unchecked fake tensors leave it unread), read from the host copies where given
    (with both, no device value is read)."""
    if host_lengths is None:
        seq_offsets = check_offsets("seq_offsets", seq_offsets)
    else:
        total = _check_host_lengths("seq_offsets", seq_offsets, host_lengths)
    num_candidates = check_index_tensor("num_candidates", num_candidates, length=seq_offsets.numel() - 1)
    check_same_device("seq_offsets", seq_offsets, num_candidates=num_candidates)
    if host_num_candidates is not None:
        counts = _host_counts("host_num_candidates", host_num_candidates, num_candidates.numel())
    if host_lengths is None:
        check_not_meta("seq_offsets", seq_offsets, op)
    if host_num_candidates is None:
        check_not_meta("num_candidates", num_candidates, op)
    if host_lengths is not None and host_num_candidates is not None:
        lengths = host_lengths.to(torch.int64)
    elif values_are_concrete(seq_offsets, num_candidates):
        host_offsets, device_counts = to_host(seq_offsets if host_lengths is None else None,
                                              num_candidates if host_num_candidates is None else None)
        lengths = lengths_of(host_offsets) if host_lengths is None else host_lengths.to(torch.int64)
        counts = device_counts if host_num_candidates is None else counts
        total = int(host_offsets[-1]) if host_lengths is None else total
    else:  # fake tensors under tracing: the sizes are read from them, the values go unchecked
        return seq_offsets, int(seq_offsets[-1]) if host_lengths is None else total, None
    if bool((counts < 0).any()) or bool((counts > lengths).any()):
        raise ValueError("num_candidates must be in [0, sequence length] for every sequence")
    return seq_offsets, total, _exact_sum(counts)


def candidate_mask(seq_offsets: torch.Tensor, num_candidates: torch.Tensor, *,
                   host_lengths: Optional[torch.Tensor] = None,
                   host_num_candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool (T,) marking the last num_candidates[b] rows of every sequence b (the ranking candidates).

    host_lengths / host_num_candidates: host copies of the sequence lengths and candidate counts; the checks and
    the output size read them (with both, no device sync). Selecting rows with the mask is itself a sync on GPU
    (a nonzero): ``candidate_indices`` gives the rows as indices instead.
    """
    seq_offsets, total, _ = _candidate_counts(seq_offsets, num_candidates, host_lengths, host_num_candidates,
                                              "candidate_mask")
    return reference.candidate_mask_reference(seq_offsets, num_candidates, total)


def candidate_indices(seq_offsets: torch.Tensor, num_candidates: torch.Tensor, *,
                      host_lengths: Optional[torch.Tensor] = None,
                      host_num_candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(sum(num_candidates),) int64 ascending rows of the candidates: ``candidate_mask(...).nonzero()`` without
    the nonzero. With both host copies, no device sync (the output size is sum(host_num_candidates))."""
    seq_offsets, _, count = _candidate_counts(seq_offsets, num_candidates, host_lengths, host_num_candidates,
                                              "candidate_indices")
    if count is None:
        count = int(num_candidates.sum())
    return reference.candidate_indices_reference(seq_offsets, num_candidates, count)


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


def sequence_positions(seq_offsets: torch.Tensor, host_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Position of every row inside its sequence, (T,) int64 (host_lengths: as in ``sequence_ids_and_positions``)."""
    return sequence_ids_and_positions(seq_offsets, host_lengths)[1]
