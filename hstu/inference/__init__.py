"""Cached incremental inference (M-FALCON) of trained HSTU models: ``load_inference_model(run_dir, device=...)``,
then ``append`` events and ``rank`` candidates (ranking) or ``retrieve`` the top-K catalogue items (retrieval).
``python -m hstu.inference bench --checkpoint RUN_DIR`` measures it against the full recompute."""

from hstu.inference.errors import (
    CacheBudgetError,
    InferenceError,
    InvalidRequestError,
    SequenceTooLongError,
    UnknownUserError,
    UnsupportedModelError,
)
from hstu.inference.model import InferenceModel, UserCache, UserEvents, load_inference_model
from hstu.inference.paged_cache import PagedKVCache

__all__ = ["CacheBudgetError", "InferenceError", "InferenceModel", "InvalidRequestError", "PagedKVCache",
           "SequenceTooLongError", "UnknownUserError", "UnsupportedModelError", "UserCache", "UserEvents",
           "load_inference_model"]
