"""The jagged ops' CUDA kernels (csrc/jagged/jagged.cu) against their PyTorch references: every dtype and row
shape (vector widths 16 down to 1 byte), int32 / int64 offsets, empty and length-1 sequences, truncation, and the
gradients of both directions. Values are fresh random numbers; the copies must be exact."""

from __future__ import annotations

import pytest
import torch

from hstu.ops.jagged import cuda as jagged_cuda
from hstu.ops.jagged import reference
from tests.conftest import requires_cuda

pytestmark = requires_cuda

LENGTHS = [0, 5, 1, 0, 37, 130, 2]
ROWS = [(), (3,), (7,), (2, 64), (1, 129)]  # per-row shapes: odd widths take the narrow vectors
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool, torch.uint8]


@pytest.fixture(autouse=True)
def _needs_kernels():
    if not jagged_cuda.available(torch.empty(0, device="cuda")):
        pytest.skip("hstu._C was built without the jagged kernels")


def _offsets(lengths, dtype):
    return reference.lengths_to_offsets_reference(torch.tensor(lengths, dtype=dtype, device="cuda"))


def _values(rows, row_shape, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, *row_shape, device="cuda", generator=gen) * 50
    if dtype == torch.bool:
        return x > 0
    return x.to(dtype)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_shape", ROWS, ids=str)
def test_padded_round_trip_matches_reference(row_shape, dtype, index_dtype):
    offsets = _offsets(LENGTHS, index_dtype)
    values = _values(sum(LENGTHS), row_shape, dtype, seed=1)
    pad = 1 if dtype in (torch.bool, torch.uint8) else -3
    for max_length in (0, 1, 40, 131):  # truncating and padding
        got = jagged_cuda.jagged_to_padded_dense(values, offsets, max_length, pad)
        want = reference.jagged_to_padded_dense_reference(values, offsets, max_length, pad)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"to_padded, max_length={max_length}"
    dense = _values(len(LENGTHS) * 131, row_shape, dtype, seed=2).view(len(LENGTHS), 131, *row_shape)
    got = jagged_cuda.dense_to_jagged(dense, offsets, sum(LENGTHS))
    assert torch.equal(got, reference.dense_to_jagged_reference(dense, offsets))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_shape", ROWS, ids=str)
def test_concat_and_split_match_reference(row_shape, dtype, index_dtype):
    lengths_b = [3, 0, 1, 0, 2, 9, 0]
    offsets_a, offsets_b = _offsets(LENGTHS, index_dtype), _offsets(lengths_b, index_dtype)
    a = _values(sum(LENGTHS), row_shape, dtype, seed=3)
    b = _values(sum(lengths_b), row_shape, dtype, seed=4)
    got, got_offsets = jagged_cuda.concat_2d_jagged(a, offsets_a, b, offsets_b)
    want, want_offsets = reference.concat_2d_jagged_reference(a, offsets_a, b, offsets_b)
    assert torch.equal(got, want) and torch.equal(got_offsets, want_offsets)
    got_a, got_b = jagged_cuda.split_2d_jagged(want, offsets_a, offsets_b, sum(LENGTHS), sum(lengths_b))
    assert torch.equal(got_a, a) and torch.equal(got_b, b)


def test_all_empty_and_unaligned_views():
    offsets = _offsets([0, 0, 0], torch.int64)  # three empty sequences
    values = torch.randn(0, 4, device="cuda")
    assert jagged_cuda.jagged_to_padded_dense(values, offsets, 3, 0.0).shape == (3, 3, 4)
    assert torch.equal(jagged_cuda.jagged_to_padded_dense(values, offsets, 3, 2.5), torch.full((3, 3, 4), 2.5,
                                                                                            device="cuda"))
    # a non-contiguous row slice (the op copies it to rows of its own)
    base = _values(sum(LENGTHS), (9,), torch.bfloat16, seed=5)
    sliced = base[:, 1:]
    offsets = _offsets(LENGTHS, torch.int32)
    assert torch.equal(jagged_cuda.jagged_to_padded_dense(sliced, offsets, 50, 0.0),
                       reference.jagged_to_padded_dense_reference(sliced, offsets, 50, 0.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gradients_match_reference_autograd(dtype):
    offsets = _offsets(LENGTHS, torch.int64)
    lengths_b = [1, 2, 0, 0, 4, 1, 3]
    offsets_b = _offsets(lengths_b, torch.int64)

    def run(impl_cuda: bool):
        torch.manual_seed(0)
        values = _values(sum(LENGTHS), (2, 8), dtype, seed=6).requires_grad_(True)
        extra = _values(sum(lengths_b), (2, 8), dtype, seed=7).requires_grad_(True)
        # dense_to_jagged needs every sequence to fit the dense width (the public op checks it)
        width = max(LENGTHS) + 3
        dense = _values(len(LENGTHS) * width, (2, 8), dtype, seed=8).view(len(LENGTHS), width, 2, 8)
        dense.requires_grad_(True)
        if impl_cuda:
            padded = jagged_cuda.jagged_to_padded_dense(values, offsets, 40, 0.0)  # truncates the 130-long one
            back = jagged_cuda.dense_to_jagged(dense, offsets, sum(LENGTHS))
            cat, _ = jagged_cuda.concat_2d_jagged(values, offsets, extra, offsets_b)
            part_a, part_b = jagged_cuda.split_2d_jagged(cat * 2, offsets, offsets_b, sum(LENGTHS), sum(lengths_b))
        else:
            padded = reference.jagged_to_padded_dense_reference(values, offsets, 40, 0.0)
            back = reference.dense_to_jagged_reference(dense, offsets)
            cat, _ = reference.concat_2d_jagged_reference(values, offsets, extra, offsets_b)
            part_a, part_b = reference.split_2d_jagged_reference(cat * 2, offsets, offsets_b)
        gen = torch.Generator(device="cuda").manual_seed(9)
        loss = sum((t.float() * torch.randn(t.shape, device="cuda", generator=gen)).sum()
                   for t in (padded, back, cat, part_a, part_b))
        return torch.autograd.grad(loss, (values, extra, dense))

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
