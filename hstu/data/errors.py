"""Errors raised by the data pipeline.

Every problem with raw input surfaces as one :class:`DataFormatError` that names the file and, when it is
about a line, the 1-based line number, so that a user can open the file at the right place.
"""

from __future__ import annotations

import os
from typing import Optional


class DataFormatError(ValueError):
    """Raw or processed input is missing or malformed."""

    def __init__(self, path: os.PathLike | str, message: str, line: Optional[int] = None):
        self.path = str(path)
        self.line = line
        self.reason = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


class DownloadError(RuntimeError):
    """An archive could not be downloaded or failed its checksum."""


class OutputExistsError(DataFormatError, FileExistsError):
    """The output directory exists and replacing it was not asked for."""
