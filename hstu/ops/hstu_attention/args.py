"""``AttentionArgs``: the tensors and settings of one attention call, as the op's internals pass them around.

The public ``hstu_attention(...)`` takes keywords and the ``torch.library`` custom ops take a flat schema; between
them (validation, dispatch, the CUDA binding, the PyTorch reference, the autograd context) a call travels as one
``AttentionArgs``. Its fields are in the forward custom op's schema order, so ``AttentionArgs._make(inputs)`` reads
the op's inputs, ``op(*args)`` calls it, and a per-input tuple such as autograd's ``needs_input_grad`` is read at
``AttentionArgs._fields.index(name)``.

After the dispatcher's checks (``hstu.ops.hstu_attention.op``): q, k, v contiguous (T, H, D) of one dtype;
seq_offsets int32 (B+1,); num_contexts / num_targets None or int32 (B,); scaling_seqlen resolved (an int >= 1);
alpha and dropout_p floats; dropout_seed the int the call drew (0 without dropout). The PyTorch reference also
accepts unchecked values (scaling_seqlen None: max_seqlen).

The ``rab_*`` fields are the relative bias given as weight tables (``rab_tables.RelativeBiasTables``, flattened:
the custom ops' schema takes tensors and scalars); they are None (and rab_time_reference "query") without tables,
and exclusive with the dense ``rab``. ``tables()`` gathers them back.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from hstu.ops.hstu_attention.rab_tables import DEFAULT_TIME_DIVISOR, RelativeBiasTables


class AttentionArgs(NamedTuple):
    q: torch.Tensor  # (T, H, Dqk)
    k: torch.Tensor  # (T, H, Dqk)
    v: torch.Tensor  # (T, H, Dv)
    seq_offsets: torch.Tensor  # (B+1,) jagged offsets
    max_seqlen: int
    alpha: float
    scaling_seqlen: Optional[int]  # N, the divisor of the SiLU weights
    causal: bool = True
    window_size: int = -1
    num_contexts: Optional[torch.Tensor] = None  # (B,)
    num_targets: Optional[torch.Tensor] = None  # (B,)
    target_group_size: int = 1
    rab: Optional[torch.Tensor] = None  # (B, H or 1, >=max_seqlen, >=max_seqlen)
    dropout_p: float = 0.0
    dropout_seed: int = 0
    deterministic: bool = False  # the backward without atomics
    rab_position_weights: Optional[torch.Tensor] = None  # (2M-1,) or (H, 2M-1)
    rab_time_weights: Optional[torch.Tensor] = None  # (K+1,) or (H, K+1)
    rab_timestamps: Optional[torch.Tensor] = None  # (T,) int64 seconds
    rab_next_timestamps: Optional[torch.Tensor] = None  # (B,) int64, time reference "next" only
    rab_shared_positions: Optional[torch.Tensor] = None  # (B,) trailing tokens sharing one position
    rab_time_reference: str = "query"
    rab_time_divisor: float = DEFAULT_TIME_DIVISOR

    def has_tables(self) -> bool:
        return self.rab_position_weights is not None or self.rab_time_weights is not None

    def tables(self) -> Optional[RelativeBiasTables]:
        """The bias tables of this call, or None."""
        if not self.has_tables():
            return None
        return RelativeBiasTables(self.rab_position_weights, self.rab_time_weights, self.rab_timestamps,
                                  self.rab_time_reference, self.rab_next_timestamps, self.rab_shared_positions,
                                  self.rab_time_divisor)  # fmt: skip

    def tensors(self) -> tuple[Optional[torch.Tensor], ...]:
        """The tensor fields, in the order ``with_tensors`` takes them: q, k, v, seq_offsets, num_contexts,
        num_targets, rab, then the rab_* table tensors in field order."""
        return (self.q, self.k, self.v, self.seq_offsets, self.num_contexts, self.num_targets, self.rab,
                self.rab_position_weights, self.rab_time_weights, self.rab_timestamps, self.rab_next_timestamps,
                self.rab_shared_positions)  # fmt: skip

    def settings(self) -> AttentionArgs:
        """These arguments with every tensor field None (what an autograd context keeps beside its saved tensors)."""
        # (_make: a tuple built in place, cheaper per call than the keyword-capable constructor)
        return AttentionArgs._make((None, None, None, None, self.max_seqlen, self.alpha, self.scaling_seqlen,
                                    self.causal, self.window_size, None, None, self.target_group_size, None,
                                    self.dropout_p, self.dropout_seed, self.deterministic, None, None, None, None, None,
                                    self.rab_time_reference, self.rab_time_divisor))  # fmt: skip

    def with_tensors(self, tensors: tuple[Optional[torch.Tensor], ...]) -> AttentionArgs:
        """These settings with the tensor fields from ``tensors`` (in ``tensors()`` order)."""
        q, k, v, seq_offsets, num_contexts, num_targets, rab, *table_tensors = tensors
        return AttentionArgs._make((q, k, v, seq_offsets, self.max_seqlen, self.alpha, self.scaling_seqlen,
                                    self.causal, self.window_size, num_contexts, num_targets, self.target_group_size,
                                    rab, self.dropout_p, self.dropout_seed, self.deterministic, *table_tensors,
                                    self.rab_time_reference, self.rab_time_divisor))  # fmt: skip
