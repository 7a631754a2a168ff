"""The jagged batch exchanged between the data pipeline and the models.

A batch holds B samples (users). Every sequence feature is stored once, jagged, in one
``KeyedJaggedTensor`` whose keys all share the same lengths:

* ``"item"``      item ids (int64), time ordered; history first, then the candidates (ranking).
* ``"action"``    per-interaction label id (int64): the KuaiRand 8-bit action mask, or the rating class
                  (ml-1m: rating-1 in 0..4, ml-20m: 2*rating-1 in 0..9); the models must never feed the
                  candidates' actions to the network, they are the labels.
* ``"timestamp"`` unix seconds (int64).

Contextual (per-user) features live in ``contextual``: one value per sample and key.
Ranking candidates are the last ``num_candidates[b]`` entries of sequence ``b``.
The last batch of an epoch is padded to the full batch size with empty samples flagged in ``is_padding``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

SEQUENCE_KEYS = ("item", "action", "timestamp")


@dataclasses.dataclass
class JaggedBatch:
    sequence: KeyedJaggedTensor
    num_candidates: torch.Tensor  # (B,) int64; zeros for retrieval
    is_padding: torch.Tensor  # (B,) bool
    max_seqlen: int  # upper bound on every sequence length in the batch (history + candidates)
    contextual: Optional[KeyedJaggedTensor] = None
    # Retrieval evaluation: the held-out next item of each sample (B,), -1 for padding samples.
    target_item: Optional[torch.Tensor] = None
    # seq_lengths / num_candidates as they were on the host before ``to(device)``: batch statistics and the jagged
    # ops' sizes without a device sync.
    host_seq_lengths: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False, compare=False)
    host_num_candidates: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return int(self.num_candidates.numel())

    @property
    def seq_lengths(self) -> torch.Tensor:
        return self.sequence.lengths()[: self.batch_size]

    @property
    def seq_offsets(self) -> torch.Tensor:
        from hstu.ops import lengths_to_offsets

        return lengths_to_offsets(self.seq_lengths, self.host_seq_lengths)

    def seq_lengths_on_host(self) -> torch.Tensor:
        """seq_lengths on the CPU: the copy kept by ``to`` or, for a batch built on the device, one transfer."""
        if self.host_seq_lengths is not None:
            return self.host_seq_lengths
        return self.seq_lengths.cpu()

    def num_candidates_on_host(self) -> torch.Tensor:
        """num_candidates on the CPU: the copy kept by ``to`` or, for a batch built on the device, one transfer."""
        if self.host_num_candidates is not None:
            return self.host_num_candidates
        return self.num_candidates.cpu()

    def labels(self) -> torch.Tensor:
        """Actions of the candidates, concatenated over samples (ranking labels)."""
        from hstu.ops import candidate_indices

        actions = self.sequence["action"].values()
        rows = candidate_indices(self.seq_offsets, self.num_candidates, host_lengths=self.seq_lengths_on_host(),
                                 host_num_candidates=self.num_candidates_on_host())  # fmt: skip
        return actions[rows]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "JaggedBatch":
        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            sequence=move(self.sequence),
            num_candidates=move(self.num_candidates),
            is_padding=move(self.is_padding),
            contextual=move(self.contextual),
            target_item=move(self.target_item),
            host_seq_lengths=self.seq_lengths_on_host(),
            host_num_candidates=self.num_candidates_on_host(),
        )

    def pin_memory(self) -> "JaggedBatch":
        def pin(x):
            return None if x is None else x.pin_memory()

        return dataclasses.replace(
            self,
            sequence=pin(self.sequence),
            num_candidates=pin(self.num_candidates),
            is_padding=pin(self.is_padding),
            contextual=pin(self.contextual),
            target_item=pin(self.target_item),
        )
