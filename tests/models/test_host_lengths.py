"""Batch statistics from host copies of the lengths: same results as reading the device tensors, no syncs."""

import dataclasses

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.data.batch import SEQUENCE_KEYS, JaggedBatch
from hstu.modules import EncoderConfig, EncoderInputs, HSTUEncoder
from hstu.modules.token_layout import rows_with_next


def _batch(lengths):
    total = sum(lengths)
    values = torch.cat([torch.arange(total), torch.zeros(total, dtype=torch.int64), torch.arange(total) * 10])
    sequence = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SEQUENCE_KEYS), values=values, lengths=torch.tensor(lengths * len(SEQUENCE_KEYS))
    )
    batch = len(lengths)
    return JaggedBatch(sequence, torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.bool),
                       max(lengths, default=0))  # fmt: skip


def test_to_keeps_a_host_copy_of_the_lengths():
    batch = _batch([3, 0, 2])
    assert batch.host_seq_lengths is None
    moved = batch.to("cpu")
    assert moved.host_seq_lengths.device.type == "cpu"
    assert moved.host_seq_lengths.tolist() == [3, 0, 2]
    assert moved.seq_lengths_on_host().tolist() == [3, 0, 2]
    assert batch.seq_lengths_on_host().tolist() == [3, 0, 2]  # no copy kept: read the lengths themselves


@pytest.mark.parametrize("lengths", [[3, 0, 1, 5], [1, 1], [0], [4]])
def test_rows_with_next_matches_the_boolean_mask(lengths):
    lengths = torch.tensor(lengths)
    rows = rows_with_next(lengths, lengths.clone())
    ends = torch.cumsum(lengths, 0)
    expected = [r for r in range(int(lengths.sum())) if r + 1 not in ends.tolist()]
    assert rows.tolist() == expected


def test_encoder_same_output_with_or_without_host_lengths():
    torch.manual_seed(0)
    config = EncoderConfig(embedding_dim=8, num_layers=1, qk_dim=8, v_dim=8, dropout=0.0, input_dropout=0.0,
                           max_tokens=8, relative_attention_bias=True, rab_num_time_buckets=16)  # fmt: skip
    encoder = HSTUEncoder(config).eval()
    lengths = torch.tensor([3, 0, 5])
    inputs = EncoderInputs(item_embeddings=torch.randn(8, 8), seq_lengths=lengths,
                           timestamps=torch.arange(8) * 1000)  # fmt: skip
    plain = encoder(inputs)
    hosted = encoder(dataclasses.replace(inputs, host_seq_lengths=lengths.clone()))
    assert torch.equal(plain.item_outputs, hosted.item_outputs)
    assert (plain.num_tokens, plain.sum_squared_lengths) == (hosted.num_tokens, hosted.sum_squared_lengths) == (8, 34)
    with pytest.raises(ValueError, match="host_seq_lengths must have the shape"):
        encoder(dataclasses.replace(inputs, host_seq_lengths=torch.tensor([3, 5])))
    with pytest.raises(ValueError, match="lengths must be non-negative"):
        encoder(dataclasses.replace(inputs, host_seq_lengths=torch.tensor([3, -1, 5])))
