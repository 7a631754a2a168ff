"""HSTU retrieval and ranking models and their losses."""

from hstu.models.common import StepOutput
from hstu.models.losses import MultiTaskLoss, SampledSoftmaxLoss, bitmask_to_labels
from hstu.models.ranking import MLPHead, RankingModel
from hstu.models.retrieval import RetrievalModel

__all__ = ["MLPHead", "MultiTaskLoss", "RankingModel", "RetrievalModel", "SampledSoftmaxLoss", "StepOutput",
           "bitmask_to_labels"]
