"""Device-to-host syncs on CUDA (issue 22): the jagged ops given the host sizes make none, the HSTU layer stack of
the retrieval and ranking models makes none in one training step (forward and backward), and the whole step's
count is recorded. Counting uses torch.cuda.set_sync_debug_mode("warn"): one warning per synchronizing call.
Skips without a GPU; the CPU side of the same property (the ops run on meta tensors given the host sizes) is in
test_jagged_host_sizes.py."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.ops.jagged import cuda as jagged_cuda
from hstu.ops.jagged import op as jagged_op
from tests.conftest import requires_cuda

pytestmark = requires_cuda

SYNC_WARNING = "synchroniz"


class SyncLog:
    def __init__(self, caught: list):
        self.caught = caught

    def __call__(self, start: int = 0) -> list[str]:
        """The messages of the synchronizing calls recorded since the start or the ``mark()`` given."""
        return [str(w.message) for w in self.caught[start:] if SYNC_WARNING in str(w.message)]

    def mark(self) -> int:
        return len(self.caught)


@contextlib.contextmanager
def counted_syncs():
    """Yields a SyncLog of every synchronizing CUDA call made inside the block (one warning each)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield SyncLog(caught)
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def _jagged(lengths, width, dtype=torch.bfloat16, index_dtype=torch.int64):
    host = torch.tensor(lengths, dtype=torch.int64)
    offsets = jagged_op.lengths_to_offsets(host.to(device="cuda", dtype=index_dtype), host)
    return torch.randn(sum(lengths), width, device="cuda", dtype=dtype, requires_grad=True), offsets, host


def _every_op(index_dtype):
    """Every public jagged op with its host sizes, forward and backward."""
    values, offsets, host = _jagged([3, 0, 1, 7], 12, index_dtype=index_dtype)
    context, context_offsets, context_host = _jagged([2, 2, 2, 2], 12, index_dtype=index_dtype)
    counts = torch.tensor([1, 0, 1, 3])
    device_counts = counts.cuda()
    padded = jagged_op.jagged_to_padded_dense(values, offsets, 5, host_lengths=host)
    back = jagged_op.dense_to_jagged(padded.detach().clone().requires_grad_(True),
                                     offsets, host_lengths=host.clamp(max=5))  # fmt: skip
    merged, merged_offsets = jagged_op.concat_2d_jagged(context, context_offsets, values, offsets,
                                                        host_lengths_a=context_host, host_lengths_b=host)
    part_a, part_b = jagged_op.split_2d_jagged(merged, context_offsets, offsets, host_lengths_a=context_host,
                                               host_lengths_b=host)
    rows = jagged_op.candidate_indices(offsets, device_counts, host_lengths=host, host_num_candidates=counts)
    mask = jagged_op.candidate_mask(offsets, device_counts, host_lengths=host, host_num_candidates=counts)
    positions = jagged_op.sequence_positions(offsets, host)
    loss = padded.float().sum() + part_a.float().sum() + part_b.float().sum() + values[rows].float().sum()
    loss = loss + torch.where(mask, positions, 0).sum() + back.float().sum() * 0 + merged_offsets.sum()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_jagged_ops_make_no_sync_given_host_sizes(index_dtype, kernels, monkeypatch):
    if kernels:
        if not jagged_cuda.available(torch.empty(0, device="cuda")):
            pytest.skip("hstu._C was built without the jagged kernels")
        monkeypatch.setattr(jagged_op, "USE_CUDA_KERNELS", True)
    _every_op(index_dtype)  # warm-up: allocator, lazy inits
    torch.cuda.synchronize()
    with counted_syncs() as log:
        _every_op(index_dtype)
    assert log() == [], f"{len(log())} syncs: {log()[:3]}"


def test_sync_counting_sees_a_sync():
    """The counter itself: a boolean index (a nonzero) and .item() are syncs."""
    x = torch.randn(8, device="cuda")
    with counted_syncs() as log:
        _ = x[x > 0]
        _ = x.sum().item()
    assert len(log()) >= 2


