from hstu.ops.jagged.op import (
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
    "candidate_indices",
    "candidate_mask",
    "concat_2d_jagged",
    "dense_to_jagged",
    "jagged_to_padded_dense",
    "lengths_to_host",
    "lengths_to_offsets",
    "sequence_ids_and_positions",
    "sequence_positions",
    "split_2d_jagged",
]
