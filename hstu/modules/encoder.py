"""The dense HSTU encoder: block preprocessing, the layer stack, block postprocessing.

Preprocessing (the seed's order):
1. ranking: interleave item and action tokens of the history ([i1, a1, i2, a2, ...]) and append the candidates'
   item tokens (their actions are the labels and are never fed);
2. prepend the contextual feature tokens (``concat_2d_jagged``);
3. scale, add position (+ time-bucket) encodings, input dropout.
Postprocessing strips the contextual tokens again and returns, per sequence, the outputs of the item tokens
(action tokens removed), optionally L2-normalised.

Everything is index arithmetic on jagged tensors: no per-sample Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from hstu.modules.hstu_layer import AttentionInputs, HSTULayer, HSTUStack
from hstu.modules.positional import PositionalEncoder, RelativeAttentionBias, token_positions
from hstu.ops import (
    concat_2d_jagged,
    jagged_to_padded_dense,
    lengths_to_host,
    lengths_to_offsets,
    sequence_ids_and_positions,
    split_2d_jagged,
)


@dataclass
class EncoderConfig:
    embedding_dim: int = 50
    num_layers: int = 2
    num_heads: int = 1
    qk_dim: int = 50
    v_dim: int = 50
    dropout: float = 0.2  # after the gated attention output (Meta's "linear dropout")
    input_dropout: float = 0.2
    attention_dropout: float = 0.0
    alpha: Optional[float] = None  # None: 1/sqrt(qk_dim)
    scaling_seqlen: Optional[int] = None  # None: max_tokens (a static N keeps the weights batch independent)
    layer_norm_eps: float = 1e-6
    max_tokens: int = 200  # longest token sequence after preprocessing (contexts + interleaving + candidates)
    position_encoding: str = "absolute"
    num_time_buckets: int = 0  # additive time-bucket embeddings (0: off)
    input_scale: Optional[float] = None  # None: sqrt(embedding_dim)
    relative_attention_bias: bool = False
    rab_num_time_buckets: int = 128
    rab_time_reference: str = "query"
    rab_use_position: bool = True
    rab_use_time: bool = True
    target_group_size: int = 1
    interleave_actions: bool = False
    recompute_layers: list[int] = field(default_factory=list)  # indices of layers to checkpoint
    l2_normalize_output: bool = False
    l2_norm_eps: float = 1e-6


@dataclass
class EncoderInputs:
    item_embeddings: torch.Tensor  # (T, D) one row per event (history + candidates)
    seq_lengths: torch.Tensor  # (B,) events per sequence
    timestamps: torch.Tensor  # (T,) seconds
    num_candidates: Optional[torch.Tensor] = None  # (B,) ranking candidates at the end of each sequence
    action_embeddings: Optional[torch.Tensor] = None  # (T, D) needed with interleave_actions
    contextual_embeddings: Optional[torch.Tensor] = None  # (B * C, D), sample-major
    num_contextual: int = 0
    next_timestamps: Optional[torch.Tensor] = None  # (B,) time of the request after the last event (rab "next")
    # Host copies of seq_lengths / num_candidates (e.g. JaggedBatch.host_seq_lengths): the batch statistics the
    # encoder needs as Python ints come from them instead of device syncs. Missing ones cost one transfer.
    host_seq_lengths: Optional[torch.Tensor] = None
    host_num_candidates: Optional[torch.Tensor] = None


@dataclass
class EncoderOutputs:
    item_outputs: torch.Tensor  # (T, D) outputs at the item tokens, aligned with EncoderInputs.item_embeddings
    num_tokens: int  # tokens that went through the layers (for throughput)
    sum_squared_lengths: int  # Σ L_b² over token sequences (attention FLOPs)


class HSTUEncoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.input_encoder = PositionalEncoder(
            c.embedding_dim, c.max_tokens, mode=c.position_encoding, num_time_buckets=c.num_time_buckets,
            input_scale=c.input_scale, dropout=c.input_dropout,
        )  # fmt: skip
        scaling = c.scaling_seqlen if c.scaling_seqlen is not None else c.max_tokens
        layers = []
        for index in range(c.num_layers):
            rab = None
            if c.relative_attention_bias:
                rab = RelativeAttentionBias(
                    c.max_tokens, c.rab_num_time_buckets, c.rab_time_reference,
                    use_time=c.rab_use_time, use_position=c.rab_use_position,
                )  # fmt: skip
            layers.append(
                HSTULayer(
                    c.embedding_dim, c.num_heads, c.qk_dim, c.v_dim, dropout=c.dropout,
                    attention_dropout=c.attention_dropout, alpha=c.alpha, scaling_seqlen=scaling,
                    target_group_size=c.target_group_size, layer_norm_eps=c.layer_norm_eps,
                    relative_attention_bias=rab, recompute=index in c.recompute_layers,
                )  # fmt: skip
            )
        self.layers = HSTUStack(layers)

    def forward(self, inputs: EncoderInputs) -> EncoderOutputs:
        c = self.config
        lengths = inputs.seq_lengths.to(torch.int64)
        batch = lengths.numel()
        num_events = inputs.item_embeddings.shape[0]
        num_candidates = inputs.num_candidates
        if num_candidates is None:
            num_candidates = torch.zeros_like(lengths)
        num_candidates = num_candidates.to(torch.int64)
        device = inputs.item_embeddings.device
        host_lengths, host_candidates = _host_lengths_and_candidates(inputs, lengths)

        # 1. Events -> tokens (item tokens, plus action tokens of the history when interleaving).
        event_offsets = lengths_to_offsets(lengths, host_lengths)
        event_seq, event_pos = sequence_ids_and_positions(event_offsets, host_lengths)
        history = lengths - num_candidates
        host_token_lengths = host_lengths
        if c.interleave_actions:
            if inputs.action_embeddings is None:
                raise ValueError("interleave_actions needs action embeddings")
            token_lengths = 2 * history + num_candidates
            host_token_lengths = 2 * (host_lengths - host_candidates) + host_candidates
            token_offsets = lengths_to_offsets(token_lengths, host_token_lengths)
            in_history = event_pos < history[event_seq]
            item_slot = torch.where(in_history, 2 * event_pos, history[event_seq] + event_pos)
            item_dest = token_offsets[:-1][event_seq] + item_slot
            action_dest = (token_offsets[:-1][event_seq] + 2 * event_pos + 1)[in_history]
            tokens = inputs.item_embeddings.new_zeros(int(host_token_lengths.sum()), c.embedding_dim)
            tokens = tokens.index_put((item_dest,), inputs.item_embeddings)
            tokens = tokens.index_put((action_dest,), inputs.action_embeddings[in_history].to(tokens.dtype))
            token_times = inputs.timestamps.new_zeros(tokens.shape[0])
            token_times = token_times.index_put((item_dest,), inputs.timestamps)
            token_times = token_times.index_put((action_dest,), inputs.timestamps[in_history])
        else:
            token_lengths, token_offsets = lengths, event_offsets
            tokens, token_times = inputs.item_embeddings, inputs.timestamps

        # 2. Contextual tokens in front; their time is the first event's (they carry no time of their own).
        num_contexts = None
        if inputs.num_contextual > 0:
            if inputs.contextual_embeddings is None:
                raise ValueError("num_contextual > 0 needs contextual_embeddings")
            ctx_lengths = torch.full((batch,), inputs.num_contextual, dtype=torch.int64, device=device)
            ctx_offsets = lengths_to_offsets(ctx_lengths)
            first_time = torch.zeros(batch, dtype=inputs.timestamps.dtype, device=device)
            if num_events:
                first_event = event_offsets[:-1].clamp(max=num_events - 1)
                first_time = torch.where(lengths > 0, inputs.timestamps[first_event], first_time)
            ctx_times = first_time.repeat_interleave(inputs.num_contextual)
            tokens, new_offsets = concat_2d_jagged(
                inputs.contextual_embeddings.to(tokens.dtype), ctx_offsets, tokens, token_offsets
            )
            token_times, _ = concat_2d_jagged(
                ctx_times.unsqueeze(-1), ctx_offsets, token_times.unsqueeze(-1), token_offsets
            )
            token_times = token_times.squeeze(-1)
            token_lengths = token_lengths + inputs.num_contextual
            host_token_lengths = host_token_lengths + inputs.num_contextual
            token_offsets = new_offsets
            num_contexts = ctx_lengths
        total_tokens = tokens.shape[0]

        # 3. Position / time encodings and input dropout.
        token_seq, token_pos = sequence_ids_and_positions(token_offsets, host_token_lengths)
        max_tokens = int(host_token_lengths.max()) if batch > 0 else 0
        if max_tokens > c.max_tokens:
            raise ValueError(f"a sequence has {max_tokens} tokens, more than the encoder's max_tokens={c.max_tokens}")
        positions = token_positions(token_pos, token_lengths, num_candidates, token_seq, c.position_encoding)
        query_times = None
        if c.num_time_buckets > 0:
            last_history = (token_offsets[1:] - 1 - num_candidates).clamp(min=0)
            query_times = token_times[last_history.clamp(max=max(total_tokens - 1, 0))][token_seq]
        x = self.input_encoder(tokens, positions, token_times, query_times)

        time_buckets = None
        if c.relative_attention_bias and c.rab_use_time:
            time_buckets = RelativeAttentionBias.time_bucket_matrix(
                token_times, token_offsets, max_tokens, c.rab_num_time_buckets, c.rab_time_reference,
                inputs.next_timestamps, host_lengths=host_token_lengths,
            )  # fmt: skip
        relative_positions = None
        if c.relative_attention_bias and c.rab_use_position and inputs.num_candidates is not None:
            # Candidates share a position, so the bias uses position differences rather than token distances.
            shared = token_positions(token_pos, token_lengths, num_candidates, token_seq, "absolute")
            padded = jagged_to_padded_dense(
                shared.unsqueeze(-1), token_offsets, max_tokens, host_lengths=host_token_lengths
            ).squeeze(-1)
            relative_positions = padded.unsqueeze(2) - padded.unsqueeze(1)
        attention_inputs = AttentionInputs(
            seq_offsets=token_offsets,
            max_seqlen=max_tokens,
            num_contexts=num_contexts,
            num_targets=num_candidates if inputs.num_candidates is not None else None,
            time_buckets=time_buckets,
            relative_positions=relative_positions,
        )
        x = self.layers(x, attention_inputs)

        # 4. Postprocessing: drop contextual and action tokens, keep the item tokens in event order.
        if inputs.num_contextual > 0:
            _, x = split_2d_jagged(x, ctx_offsets, token_offsets - ctx_offsets)
            token_offsets = token_offsets - ctx_offsets
        item_outputs = x[item_dest] if c.interleave_actions else x
        if c.l2_normalize_output:
            item_outputs = l2_normalize(item_outputs, c.l2_norm_eps)
        return EncoderOutputs(
            item_outputs=item_outputs,
            num_tokens=total_tokens,
            sum_squared_lengths=int((host_token_lengths**2).sum()),
        )


def _host_lengths_and_candidates(inputs: EncoderInputs, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 host copies of the sequence lengths and candidate counts; the missing ones in one transfer."""
    host_lengths, host_candidates = inputs.host_seq_lengths, inputs.host_num_candidates
    if inputs.num_candidates is None:
        host_candidates = torch.zeros(lengths.numel(), dtype=torch.int64)
    copied_lengths, copied_candidates = lengths_to_host(
        lengths if host_lengths is None else None, inputs.num_candidates if host_candidates is None else None
    )
    host_lengths = copied_lengths if host_lengths is None else host_lengths
    host_candidates = copied_candidates if host_candidates is None else host_candidates
    for name, host in (("host_seq_lengths", host_lengths), ("host_num_candidates", host_candidates)):
        if host.shape != lengths.shape:
            raise ValueError(f"{name} must have the shape of seq_lengths {tuple(lengths.shape)}, got {tuple(host.shape)}")
    return host_lengths.to(torch.int64), host_candidates.to(torch.int64)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)

