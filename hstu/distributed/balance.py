"""Workload balance across data-parallel ranks: Σ L² per rank and its spread.

The balancing itself lives in the data pipeline (``hstu.data.loader.balance_global_batch``, enabled with
``DatasetArgs.balance_workload``): each global batch is dealt to the DP ranks by greedy longest-processing-time on
Σ L² (attention cost grows with L²). This module measures a plan, to compare round-robin and balanced dealing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def rank_workloads(plan: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Σ L² per rank of one global batch: ``plan`` is (world_size, batch_size) sample ids, -1 = padding."""
    plan = np.asarray(plan)
    costs = np.where(plan >= 0, np.asarray(lengths, dtype=np.float64)[np.maximum(plan, 0)] ** 2, 0.0)
    return costs.sum(axis=1)


def workload_imbalance(plans: Sequence[np.ndarray], lengths: np.ndarray) -> dict[str, float]:
    """Mean over global batches of max/mean Σ L² across ranks (1.0 = perfectly balanced), and of max/min."""
    ratios_mean, ratios_min = [], []
    for plan in plans:
        work = rank_workloads(plan, lengths)
        if work.mean() > 0:
            ratios_mean.append(work.max() / work.mean())
            ratios_min.append(work.max() / max(work.min(), 1.0))
    return {"max_over_mean": float(np.mean(ratios_mean)) if ratios_mean else 1.0,
            "max_over_min": float(np.mean(ratios_min)) if ratios_min else 1.0}
