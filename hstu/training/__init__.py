"""Training: gin argument groups, parallelism setup, the trainer loop, checkpoints and run logging."""

from hstu.training.config import (
    AllArgs,
    DatasetArgs,
    EmbeddingArgs,
    NetworkArgs,
    OptimizerArgs,
    ParallelismArgs,
    RankingArgs,
    RetrievalArgs,
    TrainerArgs,
    parse_gin,
)
from hstu.training.distributed import ParallelContext, parallelism_settings, setup_parallelism

__all__ = [
    "AllArgs",
    "DatasetArgs",
    "EmbeddingArgs",
    "NetworkArgs",
    "OptimizerArgs",
    "ParallelContext",
    "ParallelismArgs",
    "RankingArgs",
    "RetrievalArgs",
    "TrainerArgs",
    "parallelism_settings",
    "parse_gin",
    "setup_parallelism",
]
