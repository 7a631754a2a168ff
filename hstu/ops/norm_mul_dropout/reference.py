"""PyTorch reference of ``dropout(LayerNorm(x) * u)`` (no argument checks: ``op.py`` validates).

Without an explicit keep mask it is, operation for operation, what ``HSTULayer.combine`` computes before the output
projection: ``F.layer_norm`` in fp32 (as autocast runs it; float64 inputs stay float64), the product with u, then ``F.dropout``; the result is
returned in x's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def layer_norm_mul_dropout_reference(
    x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dropout_p: float,
    training: bool, keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """keep: a bool (rows, d) mask of the elements dropout keeps (tests pass the kernel's); None draws one with
    ``F.dropout`` from torch's generator."""
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32 for the half types, float64 stays float64
    normed = F.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute), bias.to(compute), eps)
    gated = normed * u.to(compute)
    if training and dropout_p > 0.0:
        if keep is None:
            gated = F.dropout(gated, p=dropout_p, training=True)
        else:
            scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
            gated = torch.where(keep, gated * scale, torch.zeros_like(gated))
    return gated.to(x.dtype)
