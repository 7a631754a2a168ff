"""Streaming readers for the raw delimited text files.

Large logs (KuaiRand-27K has hundreds of millions of rows) are read in blocks of bytes cut at line boundaries
and parsed by ``numpy.loadtxt`` (C speed, no per-row Python objects). Validation is cheap on the fast path
(one delimiter count per block); only when a block is bad is it rescanned line by line, to name the exact line.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from hstu.data.errors import DataFormatError

DEFAULT_BLOCK_BYTES = 16 << 20
_EMPTY_LINE = re.compile("\n(?=\n)")


@dataclass
class NumericBlock:
    """Parsed columns of consecutive lines; ``first_line`` is the 1-based file line of row 0."""

    first_line: int
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def require_file(path: os.PathLike | str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFormatError(path, "required file is missing")
    return path


def read_header(path: str, delimiter: str, encoding: str = "utf-8") -> list[str]:
    with open(path, "rb") as f:
        raw = f.readline()
    if not raw.strip():
        raise DataFormatError(path, "file is empty, expected a header line", line=1)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"header is not valid {encoding}: {e.reason}", line=1) from None
    return [name.strip().lstrip("\ufeff") for name in text.strip("\r\n").split(delimiter)]


def _is_number(value: str) -> bool:
    """Whether numpy's parser reads ``value`` as a float (Python's float also takes "1_0" and non-ASCII digits)."""
    if not value.isascii() or "_" in value:
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _find_bad_line(
    path: str, text: str, delimiter: str, num_fields: int, wanted: Sequence[int], names: Sequence[str], first_line: int
) -> DataFormatError:
    for offset, line in enumerate(text.split("\n")):
        if not line:
            continue
        fields = line.split(delimiter)
        if len(fields) != num_fields:
            return DataFormatError(
                path, f"expected {num_fields} fields separated by {delimiter!r}, found {len(fields)}", first_line + offset
            )
        for index, name in zip(wanted, names):
            value = fields[index].strip()
            if not _is_number(value):
                return DataFormatError(path, f"column {name!r}: {value!r} is not a number", first_line + offset)
    return DataFormatError(path, "could not parse block", first_line)


def iter_numeric_blocks(
    path: os.PathLike | str,
    *,
    delimiter: str,
    num_fields: int,
    columns: dict[str, int],
    skip_header: bool,
    encoding: str = "utf-8",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress=None,
) -> Iterator[NumericBlock]:
    """Yield float64 columns (``name -> field index``) of a delimited numeric file, block by block.

    ``delimiter`` may have several characters (MovieLens ``::``). ``progress`` (a tqdm bar) is advanced by bytes.
    """
    path = require_file(path)
    names = list(columns)
    wanted = [columns[n] for n in names]
    single = delimiter if len(delimiter) == 1 else "\x1f"
    line_no = 1
    with open(path, "rb") as f:
        if skip_header:
            header = f.readline()
            if progress is not None:
                progress.update(len(header))
            line_no = 2
        carry = b""
        while True:
            chunk = f.read(block_bytes)
            at_eof = not chunk
            data = carry + chunk
            if not at_eof:
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                data, carry = data[: cut + 1], data[cut + 1 :]
            else:
                carry = b""
            if progress is not None:
                progress.update(len(chunk))
            if data.strip():
                yield _parse_block(path, data, delimiter, single, num_fields, wanted, names, encoding, line_no)
            line_no += data.count(b"\n")
            if at_eof:
                break


def _parse_block(path, data, delimiter, single, num_fields, wanted, names, encoding, first_line) -> NumericBlock:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = first_line + data[: e.start].count(b"\n")
        raise DataFormatError(path, f"invalid {encoding} byte sequence ({e.reason})", line) from None
    if "\r" in text:
        text = text.replace("\r", "")
    if single != delimiter:
        text = text.replace(delimiter, single)
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    blank = text.count("\n\n") + (1 if text.startswith("\n") else 0)
    if "\n\n\n" in text:  # count("\n\n") does not see overlapping pairs: count each empty line
        blank = len(_EMPTY_LINE.findall(text)) + (1 if text.startswith("\n") else 0)
    if text.count(single) != (lines - blank) * (num_fields - 1):
        raise _find_bad_line(path, text, single, num_fields, wanted, names, first_line)
    try:
        # comments=None: a "#" is not a comment marker in these files (it would silently drop or cut a row).
        table = np.loadtxt(io.StringIO(text), delimiter=single, usecols=wanted, dtype=np.float64, ndmin=2, comments=None)
    except ValueError:
        raise _find_bad_line(path, text, single, num_fields, wanted, names, first_line) from None
    return NumericBlock(first_line, {name: table[:, i] for i, name in enumerate(names)})


# Numbers are parsed as float64, which holds every integer below 2**53 exactly; a larger value may be a rounded one.
EXACT_INT_LIMIT = 1 << 53


def as_int_ids(
    path: str, block: NumericBlock, name: str, minimum: int = 0, limit: int = EXACT_INT_LIMIT, hint: str = ""
) -> np.ndarray:
    """Column ``name`` as int64, rejecting fractions and values outside ``[minimum, limit)`` with the offending line.

    ``limit`` is capped at 2**53 (above it the text may not have been parsed exactly); ``hint`` is appended to the
    message for values at or above ``limit``.
    """
    values = block.columns[name]
    limit = min(int(limit), EXACT_INT_LIMIT)
    with np.errstate(invalid="ignore"):
        inside = (values >= minimum) & (values < limit)  # also False for NaN
        ints = np.where(inside, values, minimum).astype(np.int64)
    bad = np.flatnonzero(~inside | (ints != values))
    if bad.size:
        row = int(bad[0])
        value = float(values[row])
        if math.isfinite(value) and value >= limit and value == math.floor(value):
            reason = f"id {value:.0f} is too large (ids must be < {limit}){hint}"
        else:
            reason = f"{value!r} is not an integer id >= {minimum}"
        raise DataFormatError(path, f"column {name!r}: {reason}", block.first_line + row)
    return ints
