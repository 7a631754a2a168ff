"""The dense HSTU encoder in three stages: ``preprocess`` -> the layer stack (``self.layers``) -> ``postprocess``.

``preprocess`` (the seed's order):
1. the token layout (:class:`~hstu.modules.token_layout.TokenLayout`): where every event goes among the tokens;
2. ranking: interleave item and action tokens of the history ([i1, a1, i2, a2, ...]) and append the candidates'
   item tokens (their actions are the labels and are never fed);
3. prepend the contextual feature tokens (``concat_2d_jagged``);
4. scale, add position (+ time-bucket) encodings, input dropout; the relative attention bias inputs (time buckets,
   shared candidate positions) for every layer.
``postprocess`` strips the contextual and action tokens again and returns one output per event (history and
candidates, in event order), optionally L2-normalised, with the layout: the models and tasks ask it which rows are
candidates, which have a next item and which end a sequence.

Everything is index arithmetic on jagged tensors: no per-sample Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from hstu.modules.attention_backends import AttentionBackendError, check_backend_settings
from hstu.modules.hstu_layer import AttentionInputs, HSTULayer, HSTUStack
from hstu.modules.positional import PositionalEncoder, RelativeAttentionBias, token_positions
from hstu.modules.token_layout import TokenLayout
from hstu.ops.hstu_attention import check_attention_indices
from hstu.ops import (
    concat_2d_jagged,
    lengths_to_host,
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
    causal: bool = True  # False: full attention inside each sequence
    # False: the contextual tokens are plain causal tokens (no contextual mask: they do not see the history)
    contextual_mask: bool = True
    attention_backend: str = "fused"  # fused | reference | triton (hstu.modules.attention_backends)
    interleave_actions: bool = False
    recompute_layers: list[int] = field(default_factory=list)  # indices of layers to checkpoint
    # keep x instead of LayerNorm(x) / the projection before SiLU instead of u, v, q, k for the backward, and
    # recompute them there (HSTULayer's options; outputs and gradients unchanged)
    recompute_input_norm: bool = False
    recompute_silu: bool = False
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
    layout: TokenLayout  # which item_outputs rows are candidates, have a next item, end a sequence


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
        check_backend_settings(c.attention_backend, causal=c.causal, relative_attention_bias=c.relative_attention_bias,
                               attention_dropout=c.attention_dropout, target_group_size=c.target_group_size)
        if c.attention_backend == "triton" and scaling < c.max_tokens:
            raise AttentionBackendError(
                f"NetworkArgs.attention_backend='triton' needs NetworkArgs.scaling_seqlen >= the longest token "
                f"sequence ({c.max_tokens}), got {scaling}: Meta's kernel uses it as the sequence bound too")
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
                    recompute_input_norm=c.recompute_input_norm, recompute_silu=c.recompute_silu,
                )  # fmt: skip
            )
        self.layers = HSTUStack(layers)

    def forward(self, inputs: EncoderInputs) -> EncoderOutputs:
        tokens = self.preprocess(inputs)
        # The HSTU layer stack (hstu.distributed swaps in its tensor-parallel twin under tensor parallelism).
        x = self.layers(tokens.x, tokens.attention_inputs)
        return self.postprocess(x, tokens.layout)

    # ---- preprocessing: events -> tokens -------------------------------------------------------------------------
    def preprocess(self, inputs: EncoderInputs) -> "EncoderTokens":
        """The token sequences the layers see: layout, token embeddings with their position / time encodings and
        input dropout, and the attention inputs (masks, relative bias inputs) every layer shares."""
        layout = self.token_layout(inputs)
        tokens, token_times = self._arrange_tokens(inputs, layout)
        token_seq, token_pos = sequence_ids_and_positions(layout.token_offsets, layout.host_token_lengths)
        x = self._encode_positions(tokens, token_times, token_seq, token_pos, layout)
        c = self.config
        attention_inputs = AttentionInputs(
            seq_offsets=layout.token_offsets,
            max_seqlen=layout.max_tokens,
            # The contextual and candidate masks refine causal attention; full attention has neither.
            num_contexts=layout.context_lengths if c.causal and c.contextual_mask else None,
            num_targets=layout.attention_targets if c.causal else None,
            **self._bias_inputs(token_times, layout, inputs.next_timestamps),
            causal=c.causal,
            attention_backend=c.attention_backend,
            num_contextual=layout.num_contextual if c.contextual_mask else 0,
        )
        _check_attention_indices(attention_inputs, layout)
        return EncoderTokens(x, attention_inputs, layout)

    def token_layout(self, inputs: EncoderInputs) -> TokenLayout:
        """Where every event goes among the tokens (checks the inputs against the configuration)."""
        c = self.config
        lengths = inputs.seq_lengths.to(torch.int64)
        num_candidates = inputs.num_candidates
        if num_candidates is None:
            num_candidates = torch.zeros_like(lengths)
        host_lengths, host_candidates = _host_lengths_and_candidates(inputs, lengths)
        layout = TokenLayout.build(
            lengths, host_lengths, num_candidates.to(torch.int64), host_candidates,
            has_candidates=inputs.num_candidates is not None, num_contextual=inputs.num_contextual,
            interleave_actions=c.interleave_actions,
        )  # fmt: skip
        if layout.num_events != inputs.item_embeddings.shape[0]:
            raise ValueError(f"item_embeddings has {inputs.item_embeddings.shape[0]} rows but seq_lengths sum to "
                             f"{layout.num_events} events")
        if c.interleave_actions and inputs.action_embeddings is None:
            raise ValueError("interleave_actions needs action embeddings")
        if inputs.num_contextual > 0 and inputs.contextual_embeddings is None:
            raise ValueError("num_contextual > 0 needs contextual_embeddings")
        if layout.max_tokens > c.max_tokens:
            raise ValueError(f"a sequence has {layout.max_tokens} tokens, more than the encoder's "
                             f"max_tokens={c.max_tokens}")
        return layout

    def _arrange_tokens(self, inputs: EncoderInputs, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) token embeddings and (T,) token times in the layout's order. Action tokens take their event's
        time; contextual tokens, which carry no time of their own, take the sequence's first event time."""
        tokens, token_times = inputs.item_embeddings, inputs.timestamps
        if layout.interleave_actions:
            item_rows, action_rows, history = layout.item_token_rows, layout.action_token_rows, layout.history_event_rows
            tokens = tokens.new_zeros(layout.num_event_tokens, self.config.embedding_dim)
            tokens = tokens.index_put((item_rows,), inputs.item_embeddings)
            tokens = tokens.index_put((action_rows,), inputs.action_embeddings[history].to(tokens.dtype))
            token_times = inputs.timestamps.new_zeros(tokens.shape[0])
            token_times = token_times.index_put((item_rows,), inputs.timestamps)
            token_times = token_times.index_put((action_rows,), inputs.timestamps[history])
        if layout.num_contextual == 0:
            return tokens, token_times
        first_time = torch.zeros(layout.num_sequences, dtype=inputs.timestamps.dtype, device=tokens.device)
        num_events = inputs.item_embeddings.shape[0]
        if num_events:
            first_event = layout.event_offsets[:-1].clamp(max=num_events - 1)
            first_time = torch.where(layout.event_lengths > 0, inputs.timestamps[first_event], first_time)
        context_times = first_time.repeat_interleave(layout.num_contextual)
        host_sizes = dict(host_lengths_a=layout.host_context_lengths, host_lengths_b=layout.host_event_token_lengths)
        tokens, _ = concat_2d_jagged(
            inputs.contextual_embeddings.to(tokens.dtype), layout.context_offsets, tokens, layout.event_token_offsets,
            **host_sizes,
        )
        token_times, _ = concat_2d_jagged(
            context_times.unsqueeze(-1), layout.context_offsets, token_times.unsqueeze(-1),
            layout.event_token_offsets, **host_sizes,
        )
        return tokens, token_times.squeeze(-1)

    def _encode_positions(self, tokens: torch.Tensor, token_times: torch.Tensor, token_seq: torch.Tensor,
                          token_pos: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Scale, position (+ time-bucket) encodings and input dropout; time buckets are measured from the time of
        the sequence's last history token."""
        c = self.config
        positions = token_positions(token_pos, layout.token_lengths, layout.num_candidates, token_seq,
                                    c.position_encoding)
        query_times = None
        if c.num_time_buckets > 0:
            total_tokens = tokens.shape[0]
            last_history = (layout.token_offsets[1:] - 1 - layout.num_candidates).clamp(min=0)
            query_times = token_times[last_history.clamp(max=max(total_tokens - 1, 0))][token_seq]
        return self.input_encoder(tokens, positions, token_times, query_times)

    def _bias_inputs(self, token_times: torch.Tensor, layout: TokenLayout,
                     next_timestamps: Optional[torch.Tensor]) -> dict:
        """The relative attention bias's AttentionInputs fields: token times (and the next request's time) for the
        time weights, the candidate counts that share one position when the batch has candidates. Every layer's
        bias gathers its own weights from them inside the attention; no (B, N, N) matrix is built here."""
        c = self.config
        if not c.relative_attention_bias:
            return {}
        fields = {}
        if c.rab_use_time:
            fields.update(timestamps=token_times,
                          next_timestamps=next_timestamps if c.rab_time_reference == "next" else None)
        if c.rab_use_position and layout.has_candidates:
            fields.update(shared_positions=layout.num_candidates)
        return fields

    # ---- postprocessing: tokens -> one output per event ----------------------------------------------------------
    def postprocess(self, x: torch.Tensor, layout: TokenLayout) -> EncoderOutputs:
        """Drops the contextual and action tokens: one output per event, in event order (optionally L2-normalised)."""
        if layout.num_contextual > 0:
            _, x = split_2d_jagged(x, layout.context_offsets, layout.event_token_offsets,
                                   host_lengths_a=layout.host_context_lengths,
                                   host_lengths_b=layout.host_event_token_lengths)  # fmt: skip
        item_outputs = x[layout.item_token_rows] if layout.interleave_actions else x
        if self.config.l2_normalize_output:
            item_outputs = l2_normalize(item_outputs, self.config.l2_norm_eps)
        return EncoderOutputs(
            item_outputs=item_outputs,
            num_tokens=layout.num_tokens,
            sum_squared_lengths=layout.sum_squared_lengths,
            layout=layout,
        )


@dataclass
class EncoderTokens:
    """What preprocessing hands to the layer stack."""

    x: torch.Tensor  # (T, D) encoded tokens
    attention_inputs: AttentionInputs
    layout: TokenLayout


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


def _check_attention_indices(inputs: AttentionInputs, layout: TokenLayout) -> None:
    """Checks the index tensors every layer's attention call shares from the layout's host copies, once per batch,
    so that the layer stack makes no device-to-host copy for those checks (``check_attention_indices``)."""
    contexts, targets = inputs.num_contexts, inputs.num_targets
    check_attention_indices(
        inputs.seq_offsets, layout.host_token_lengths,
        num_contexts=contexts, host_num_contexts=None if contexts is None else layout.host_context_lengths,
        num_targets=targets, host_num_targets=None if targets is None else layout.host_num_candidates,
        shared_positions=inputs.shared_positions,
        host_shared_positions=None if inputs.shared_positions is None else layout.host_num_candidates,
    )  # fmt: skip


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)

