"""Named errors of the inference path. All are ValueErrors: a bad request or an unusable model, never a crash."""

from __future__ import annotations


class InferenceError(ValueError):
    """Base class of the inference path's errors; the message names the user, argument or file."""


class UnknownUserError(InferenceError):
    """A user with no cache (never appended, or evicted under the memory budget)."""


class SequenceTooLongError(InferenceError):
    """An append or a request that would take a user's token sequence past the model's maximum."""


class InvalidRequestError(InferenceError):
    """Malformed request data: ids outside their embedding table, mismatched lengths, wrong dtypes."""


class CacheBudgetError(InferenceError):
    """One request's caches alone do not fit the cache's byte budget."""


class UnsupportedModelError(InferenceError):
    """A model configuration or checkpoint the cached inference path cannot serve exactly."""
