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


@functools.lru_cache(maxsize=None)
def library_registered(namespace: str, op: str) -> bool:
    """Whether the built extension registered ``torch.ops.<namespace>.<op>`` (loading hstu._C registers the
    extension's torch libraries: hstu_jagged, hstu_layer)."""
    import torch

    return load_extension() is not None and hasattr(torch.ops, namespace) and hasattr(
        getattr(torch.ops, namespace), op)


def kernels_take(namespace: str, op: str, tensors) -> bool:
    """Whether the kernels of that library take these tensors: all on a CUDA device, extension built."""
    return all(t.is_cuda for t in tensors) and library_registered(namespace, op)


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One warning per distinct reason per process, so a training loop is not flooded."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
