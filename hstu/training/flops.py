"""Model FLOPs per training step, for achieved TFLOP/s (FlashAttention convention for the attention), and the dense
bf16 peak of the card that MFU is measured against.

Per layer, T tokens, width D, H heads, head dims dqk/dv, Σ L² over sequences:
  linears  fwd = 2·T·D·H·(2dv + 2dqk) + 2·T·H·dv·D         (backward 2× forward)
  attention fwd = 2·Σ L²·H·(dqk + dv) · ½ (causal)         (backward 2.5× forward)
plus the retrieval loss (P queries against 1 + M candidates, 2·P·(M+1)·D, backward 2×) or the ranking MLP head,
plus the embedding-width projections of models whose tables are narrower or wider than D (each projected row
through Linear(w, D) -> ReLU -> Linear(D, D): 2·rows·(w·D + D·D), backward 2× as the tables are trained).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from hstu.modules.encoder import EncoderConfig

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor's data sheets, by a pattern of
# torch.cuda.get_device_name(); first match wins.
DENSE_BF16_PEAK_TFLOPS = (
    (r"GH200|H200", 989.4),
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100|H800", 989.4),
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.1),
    (r"A10G", 70.0),
    (r"\bL4\b", 121.0),
)


def train_step_flops(config: EncoderConfig, num_tokens: int, sum_squared_lengths: int, head_flops_fwd: float = 0.0,
                     input_flops_fwd: float = 0.0) -> float:
    """Forward + backward FLOPs of one step; ``head_flops_fwd`` / ``input_flops_fwd``: forward FLOPs of the loss
    head and of the input projections (:func:`input_projection_flops`), whose backward costs twice their forward."""
    c = config
    linear = 2.0 * num_tokens * c.embedding_dim * c.num_heads * (2 * c.v_dim + 2 * c.qk_dim)
    linear += 2.0 * num_tokens * c.num_heads * c.v_dim * c.embedding_dim
    attention = 2.0 * sum_squared_lengths * c.num_heads * (c.qk_dim + c.v_dim) * 0.5
    return c.num_layers * (3.0 * linear + 3.5 * attention) + 3.0 * (head_flops_fwd + input_flops_fwd)


def _linear_flops(module: nn.Module, rows: int) -> float:
    return 2.0 * rows * sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def input_projection_flops(model: nn.Module, batch) -> float:
    """Forward FLOPs of a model's embedding-width projections for ``batch``: every item and action row (one per
    event, candidates included) through ``model.item_projection``, one row per sample and contextual feature through
    ``model.contextual_projection``; 0 for a model without them. Reads sizes only (no device sync)."""
    total = 0.0
    item = getattr(model, "item_projection", None)
    if item is not None:
        total += _linear_flops(item, sum(batch.sequence[k].values().numel() for k in ("item", "action")))
    contextual = getattr(model, "contextual_projection", None)
    if contextual is not None:
        total += _linear_flops(contextual, sum(batch.contextual[k].values().numel() for k in model.contextual_keys))
    return total


def peak_for_name(name: str) -> Optional[float]:
    """The dense bf16 peak (TFLOP/s) of a card named ``name``, or None when the table does not know it."""
    for pattern, peak in DENSE_BF16_PEAK_TFLOPS:
        if re.search(pattern, name):
            return peak
    return None


def device_peak(device: torch.device, override: Optional[float] = None) -> tuple[str, Optional[float]]:
    """(card name, dense bf16 peak in TFLOP/s) of a CUDA device; ``override`` (TrainerArgs.peak_tflops) wins.
    The peak is None on CPU and for cards the table does not know."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, override if override is not None else peak_for_name(name)
