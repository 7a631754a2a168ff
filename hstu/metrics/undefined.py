"""Metrics with an empty denominator (AUC without positives, means over zero queries) are left out, with a warning.

A left-out metric is absent from the dict ``compute`` returns (and so from metrics.jsonl): never 0, 0.5 or NaN.
The warning names the metric and why; Python's default warning filter shows each distinct message once per process.
Only the process of global rank 0 warns.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined on the evaluated data and is left out of the results."""


def warn_undefined(metrics: str, reason: str) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    warnings.warn(f"{metrics} undefined: {reason}; left out of the evaluation results", UndefinedMetricWarning,
                  stacklevel=3)