def _batch(ranking: bool, batch_size=8, max_len=60, num_items=500, seed=0):
    from hstu.data.batch import SEQUENCE_KEYS, JaggedBatch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (batch_size,), generator=gen)
    lengths[0] = 2
    total = int(lengths.sum())
    items = torch.randint(1, num_items, (total,), generator=gen)
    actions = torch.randint(0, 4, (total,), generator=gen)
    times = torch.cumsum(torch.randint(1, 100, (total,), generator=gen), 0)
    sequence = KeyedJaggedTensor.from_lengths_sync(keys=list(SEQUENCE_KEYS), values=torch.cat([items, actions, times]),
                                                   lengths=lengths.repeat(len(SEQUENCE_KEYS)))
    num_candidates = torch.clamp(lengths // 4, min=1) if ranking else torch.zeros_like(lengths)
    cpu = JaggedBatch(sequence, num_candidates, torch.zeros(batch_size, dtype=torch.bool), int(lengths.max()))
    return cpu.to("cuda")


def _model(ranking: bool):
    from hstu.models.losses import MultiTaskLoss, SampledSoftmaxLoss
    from hstu.models.ranking import RankingModel
    from hstu.models.retrieval import RetrievalModel
    from hstu.modules import EncoderConfig

    # With the relative attention bias (tables: the dense-rab expansion or the in-kernel path, and for ranking the
    # candidates' shared positions), as the models' GPU configurations run it.
    config = EncoderConfig(embedding_dim=64, num_layers=2, num_heads=2, qk_dim=32, v_dim=32, dropout=0.1,
                           input_dropout=0.1, max_tokens=160, interleave_actions=ranking, relative_attention_bias=True,
                           rab_time_reference="next" if ranking else "query")  # fmt: skip
    if ranking:
        model = RankingModel(500, 16, config, MultiTaskLoss("bitmask", 2))
    else:
        model = RetrievalModel(500, config, SampledSoftmaxLoss(1, 500, num_uniform_negatives=32))
    return model.cuda().train()


def _layer_stack_syncs(model, batch) -> list[str]:
    """Syncs of the layer stack alone (forward and backward) on the tokens the model's preprocessing builds."""
    from hstu.models.common import sparse_features
    from hstu.modules import EncoderInputs

    with torch.autocast("cuda", dtype=torch.bfloat16):
        keys = ["item", "action"] if hasattr(model, "head") else ["item"]
        values = model.embeddings(sparse_features(model.embeddings, batch, keys, model.contextual_keys))
        inputs = EncoderInputs(
            item_embeddings=values["item"], seq_lengths=batch.seq_lengths, host_seq_lengths=batch.seq_lengths_on_host(),
            timestamps=batch.sequence["timestamp"].values(),
            num_candidates=batch.num_candidates if hasattr(model, "head") else None,
            action_embeddings=values.get("action"),
        )  # fmt: skip
        tokens = model.encoder.preprocess(inputs)
        x = tokens.x.detach().requires_grad_(True)
        torch.cuda.synchronize()
        with counted_syncs() as log:
            out = model.encoder.layers(x, tokens.attention_inputs)
            out.float().square().mean().backward()
    return log()


def _needs_attention_kernels():
    """The layer stack's zero holds where the fused attention runs; the PyTorch reference attention reads the
    sequence lengths on the host (its padded width), so without the extension the count is not the kernels'."""
    from hstu.ops._extension import load_extension

    if load_extension() is None:
        pytest.skip("the hstu CUDA extension is not built: the attention runs the PyTorch reference")


@pytest.mark.parametrize("ranking", [False, True], ids=["retrieval", "ranking"])
def test_layer_stack_makes_no_sync_in_a_training_step(ranking):
    _needs_attention_kernels()
    torch.manual_seed(0)
    model = _model(ranking)
    _layer_stack_syncs(model, _batch(ranking, seed=1))  # warm-up
    syncs = _layer_stack_syncs(model, _batch(ranking, seed=2))
    assert syncs == [], f"{len(syncs)} syncs inside the layer stack: {syncs[:3]}"


@pytest.mark.parametrize("ranking", [False, True], ids=["retrieval", "ranking"])
def test_training_step_sync_count(ranking, record_property):
    """The whole step (embeddings, encoder, head, loss, backward): the count is recorded (record_property
    'syncs'); the encoder's part of it (preprocess, layers, postprocess) must be zero."""
    _needs_attention_kernels()
    torch.manual_seed(0)
    model = _model(ranking)
    original = model.encoder.forward
    for seed in (1, 2):  # the second step is counted
        batch = _batch(ranking, seed=seed)
        torch.cuda.synchronize()
        with counted_syncs() as log:
            encoder_marks = []

            def counted_forward(inputs):
                encoder_marks.append(log.mark())
                result = original(inputs)
                encoder_marks.append(log.mark())
                return result

            model.encoder.forward = counted_forward
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch)
            out.loss.backward()
            del model.encoder.forward
        step_syncs = log()
        encoder_syncs = log(encoder_marks[0])[: len(log(encoder_marks[0])) - len(log(encoder_marks[1]))]
    record_property("syncs", len(step_syncs))
    print(f"{'ranking' if ranking else 'retrieval'} step: {len(step_syncs)} syncs, {len(encoder_syncs)} in the "
          f"encoder forward")
    assert encoder_syncs == [], f"{len(encoder_syncs)} syncs inside the encoder forward: {encoder_syncs[:3]}"
