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
from hstu.training.distributed import ParallelContext, setup_parallelism, unwrap_model, wrap_model

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
    "parse_gin",
    "setup_parallelism",
    "unwrap_model",
    "wrap_model",
]
