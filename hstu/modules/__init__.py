"""Building blocks of HSTU models: embeddings (sparse part), HSTU layers, encoders and pre/post-processing."""

from hstu.modules.embeddings import EmbeddingProjection, EmbeddingTableSpec, SparseEmbeddings
from hstu.modules.encoder import EncoderConfig, EncoderInputs, EncoderOutputs, HSTUEncoder
from hstu.modules.hstu_layer import HSTULayer, HSTUStack
from hstu.modules.positional import (
    PositionalEncoder,
    RelativeAttentionBias,
    log_time_buckets,
)
from hstu.modules.token_layout import TokenLayout, sequence_tokens

__all__ = [
    "EmbeddingProjection",
    "EmbeddingTableSpec",
    "EncoderConfig",
    "EncoderInputs",
    "EncoderOutputs",
    "HSTUEncoder",
    "HSTULayer",
    "HSTUStack",
    "PositionalEncoder",
    "RelativeAttentionBias",
    "SparseEmbeddings",
    "TokenLayout",
    "log_time_buckets",
    "sequence_tokens",
]
