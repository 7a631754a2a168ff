"""Model FLOPs per training step, for achieved TFLOP/s (FlashAttention convention for the attention).

Per layer, T tokens, width D, H heads, head dims dqk/dv, Σ L² over sequences:
  linears  fwd = 2·T·D·H·(2dv + 2dqk) + 2·T·H·dv·D         (backward 2× forward)
  attention fwd = 2·Σ L²·H·(dqk + dv) · ½ (causal)         (backward 2.5× forward)
plus the retrieval loss (P queries against 1 + M candidates, 2·P·(M+1)·D, backward 2×) or the ranking MLP head.
"""

from __future__ import annotations

from hstu.modules.encoder import EncoderConfig


def train_step_flops(config: EncoderConfig, num_tokens: int, sum_squared_lengths: int, head_flops_fwd: float = 0.0) -> float:
    c = config
    linear = 2.0 * num_tokens * c.embedding_dim * c.num_heads * (2 * c.v_dim + 2 * c.qk_dim)
    linear += 2.0 * num_tokens * c.num_heads * c.v_dim * c.embedding_dim
    attention = 2.0 * sum_squared_lengths * c.num_heads * (c.qk_dim + c.v_dim) * 0.5
    return c.num_layers * (3.0 * linear + 3.5 * attention) + 3.0 * head_flops_fwd
