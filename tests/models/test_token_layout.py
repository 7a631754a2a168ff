"""The encoder's token layout against a per-sequence Python construction, and the encoder's three stages."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.modules import EncoderConfig, EncoderInputs, HSTUEncoder, TokenLayout, sequence_tokens


def naive_layout(lengths, candidates, num_contextual, interleave):
    """Per sequence, the token list: ("ctx", b, k), ("item", event row), ("action", event row)."""
    sequences, row = [], 0
    for length, cands in zip(lengths, candidates):
        tokens = [("ctx", len(sequences), k) for k in range(num_contextual)]
        for position in range(length):
            tokens.append(("item", row + position))
            if interleave and position < length - cands:
                tokens.append(("action", row + position))
        sequences.append(tokens)
        row += length
    return sequences


@st.composite
def batches(draw):
    lengths = draw(st.lists(st.integers(0, 6), min_size=0, max_size=5))
    candidates = [draw(st.integers(0, n)) for n in lengths]
    return lengths, candidates, draw(st.integers(0, 2)), draw(st.booleans())


def build(lengths, candidates, num_contextual, interleave, has_candidates=True):
    lengths_t, candidates_t = torch.tensor(lengths, dtype=torch.int64), torch.tensor(candidates, dtype=torch.int64)
    return TokenLayout.build(lengths_t, lengths_t.clone(), candidates_t, candidates_t.clone(),
                             has_candidates=has_candidates, num_contextual=num_contextual,
                             interleave_actions=interleave)


@settings(max_examples=60, deadline=None)
@given(batches())
def test_layout_matches_a_per_sequence_construction(batch):
    lengths, candidates, num_contextual, interleave = batch
    layout = build(lengths, candidates, num_contextual, interleave)
    sequences = naive_layout(lengths, candidates, num_contextual, interleave)
    token_lengths = [len(s) for s in sequences]
    assert layout.token_lengths.tolist() == layout.host_token_lengths.tolist() == token_lengths
    assert layout.token_offsets.tolist() == torch.cumsum(torch.tensor([0] + token_lengths), 0).tolist()
    assert layout.num_tokens == sum(token_lengths) and layout.max_tokens == max(token_lengths, default=0)
    assert layout.sum_squared_lengths == sum(n * n for n in token_lengths)
    assert layout.num_event_tokens == sum(token_lengths) - num_contextual * len(lengths)
    for length, cands, n in zip(lengths, candidates, token_lengths):
        assert sequence_tokens(length - cands, cands, num_contextual, interleave) == n
    # Item and action rows, counted among the tokens without the contextual ones.
    event_tokens = [t for s in sequences for t in s if t[0] != "ctx"]
    items = {t[1]: i for i, t in enumerate(event_tokens) if t[0] == "item"}
    actions = [i for i, t in enumerate(event_tokens) if t[0] == "action"]
    if interleave:
        assert layout.item_token_rows.tolist() == [items[r] for r in range(sum(lengths))]
        assert layout.action_token_rows.tolist() == actions
        history = [p < n - c for n, c in zip(lengths, candidates) for p in range(n)]
        assert layout.action_events.tolist() == history
        assert layout.history_event_rows.tolist() == [r for r, h in enumerate(history) if h]
    else:
        assert layout.item_token_rows is None and list(items.values()) == list(range(sum(lengths)))
    context_lengths = layout.context_lengths
    assert (context_lengths is None) == (num_contextual == 0)
    if context_lengths is not None:
        assert context_lengths.tolist() == [num_contextual] * len(lengths)
    # Rows of the item outputs (one per event).
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    expected_candidates = [s + p for s, n, c in zip(starts, lengths, candidates) for p in range(n - c, n)]
    assert layout.candidate_rows().tolist() == expected_candidates
    assert layout.candidate_sequence_ids().tolist() == [b for b, c in enumerate(candidates) for _ in range(c)]
    assert layout.rows_with_next().tolist() == [s + p for s, n in zip(starts, lengths) for p in range(n - 1)]
    last = layout.last_rows().tolist()
    assert [last[b] for b, n in enumerate(lengths) if n] == [s + n - 1 for s, n in zip(starts, lengths) if n]


def test_attention_targets_only_with_candidate_counts():
    assert build([3, 2], [1, 1], 0, True).attention_targets.tolist() == [1, 1]
    assert build([3, 2], [0, 0], 0, False, has_candidates=False).attention_targets is None


# ---- the encoder's stages --------------------------------------------------------------------------------------
def _encoder(interleave, **overrides):
    config = EncoderConfig(embedding_dim=4, num_layers=1, qk_dim=4, v_dim=4, dropout=0.0, input_dropout=0.0,
                           max_tokens=24, interleave_actions=interleave, **overrides)  # fmt: skip
    return HSTUEncoder(config).double().eval()


def _inputs(lengths, candidates, num_contextual):
    torch.manual_seed(3)
    events = sum(lengths)
    return EncoderInputs(
        item_embeddings=torch.randn(events, 4, dtype=torch.float64), seq_lengths=torch.tensor(lengths),
        timestamps=torch.arange(events) * 60, num_candidates=torch.tensor(candidates),
        action_embeddings=torch.randn(events, 4, dtype=torch.float64),
        contextual_embeddings=torch.randn(len(lengths) * num_contextual, 4, dtype=torch.float64),
        num_contextual=num_contextual,
    )  # fmt: skip


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("num_contextual", [0, 2])
def test_preprocess_places_every_embedding_where_the_layout_says(interleave, num_contextual):
    encoder = _encoder(interleave, position_encoding="none", input_scale=1.0)
    lengths, candidates = [3, 0, 4], [1, 0, 2]
    inputs = _inputs(lengths, candidates, num_contextual)
    tokens = encoder.preprocess(inputs)
    layout = tokens.layout
    assert tokens.x.shape == (layout.num_tokens, 4)
    assert tokens.attention_inputs.seq_offsets is layout.token_offsets
    assert tokens.attention_inputs.max_seqlen == layout.max_tokens
    offsets = layout.token_offsets.tolist()
    for b in range(len(lengths)):  # contextual tokens first, sample-major
        expected = inputs.contextual_embeddings[b * num_contextual : (b + 1) * num_contextual]
        assert torch.equal(tokens.x[offsets[b] : offsets[b] + num_contextual], expected)
    event_rows = [i for b in range(len(lengths)) for i in range(offsets[b] + num_contextual, offsets[b + 1])]
    event_tokens = tokens.x[torch.tensor(event_rows, dtype=torch.int64)]
    if interleave:
        assert torch.equal(event_tokens[layout.item_token_rows], inputs.item_embeddings)
        assert torch.equal(event_tokens[layout.action_token_rows], inputs.action_embeddings[layout.action_events])
    else:
        assert torch.equal(event_tokens, inputs.item_embeddings)
    # The three stages are the forward.
    outputs = encoder.postprocess(encoder.layers(tokens.x, tokens.attention_inputs), layout)
    assert torch.equal(outputs.item_outputs, encoder(inputs).item_outputs)
    assert (outputs.num_tokens, outputs.sum_squared_lengths) == (layout.num_tokens, layout.sum_squared_lengths)


def test_item_embeddings_that_do_not_match_the_lengths_are_named():
    encoder = _encoder(False)
    inputs = _inputs([3, 2], [0, 0], 0)
    with pytest.raises(ValueError, match="item_embeddings has 4 rows but seq_lengths sum to 5 events"):
        encoder(dataclasses.replace(inputs, item_embeddings=inputs.item_embeddings[:4]))
    with pytest.raises(ValueError, match="item_embeddings has 6 rows but seq_lengths sum to 5 events"):
        encoder(dataclasses.replace(inputs, item_embeddings=torch.cat([inputs.item_embeddings] * 2)[:6]))
