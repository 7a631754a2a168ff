"""HSTU ops: fused attention and jagged-tensor ops, each with a pure-PyTorch reference.

``hstu.ops.hstu_attention`` dispatches to the CUDA kernel when the extension is built and supports the call,
else to the reference; the jagged ops are vectorised torch, without device syncs when the caller passes the host
sizes (``host_lengths=`` ...), and ``hstu.ops.norm_mul_dropout`` fuses the layer's LayerNorm(attn) * u * dropout.
"""

from hstu.ops._extension import extension_available
from hstu.ops.hstu_attention import (
    RelativeBiasTables,
    attention_mask,
    check_attention_indices,
    hstu_attention,
    hstu_attention_reference,
)
from hstu.ops.jagged import (
    candidate_indices,
    candidate_mask,
    concat_2d_jagged,
    dense_to_jagged,
    jagged_to_padded_dense,
    lengths_to_host,
    lengths_to_offsets,
    sequence_ids_and_positions,
    sequence_positions,
    split_2d_jagged,
)

__all__ = [
    "RelativeBiasTables",
    "attention_mask",
    "candidate_indices",
    "candidate_mask",
    "check_attention_indices",
    "concat_2d_jagged",
    "dense_to_jagged",
    "extension_available",
    "hstu_attention",
    "hstu_attention_reference",
    "jagged_to_padded_dense",
    "lengths_to_host",
    "lengths_to_offsets",
    "sequence_ids_and_positions",
    "sequence_positions",
    "split_2d_jagged",
]
