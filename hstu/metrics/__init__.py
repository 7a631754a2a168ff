"""Evaluation metrics, correct under data parallelism (sums reduced across ranks before dividing)."""

from hstu.metrics.ranking import RankingMetrics, grouped_auc
from hstu.metrics.retrieval import RetrievalMetrics, seen_item_mask, target_ranks
from hstu.metrics.undefined import UndefinedMetricWarning

__all__ = ["RankingMetrics", "RetrievalMetrics", "UndefinedMetricWarning", "grouped_auc", "seen_item_mask",
           "target_ranks"]
