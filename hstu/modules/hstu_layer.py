"""The HSTU layer (Zhai et al. 2024) on jagged tokens, and a stack of them.

    normed = LayerNorm(x)
    u, v, q, k = split(SiLU(uvqk_proj(normed)))           # per head
    attn = hstu_attention(q, k, v, alpha=1/sqrt(d_qk))    # SiLU-weighted, causal + context/target masks
                                                          # (or full attention when AttentionInputs.causal is False)
    y = output_proj(dropout(LayerNorm(attn) * u))
    return x + y

Tensor-parallel friendliness: ``uvqk_proj`` lays its output out head by head ([u_h | v_h | q_h | k_h] for every
head h), so splitting its output features into contiguous chunks (Megatron column parallel) gives every rank whole
heads; ``output_proj`` consumes heads in the same order (row parallel). Both are plain ``nn.Linear`` modules.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hstu.modules.attention_backends import reference_attention, triton_attention
from hstu.ops import hstu_attention
from hstu.ops.norm_mul_dropout import layer_norm_mul_dropout


@dataclass
class AttentionInputs:
    """What every layer of one forward shares: jagged layout, masks and the relative bias inputs."""

    seq_offsets: torch.Tensor  # (B+1,)
    max_seqlen: int  # the longest sequence in this batch (tokens)
    num_contexts: Optional[torch.Tensor] = None  # (B,)
    num_targets: Optional[torch.Tensor] = None  # (B,)
    # The relative attention bias's inputs, taken by hstu_attention(rab_tables=...) as they are:
    timestamps: Optional[torch.Tensor] = None  # (T,) int token times (the bias's time weights)
    next_timestamps: Optional[torch.Tensor] = None  # (B,) the time after each sequence (time reference "next")
    shared_positions: Optional[torch.Tensor] = None  # (B,) trailing tokens sharing one position (ranking candidates)
    # ... or as dense matrices, which the layers turn into a dense (B, 1, N, N) bias (either one given: this form)
    time_buckets: Optional[torch.Tensor] = None  # (B, N, N) for the relative attention bias
    relative_positions: Optional[torch.Tensor] = None  # (B, N, N) pos_i - pos_j when not token distances
    causal: bool = True  # False: every token sees its whole sequence (num_contexts / num_targets then play no part)
    attention_backend: str = "fused"  # hstu.modules.attention_backends.ATTENTION_BACKENDS
    num_contextual: int = 0  # contextual tokens at the start of every sequence (the triton backend takes the count)


class HSTULayer(nn.Module):
    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        *,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        alpha: Optional[float] = None,
        scaling_seqlen: Optional[int] = None,
        target_group_size: int = 1,
        layer_norm_eps: float = 1e-6,
        relative_attention_bias: Optional[nn.Module] = None,
        recompute: bool = False,
    ):
        super().__init__()
        self.embedding_dim, self.num_heads, self.qk_dim, self.v_dim = embedding_dim, num_heads, qk_dim, v_dim
        self.alpha = 1.0 / math.sqrt(qk_dim) if alpha is None else float(alpha)
        self.scaling_seqlen = scaling_seqlen
        self.target_group_size = target_group_size
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.recompute = recompute
        self.deterministic = False  # reproducible attention backward (set by the trainer)
        self.input_norm = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.uvqk_proj = nn.Linear(embedding_dim, num_heads * (2 * v_dim + 2 * qk_dim), bias=True)
        self.attention_norm = nn.LayerNorm(num_heads * v_dim, eps=layer_norm_eps)
        self.output_proj = nn.Linear(num_heads * v_dim, embedding_dim, bias=False)
        self.relative_attention_bias = relative_attention_bias
        # Meta's reference initialises the fused u|v|q|k weight with N(0, 0.02) and the output with Xavier.
        nn.init.normal_(self.uvqk_proj.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.uvqk_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)

    def split_uvqk(self, projected: torch.Tensor):
        per_head = projected.view(-1, self.num_heads, 2 * self.v_dim + 2 * self.qk_dim)
        u, v, q, k = per_head.split([self.v_dim, self.v_dim, self.qk_dim, self.qk_dim], dim=-1)
        return u.reshape(-1, self.num_heads * self.v_dim), v, q, k

    def project(self, x: torch.Tensor):
        """The layer's input side: (u, v, q, k) of the tokens x, u as (T, H * Dv), v / q / k as (T, H, D)."""
        return self.split_uvqk(F.silu(self.uvqk_proj(self.input_norm(x))))

    def combine(self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The layer's output side: x + output_proj(dropout(LayerNorm(attn) * u)) for the attention output attn.

        LayerNorm, product and dropout are one op (``layer_norm_mul_dropout``: fused kernels on CUDA, in u's dtype;
        elsewhere the same composition as torch's LayerNorm, product and F.dropout, bit for bit)."""
        attn = attn.reshape(-1, self.num_heads * self.v_dim)
        norm = self.attention_norm
        gated = layer_norm_mul_dropout(attn.to(u.dtype), u, norm.weight, norm.bias, eps=norm.eps,
                                       dropout_p=self.dropout, training=self.training)  # fmt: skip
        return x + self.output_proj(gated)

    def _forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        u, v, q, k = self.project(x)
        return self.combine(x, layer_attention(self, q, k, v, inputs), u)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG, so dropout masks match in the recomputation.
            return checkpoint(self._forward, x, inputs, use_reentrant=False)
        return self._forward(x, inputs)


def layer_attention(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    inputs: AttentionInputs) -> torch.Tensor:
    """The attention step of an HSTU layer (``HSTULayer`` or its tensor-parallel twin, which holds the same
    attributes): relative bias from the batch's timestamps and positions (as weight tables; as a dense bias when the
    inputs carry the dense bucket / position matrices), masks from the batch, dropout in training."""
    rab = rab_tables = None
    bias = layer.relative_attention_bias
    if bias is not None and inputs.time_buckets is None and inputs.relative_positions is None:
        rab_tables = bias.tables(inputs.max_seqlen, inputs.timestamps, inputs.next_timestamps,
                                 inputs.shared_positions)  # fmt: skip
    elif bias is not None:
        batch = inputs.seq_offsets.numel() - 1
        rab = bias(inputs.time_buckets, batch, inputs.max_seqlen, inputs.relative_positions)
        rab = rab.to(q.dtype) if q.dtype != torch.float32 else rab
    if inputs.attention_backend == "fused":
        attention = hstu_attention  # looked up at call time
    elif inputs.attention_backend == "reference":
        attention = reference_attention
    else:
        attention = functools.partial(triton_attention, num_contextual=inputs.num_contextual)
    return attention(
        q, k, v, inputs.seq_offsets, inputs.max_seqlen,
        alpha=layer.alpha,
        scaling_seqlen=layer.scaling_seqlen,
        causal=inputs.causal,
        num_contexts=inputs.num_contexts,
        num_targets=inputs.num_targets,
        target_group_size=layer.target_group_size,
        rab=rab,
        dropout_p=layer.attention_dropout if layer.training else 0.0,
        deterministic=layer.deterministic,
        rab_tables=rab_tables,
    )  # fmt: skip


class HSTUStack(nn.Module):
    def __init__(self, layers: list[HSTULayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, inputs)
        return x
