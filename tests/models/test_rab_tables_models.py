"""The encoder's relative attention bias runs as weight tables (hstu_attention(rab_tables=...)), with outputs and
gradients bit-identical in float32 to the dense bias built from the bucket / position matrices."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hstu.modules import EncoderConfig, HSTUEncoder
from hstu.modules import hstu_layer as layer_module
from hstu.modules.encoder import EncoderInputs
from hstu.modules.positional import RelativeAttentionBias, token_positions
from hstu.ops import jagged_to_padded_dense, sequence_ids_and_positions

RANKING = dict(interleave_actions=True, rab_time_reference="query")  # candidates, actions, contextual tokens
RETRIEVAL = dict(interleave_actions=False, rab_time_reference="next", l2_normalize_output=True)


def _encoder(style: dict, **overrides) -> HSTUEncoder:
    config = EncoderConfig(embedding_dim=8, num_layers=2, num_heads=2, qk_dim=4, v_dim=4, dropout=0.0,
                           input_dropout=0.0, max_tokens=24, relative_attention_bias=True, rab_num_time_buckets=16,
                           **{**style, **overrides})  # fmt: skip
    torch.manual_seed(0)
    encoder = HSTUEncoder(config)
    for layer in encoder.layers.layers:  # (non-zero, distinct weights per layer)
        bias = layer.relative_attention_bias
        for w in (bias.position_weights, bias.time_weights):
            if w is not None:
                torch.nn.init.normal_(w, std=0.5)
    return encoder


def _inputs(style: dict) -> EncoderInputs:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 1, 5, 4])
    total = int(lengths.sum())
    gaps = torch.tensor([0, 0, 10**9, 7, 1, 3600, 0, 86400, 5, 2, 0, 1, 10**6])[:total]
    ranking = style["interleave_actions"]
    return EncoderInputs(
        item_embeddings=torch.randn(total, 8, generator=g),
        seq_lengths=lengths,
        timestamps=torch.cumsum(gaps, 0) - gaps.sum() // 2,
        num_candidates=torch.tensor([1, 0, 2, 1]) if ranking else None,
        action_embeddings=torch.randn(total, 8, generator=g) if ranking else None,
        contextual_embeddings=torch.randn(4 * 2, 8, generator=g) if ranking else None,
        num_contextual=2 if ranking else 0,
        next_timestamps=None if ranking else torch.tensor([10**9 + 5, 3, 0, 10**10]),
    )


def _dense_attention_inputs(encoder: HSTUEncoder, inputs: EncoderInputs, tokens):
    """The encoder's attention inputs with the dense (B, N, N) bucket and position matrices instead of the token
    times: the layers then build the dense (B, 1, N, N) bias."""
    c, layout, att = encoder.config, tokens.layout, tokens.attention_inputs
    token_seq, token_pos = sequence_ids_and_positions(layout.token_offsets, layout.host_token_lengths)
    buckets = None
    if c.rab_use_time:
        buckets = RelativeAttentionBias.time_bucket_matrix(att.timestamps, layout.token_offsets, layout.max_tokens,
                                                           c.rab_num_time_buckets, c.rab_time_reference,
                                                           inputs.next_timestamps)  # fmt: skip
    if layout.has_candidates:
        shared = token_positions(token_pos, layout.token_lengths, layout.num_candidates, token_seq, "absolute")
        padded = jagged_to_padded_dense(shared.unsqueeze(-1), layout.token_offsets, layout.max_tokens).squeeze(-1)
        relative = padded.unsqueeze(2) - padded.unsqueeze(1)
    else:
        i = torch.arange(layout.max_tokens)
        relative = (i.view(-1, 1) - i.view(1, -1)).unsqueeze(0)
    return dataclasses.replace(att, timestamps=None, next_timestamps=None, shared_positions=None,
                               time_buckets=buckets, relative_positions=relative)  # fmt: skip


def _run(encoder: HSTUEncoder, inputs: EncoderInputs, dense: bool):
    encoder.zero_grad()
    tokens = encoder.preprocess(inputs)
    attention_inputs = _dense_attention_inputs(encoder, inputs, tokens) if dense else tokens.attention_inputs
    x = encoder.layers(tokens.x, attention_inputs)
    out = encoder.postprocess(x, tokens.layout).item_outputs
    loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("style", [RANKING, RETRIEVAL], ids=["ranking", "retrieval"])
def test_encoder_tables_are_bit_identical_to_the_dense_bias(style, monkeypatch):
    encoder, inputs = _encoder(style), _inputs(style)
    calls = []
    real = layer_module.hstu_attention

    def recording(*args, **kwargs):
        calls.append((kwargs.get("rab"), kwargs.get("rab_tables")))
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_module, "hstu_attention", recording)
    tables_out, tables_loss, tables_grads = _run(encoder, inputs, dense=False)
    # Every layer took the table path: no dense bias, and the encoder built no (B, N, N) matrix.
    assert len(calls) == 2 and all(rab is None and tables is not None for rab, tables in calls)
    tokens = encoder.preprocess(inputs)
    assert tokens.attention_inputs.time_buckets is None and tokens.attention_inputs.relative_positions is None
    assert (tokens.attention_inputs.shared_positions is not None) == style["interleave_actions"]
    calls.clear()
    dense_out, dense_loss, dense_grads = _run(encoder, inputs, dense=True)
    assert len(calls) == 2 and all(rab is not None and tables is None for rab, tables in calls)
    assert torch.equal(tables_out, dense_out) and torch.equal(tables_loss, dense_loss)
    assert tables_grads.keys() == dense_grads.keys()
    assert any("time_weights" in name for name in tables_grads) and any("position_weights" in n for n in tables_grads)
    for name, grad in tables_grads.items():
        assert torch.equal(grad, dense_grads[name]), name


@pytest.mark.parametrize("use_time, use_position", [(True, False), (False, True), (False, False)])
def test_encoder_tables_with_one_or_no_table(use_time, use_position):
    encoder = _encoder(RETRIEVAL, rab_use_time=use_time, rab_use_position=use_position)
    inputs = _inputs(RETRIEVAL)
    tables = _run(encoder, inputs, dense=False)
    dense = _run(encoder, inputs, dense=True)
    assert torch.equal(tables[0], dense[0])
    for name, grad in tables[2].items():
        assert torch.equal(grad, dense[2][name]), name


def test_reference_backend_takes_the_tables_too():
    encoder = _encoder(RANKING, attention_backend="reference")
    inputs = _inputs(RANKING)
    tables = _run(encoder, inputs, dense=False)
    dense = _run(encoder, inputs, dense=True)
    assert torch.equal(tables[0], dense[0])
    for name in ("time_weights", "position_weights"):
        got = [g for n, g in tables[2].items() if n.endswith(name)]
        want = [g for n, g in dense[2].items() if n.endswith(name)]
        assert len(got) == 2 and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))


def test_time_bias_without_timestamps_is_a_named_error():
    from hstu.modules.hstu_layer import AttentionInputs, HSTULayer

    layer = HSTULayer(8, 1, 4, 4, relative_attention_bias=RelativeAttentionBias(6, 8))
    with pytest.raises(ValueError, match="AttentionInputs.timestamps"):
        layer(torch.randn(5, 8), AttentionInputs(torch.tensor([0, 5]), 5))
