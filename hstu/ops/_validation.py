"""Argument checks shared by every op: each problem becomes a ValueError/TypeError naming the argument.

Value checks (monotone offsets, lengths against max_seqlen, ...) read small index tensors on the host. They are
skipped while tracing with fake tensors or under torch.compile, where the values do not exist yet.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
INT64_MAX = 2**63 - 1
# The kernels address rows and sequence offsets with int32.
INT32_MAX = 2**31 - 1


def values_are_concrete(*tensors: Optional[torch.Tensor]) -> bool:
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not any(isinstance(t, FakeTensor) or (t is not None and t.device.type == "meta") for t in tensors)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, t: object, ndim: int, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_index_tensor(name: str, t: object, length: Optional[int] = None) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} must have {length} elements, got {t.numel()}")
    return t


def check_not_meta(name: str, t: torch.Tensor, op: str) -> None:
    """For ops whose output size depends on an index tensor's values, which a meta tensor does not have."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor, but {op} needs its values (they set the output size)")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}; use one device")


def check_int(name: str, value: object, minimum: Optional[int] = None, maximum: int = INT64_MAX) -> int:
    """An int (numpy integers and SymInts too, not bool) in [minimum, maximum], and always in the int64 range that
    torch sizes, index tensors and custom-op arguments hold."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        value = int(value)  # numpy integers and SymInts
    if minimum is None:
        minimum = -INT64_MAX - 1
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def index_dtype_max(dtype: torch.dtype) -> int:
    return INT32_MAX if dtype == torch.int32 else INT64_MAX


def check_fits_index_dtype(name: str, total: int, dtype: torch.dtype, what: str) -> None:
    """Offsets are returned in their inputs' index dtype: a total past its range raises instead of wrapping."""
    if total > index_dtype_max(dtype):
        kind = str(dtype).replace("torch.", "")
        hint = "; pass int64 tensors" if dtype == torch.int32 else ""
        raise ValueError(f"{name}: {what} is {total}, past the {kind} range ({index_dtype_max(dtype)}){hint}")


def check_attention_extras(q: torch.Tensor, window_size: int, alpha: object, deterministic: object) -> None:
    """The checks of hstu_attention's arguments beyond each one's type: at least one head, row and head counts the
    kernels can address, window_size -1 (none) or >= 0, a finite alpha, a bool deterministic."""
    if q.shape[1] == 0:
        raise ValueError(f"q must have at least one head, got shape {tuple(q.shape)}")
    if q.shape[0] > INT32_MAX:
        raise ValueError(f"q has {q.shape[0]} rows; at most {INT32_MAX} (int32 offsets) are supported")
    if window_size < -1:
        raise ValueError(f"window_size must be -1 (no window) or >= 0, got {window_size}")
    try:
        finite = math.isfinite(alpha)
    except OverflowError:  # an int past the float range
        finite = False
    if not finite:
        raise ValueError(f"alpha must be finite, got {alpha}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")


def check_offsets(name: str, offsets: object, total: Optional[int] = None) -> torch.Tensor:
    """offsets: 1-D int tensor with offsets[0] == 0, non-decreasing, offsets[-1] == total (when given)."""
    offsets = check_index_tensor(name, offsets)
    if offsets.numel() < 1:
        raise ValueError(f"{name} must have at least one element (B+1 entries, starting with 0)")
    if values_are_concrete(offsets):
        check_offsets_values(name, offsets.detach().cpu(), total)
    return offsets


def check_offsets_values(name: str, host: torch.Tensor, total: Optional[int] = None) -> None:
    """The value checks of ``check_offsets`` on a host copy (lets callers batch several copies into one sync)."""
    host = host.to(torch.int64)  # differences of int32 offsets can leave the int32 range
    if int(host[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(host[0])}")
    steps = host[1:] - host[:-1]
    if bool((steps < 0).any()):
        bad = int(torch.nonzero(steps < 0)[0])
        raise ValueError(
            f"{name} must be non-decreasing, but {name}[{bad + 1}]={int(host[bad + 1])} < "
            f"{name}[{bad}]={int(host[bad])}"
        )
    if total is not None and int(host[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of rows {total}, got {int(host[-1])}")


def to_host(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """int64 host copies of small index tensors with a single device-to-host transfer."""
    present = [t for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(torch.int64) for t in present]).cpu()
    pieces = iter(torch.split(flat, [t.numel() for t in present]))
    return [None if t is None else next(pieces) for t in tensors]


def lengths_of(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]
