"""Cached incremental inference (M-FALCON) of trained HSTU models: ``load_inference_model(run_dir)``, then
``append`` events and ``rank`` candidates (ranking) or ``retrieve`` the top-K catalogue items (retrieval).
``python -m hstu.inference bench --checkpoint RUN_DIR`` measures it against the full recompute."""

from hstu.inference.cache import KVCache, UserCache
from hstu.inference.errors import (
    CacheBudgetError,
    InferenceError,
    InvalidRequestError,
    SequenceTooLongError,
    UnknownUserError,
    UnsupportedModelError,
)
from hstu.inference.model import InferenceModel, UserEvents, load_inference_model

__all__ = ["CacheBudgetError", "InferenceError", "InferenceModel", "InvalidRequestError", "KVCache",
           "SequenceTooLongError", "UnknownUserError", "UnsupportedModelError", "UserCache", "UserEvents",
           "load_inference_model"]
