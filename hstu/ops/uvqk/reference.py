"""PyTorch reference of the HSTU layer's input side (no argument checks: ``op.py`` validates).

Operation for operation what ``HSTULayer.project`` computes: ``F.layer_norm``, ``F.linear`` with the projection's
weight and bias, ``F.silu``, then the split of the output into u, v, q, k; under autocast each op runs as autocast
runs it (the LayerNorm in fp32, the projection in the autocast dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_uvqk(projected: torch.Tensor, num_heads: int, qk_dim: int, v_dim: int):
    """(T, H (2 Dv + 2 Dqk)) laid out head by head ([u_h | v_h | q_h | k_h] for every head h) -> u as (T, H Dv),
    v as (T, H, Dv), q and k as (T, H, Dqk) (views where the layout allows)."""
    per_head = projected.view(-1, num_heads, 2 * v_dim + 2 * qk_dim)
    u, v, q, k = per_head.split([v_dim, v_dim, qk_dim, qk_dim], dim=-1)
    return u.reshape(-1, num_heads * v_dim), v, q, k


def uvqk_projection_reference(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    num_heads: int, qk_dim: int, v_dim: int, eps: float,
):
    """(u, v, q, k) = split(SiLU(LayerNorm(x; norm_weight, norm_bias, eps) @ weight^T + bias))."""
    normed = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return split_uvqk(F.silu(F.linear(normed, weight, bias)), num_heads, qk_dim, v_dim)
