"""Loads the compiled ``hstu._C`` CUDA extension when it was built; everything works without it."""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Optional


@functools.lru_cache(maxsize=None)
def load_extension() -> Optional[ModuleType]:
    try:
        from hstu import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def extension_available() -> bool:
    return load_extension() is not None


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One warning per distinct reason per process, so a training loop is not flooded."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
