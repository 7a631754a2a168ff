"""Binding of the fused CUDA HSTU attention kernels (csrc/hstu_attention) to the dispatcher.

The dispatcher (``hstu.ops.hstu_attention.op``) has already validated and normalised every argument:
q, k, v contiguous (T, H, D) of one dtype on one CUDA device; seq_offsets contiguous int32 (B+1,);
num_contexts / num_targets None or contiguous int32 (B,); rab None or (B, H or 1, >=max_seqlen, >=max_seqlen)
with unit stride in the last dim. ``scaling_seqlen`` is already resolved (never None).
"""

from __future__ import annotations

from typing import Optional

import torch

from hstu.ops._extension import load_extension


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: Optional[torch.Tensor], dropout_p: float
) -> Optional[str]:
    """None when the fused kernel handles this configuration, else a short human-readable reason."""
    if load_extension() is None:
        return "the hstu CUDA extension is not built"
    return "the fused HSTU attention kernel is not available in this build"


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    window_size: int,
    num_contexts: Optional[torch.Tensor],
    num_targets: Optional[torch.Tensor],
    target_group_size: int,
    rab: Optional[torch.Tensor],
    dropout_p: float,
    dropout_seed: int,
) -> torch.Tensor:
    raise NotImplementedError


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    window_size: int,
    num_contexts: Optional[torch.Tensor],
    num_targets: Optional[torch.Tensor],
    target_group_size: int,
    rab: Optional[torch.Tensor],
    rab_needs_grad: bool,
    dropout_p: float,
    dropout_seed: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns dq, dk, dv and drab (shaped like rab, or None when rab_needs_grad is False)."""
    raise NotImplementedError
