"""What the retrieval and ranking models share: the step result and the sparse features of a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from hstu.data.batch import JaggedBatch
from hstu.modules.embeddings import SparseEmbeddings


@dataclass
class StepOutput:
    loss: torch.Tensor
    num_tokens: int  # tokens through the HSTU layers
    sum_squared_lengths: int  # Σ L² of the token sequences (attention FLOPs)
    extras: dict


def sparse_features(embeddings: SparseEmbeddings, batch: JaggedBatch, sequence_keys: Sequence[str],
                    contextual_keys: Sequence[str]):
    """The KJT of a batch restricted to the features the model has tables for."""
    ids = {}
    lengths = batch.seq_lengths
    for key in sequence_keys:
        ids[key] = (batch.sequence[key].values(), lengths)
    if contextual_keys:
        if batch.contextual is None:
            raise ValueError(f"the model uses contextual features {list(contextual_keys)} but the batch has none")
        for key in contextual_keys:
            jagged = batch.contextual[key]
            ids[key] = (jagged.values(), jagged.lengths())
    return embeddings.make_features(ids)


def interleave_contextual(values: dict[str, torch.Tensor], keys: Sequence[str], batch_size: int) -> Optional[torch.Tensor]:
    """(B*C, D) contextual embeddings, sample-major (all features of sample 0, then sample 1, ...)."""
    if not keys:
        return None
    stacked = torch.stack([values[k] for k in keys], dim=1)  # (B, C, D): one value per sample and feature
    return stacked.reshape(batch_size * len(keys), -1)
