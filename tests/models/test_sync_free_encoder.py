"""The encoder's batch handling reads no device value where the host copies of the sizes exist (issue 22), checked
on CPU: the token layout builds from meta-device counts with host copies, and after ``preprocess`` the layer stack
(forward and backward, relative bias tables included) never copies index values to the host for its attention
checks (``check_attention_indices`` recorded them from the layout's host copies). The GPU sync count is in
tests/ops/test_jagged_syncs_cuda.py."""

from __future__ import annotations

import pytest
import torch

from hstu.modules import EncoderConfig, EncoderInputs, HSTUEncoder
from hstu.modules.token_layout import TokenLayout
from hstu.ops.hstu_attention import check_attention_indices, op


@pytest.mark.parametrize("num_contextual", [0, 2])
def test_token_layout_builds_from_meta_counts(num_contextual):
    lengths, candidates = torch.tensor([3, 5, 1, 4]), torch.tensor([1, 2, 0, 4])
    layout = TokenLayout.build(lengths.to("meta"), lengths, candidates.to("meta"), candidates, has_candidates=True,
                               num_contextual=num_contextual, interleave_actions=True)  # fmt: skip
    assert layout.history_event_rows.shape == (int((lengths - candidates).sum()),)
    assert layout.action_token_rows.shape == layout.history_event_rows.shape
    assert layout.candidate_rows().shape == (int(candidates.sum()),)


def _encoder_and_inputs(ranking: bool, **settings):
    torch.manual_seed(0)
    config = EncoderConfig(embedding_dim=16, num_layers=2, num_heads=2, qk_dim=8, v_dim=8, dropout=0.0,
                           input_dropout=0.0, max_tokens=40, interleave_actions=ranking, relative_attention_bias=True,
                           rab_time_reference="next" if ranking else "query", **settings)  # fmt: skip
    lengths = torch.tensor([4, 1, 7])
    total = int(lengths.sum())
    candidates = torch.tensor([1, 0, 3]) if ranking else None
    inputs = EncoderInputs(
        item_embeddings=torch.randn(total, 16), seq_lengths=lengths, timestamps=torch.cumsum(torch.arange(total), 0),
        num_candidates=candidates, action_embeddings=torch.randn(total, 16) if ranking else None,
        contextual_embeddings=torch.randn(3 * 2, 16), num_contextual=2,
        next_timestamps=torch.tensor([100, 200, 300]) if ranking else None, host_seq_lengths=lengths.clone(),
        host_num_candidates=None if candidates is None else candidates.clone(),
    )  # fmt: skip
    return HSTUEncoder(config), inputs


@pytest.mark.parametrize("settings", [{}, dict(contextual_mask=False), dict(causal=False)], ids=str)
@pytest.mark.parametrize("ranking", [False, True], ids=["retrieval", "ranking"])
def test_layer_stack_reads_no_index_values_after_preprocess(ranking, settings, monkeypatch):
    encoder, inputs = _encoder_and_inputs(ranking, **settings)
    tokens = encoder.preprocess(inputs)

    def no_host_copy(*tensors):
        raise AssertionError("the attention copied index values to the host inside the layer stack")

    with monkeypatch.context() as patch:
        patch.setattr(op, "to_host", no_host_copy)
        x = tokens.x.detach().requires_grad_(True)
        out = encoder.layers(x, tokens.attention_inputs)
        out.square().sum().backward()
    # The same layers on the same tokens, the attention making its own checks.
    fresh = encoder.preprocess(inputs)
    op._checked_offsets.pop(fresh.attention_inputs.seq_offsets, None)
    assert torch.equal(out, encoder.layers(fresh.x, fresh.attention_inputs))


def test_check_attention_indices_errors_name_the_argument():
    offsets, lengths = torch.tensor([0, 3, 5]), torch.tensor([3, 2])
    targets = torch.tensor([1, 3])
    with pytest.raises(ValueError, match=r"num_targets\[1\]=3 exceeds"):
        check_attention_indices(offsets, lengths, num_targets=targets, host_num_targets=targets)
    with pytest.raises(ValueError, match="host_num_targets"):
        check_attention_indices(offsets, lengths, num_targets=targets)
    with pytest.raises(ValueError, match="host_lengths must have 2 elements"):
        check_attention_indices(offsets, torch.tensor([5]))
    with pytest.raises(TypeError, match="host_lengths"):
        check_attention_indices(offsets, torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match=r"shared_positions\[0\]=4"):
        check_attention_indices(offsets, lengths, shared_positions=torch.tensor([4, 0]),
                                host_shared_positions=torch.tensor([4, 0]))  # fmt: skip
    with pytest.raises(ValueError, match="seq_offsets"):
        check_attention_indices(offsets, torch.tensor([3, -1]))
