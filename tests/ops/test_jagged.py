import pytest
import torch

from hstu.ops import (
    candidate_mask,
    concat_2d_jagged,
    dense_to_jagged,
    jagged_to_padded_dense,
    lengths_to_host,
    lengths_to_offsets,
    sequence_ids_and_positions,
    sequence_positions,
    split_2d_jagged,
)

LENGTH_CASES = [[3, 0, 1, 5], [0], [1], [0, 0], [7, 2]]


def jagged(lengths, dim=4, dtype=torch.float64):
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
    return torch.randn(sum(lengths), dim, dtype=dtype, requires_grad=True), offsets


def test_lengths_to_offsets():
    assert lengths_to_offsets(torch.tensor([2, 0, 3], dtype=torch.int32)).tolist() == [0, 2, 2, 5]
    assert lengths_to_offsets(torch.tensor([2, 0, 3], dtype=torch.int32)).dtype == torch.int32
    assert lengths_to_offsets(torch.tensor([], dtype=torch.int64)).tolist() == [0]
    with pytest.raises(ValueError, match="lengths must be non-negative"):
        lengths_to_offsets(torch.tensor([1, -1]))
    with pytest.raises(TypeError, match="lengths must be int32 or int64"):
        lengths_to_offsets(torch.tensor([1.0]))


@pytest.mark.parametrize("lengths", LENGTH_CASES)
@pytest.mark.parametrize("max_length", [0, 2, 8])
def test_jagged_to_padded_dense_matches_loop(lengths, max_length):
    values, offsets = jagged(lengths)
    dense = jagged_to_padded_dense(values, offsets, max_length, padding_value=-3.0)
    expected = torch.full((len(lengths), max_length, 4), -3.0, dtype=torch.float64)
    for b, length in enumerate(lengths):
        n = min(length, max_length)
        expected[b, :n] = values[int(offsets[b]) : int(offsets[b]) + n]
    torch.testing.assert_close(dense, expected)
    assert torch.autograd.gradcheck(lambda x: jagged_to_padded_dense(x, offsets, max_length), (values,))


@pytest.mark.parametrize("lengths", LENGTH_CASES)
def test_dense_to_jagged_inverts_padding(lengths):
    values, offsets = jagged(lengths)
    dense = jagged_to_padded_dense(values, offsets, max(lengths + [1]))
    torch.testing.assert_close(dense_to_jagged(dense, offsets), values)
    dense = dense.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d: dense_to_jagged(d, offsets), (dense,))


@pytest.mark.parametrize("lengths_a,lengths_b", [([1, 0, 2], [3, 1, 0]), ([0], [0]), ([2, 2], [0, 5]), ([], [])])
def test_concat_and_split_roundtrip(lengths_a, lengths_b):
    a, offsets_a = jagged(lengths_a)
    b, offsets_b = jagged(lengths_b)
    merged, offsets = concat_2d_jagged(a, offsets_a, b, offsets_b)
    expected = []
    for i in range(len(lengths_a)):
        expected.append(a[int(offsets_a[i]) : int(offsets_a[i + 1])])
        expected.append(b[int(offsets_b[i]) : int(offsets_b[i + 1])])
    torch.testing.assert_close(merged, torch.cat(expected) if expected else merged.new_zeros(0, 4))
    assert offsets.tolist() == (offsets_a + offsets_b).tolist()
    back_a, back_b = split_2d_jagged(merged, offsets_a, offsets_b)
    torch.testing.assert_close(back_a, a)
    torch.testing.assert_close(back_b, b)
    if a.numel() + b.numel():
        assert torch.autograd.gradcheck(lambda x, y: concat_2d_jagged(x, offsets_a, y, offsets_b)[0], (a, b))
        m = merged.detach().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: split_2d_jagged(x, offsets_a, offsets_b), (m,))


def test_candidate_mask_and_positions():
    offsets = torch.tensor([0, 3, 3, 7])
    mask = candidate_mask(offsets, torch.tensor([1, 0, 2]))
    assert mask.tolist() == [False, False, True, False, False, True, True]
    assert sequence_positions(offsets).tolist() == [0, 1, 2, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_candidates must be in"):
        candidate_mask(offsets, torch.tensor([4, 0, 0]))


@pytest.mark.parametrize("lengths", LENGTH_CASES)
def test_sequence_ids_and_positions_match_a_loop_with_or_without_host_lengths(lengths):
    offsets = lengths_to_offsets(torch.tensor(lengths))
    expected_ids = [b for b, n in enumerate(lengths) for _ in range(n)]
    expected_positions = [p for n in lengths for p in range(n)]
    for host in (None, torch.tensor(lengths, dtype=torch.int32)):
        ids, positions = sequence_ids_and_positions(offsets, host)
        assert ids.dtype == positions.dtype == torch.int64
        assert (ids.tolist(), positions.tolist()) == (expected_ids, expected_positions)


def test_host_lengths_replace_every_read_of_the_offsets(monkeypatch):
    """With host_lengths the ops check the host copy: the device offsets are never read (no sync on GPU)."""
    from hstu.ops.jagged import op

    def unreachable(*args, **kwargs):
        raise AssertionError("the offsets were read although host_lengths was given")

    monkeypatch.setattr(op, "check_offsets", unreachable)
    values, offsets = jagged([3, 0, 2])
    host = torch.tensor([3, 0, 2])
    dense = jagged_to_padded_dense(values, offsets, 4, host_lengths=host)
    monkeypatch.undo()
    assert torch.equal(dense, jagged_to_padded_dense(values, offsets, 4))
    monkeypatch.setattr(op, "check_offsets", unreachable)
    assert sequence_ids_and_positions(offsets, host)[1].tolist() == [0, 1, 2, 0, 1]


def test_host_lengths_errors_name_the_argument():
    values, offsets = torch.randn(5, 2), torch.tensor([0, 3, 5])
    with pytest.raises(ValueError, match="host_lengths must be non-negative"):
        sequence_ids_and_positions(offsets, torch.tensor([6, -1]))
    with pytest.raises(ValueError, match="host_lengths must have 2 elements"):
        jagged_to_padded_dense(values, offsets, 4, host_lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match=r"host_lengths sum to 4, but offsets\[-1\] must equal the number of rows 5"):
        jagged_to_padded_dense(values, offsets, 4, host_lengths=torch.tensor([3, 1]))
    with pytest.raises(TypeError, match="host_lengths must be int32 or int64"):
        sequence_ids_and_positions(offsets, torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="seq_offsets must have at least one element"):
        sequence_ids_and_positions(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match=r"host_lengths: the total length \(seq_offsets\[-1\]\) .* int32 range"):
        sequence_ids_and_positions(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([2**31 - 1, 5]))


def test_lengths_to_host_copies_in_int64_and_keeps_none():
    lengths, counts = torch.tensor([3, 0, 2], dtype=torch.int32), torch.tensor([1, 0, 1])
    host_lengths, missing, host_counts = lengths_to_host(lengths, None, counts)
    assert missing is None and host_lengths.device.type == host_counts.device.type == "cpu"
    assert host_lengths.dtype == torch.int64
    assert host_lengths.tolist() == [3, 0, 2] and host_counts.tolist() == [1, 0, 1]
    assert lengths_to_host(None) == [None]
    with pytest.raises(TypeError, match=r"lengths\[1\] must be int32 or int64"):
        lengths_to_host(lengths, torch.tensor([1.0]))


class TestBadInputs:
    def test_offsets_errors(self):
        values = torch.randn(5, 2)
        with pytest.raises(ValueError, match="non-decreasing"):
            jagged_to_padded_dense(values, torch.tensor([0, 3, 2, 5]), 4)
        with pytest.raises(ValueError, match=r"offsets\[-1\] must equal"):
            jagged_to_padded_dense(values, torch.tensor([0, 3]), 4)
        with pytest.raises(TypeError, match="offsets must be int32 or int64"):
            jagged_to_padded_dense(values, torch.tensor([0.0, 5.0]), 4)
        with pytest.raises(TypeError, match="values must be a torch.Tensor"):
            jagged_to_padded_dense([1, 2], torch.tensor([0, 2]), 4)
        with pytest.raises(ValueError, match="max_length must be >= 0"):
            jagged_to_padded_dense(values, torch.tensor([0, 5]), -1)

    def test_dense_to_jagged_errors(self):
        with pytest.raises(ValueError, match="sequence of length 5 > dense.shape"):
            dense_to_jagged(torch.randn(1, 4, 2), torch.tensor([0, 5]))
        with pytest.raises(ValueError, match="describes 2 sequences but dense has batch 1"):
            dense_to_jagged(torch.randn(1, 4, 2), torch.tensor([0, 1, 2]))

    def test_concat_errors(self):
        a, b = torch.randn(3, 2), torch.randn(2, 3)
        with pytest.raises(ValueError, match="values_a rows"):
            concat_2d_jagged(a, torch.tensor([0, 3]), b, torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="offsets_a has 2 entries but offsets_b has 3"):
            concat_2d_jagged(a, torch.tensor([0, 3]), torch.randn(2, 2), torch.tensor([0, 1, 2]))
        with pytest.raises(TypeError, match="values_a is"):
            concat_2d_jagged(a, torch.tensor([0, 3]), torch.randn(2, 2).double(), torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="values has 4 rows"):
            split_2d_jagged(torch.randn(4, 2), torch.tensor([0, 3]), torch.tensor([0, 2]))


def test_lengths_to_offsets_checks_the_host_copy():
    lengths = torch.tensor([2, 0, 3])
    assert lengths_to_offsets(lengths, host_lengths=lengths.clone()).tolist() == [0, 2, 2, 5]
    with pytest.raises(ValueError, match="lengths must be non-negative"):
        lengths_to_offsets(torch.tensor([1, 1]), host_lengths=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="host_lengths must have 2 elements"):
        lengths_to_offsets(torch.tensor([1, 1]), host_lengths=torch.tensor([1]))


@pytest.mark.parametrize("lengths", LENGTH_CASES)
@pytest.mark.parametrize("max_length", [0, 2, 8])
def test_padded_slots_truncate_into_the_spare_slot(lengths, max_length):
    from hstu.ops.jagged.reference import pad_to_slots, padded_slots, unpad_from_slots

    values, offsets = jagged(lengths)
    slots = padded_slots(offsets, values.shape[0], max_length)
    dense = pad_to_slots(values, slots, len(lengths), max_length, padding_value=-1.0)
    assert dense.shape == (len(lengths), max_length, 4) and dense.is_contiguous()
    for b, n in enumerate(lengths):
        kept = min(n, max_length)
        start = int(offsets[b])
        assert torch.equal(dense[b, :kept], values[start : start + kept])
        assert bool((dense[b, kept:] == -1.0).all())
    # Truncated rows get no gradient; kept rows get the dense gradient back.
    dense.sum().backward()
    in_range = torch.cat([torch.arange(n) < max_length for n in lengths]) if lengths else torch.zeros(0, dtype=torch.bool)
    assert torch.equal(values.grad[:, 0], in_range.to(values.dtype))
    if max_length >= max(lengths, default=0):
        assert torch.equal(unpad_from_slots(dense, slots), values)


class TestIndexRanges:
    """Index arithmetic never wraps: a total past the offsets' dtype raises a ValueError naming the argument."""

    def test_int32_lengths_whose_total_passes_int32_raise(self):
        fits = torch.tensor([2**31 - 2, 1], dtype=torch.int32)
        assert lengths_to_offsets(fits).tolist() == [0, 2**31 - 2, 2**31 - 1]
        too_long = torch.tensor([2**31 - 1, 5], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"lengths: the total length .* 2147483652, past the int32 range"):
            lengths_to_offsets(too_long)
        with pytest.raises(ValueError, match="lengths: the total length"):
            lengths_to_offsets(torch.tensor([1, 1], dtype=torch.int32), host_lengths=too_long)
        assert lengths_to_offsets(too_long.long()).tolist() == [0, 2**31 - 1, 2**31 + 4]
        with pytest.raises(ValueError, match="past the int64 range"):
            lengths_to_offsets(torch.tensor([2**62, 2**62, 5]))

    @pytest.mark.parametrize(
        "call",
        [
            lambda offsets: sequence_positions(offsets),
            lambda offsets: candidate_mask(offsets, torch.zeros(2, dtype=torch.int32)),
            lambda offsets: dense_to_jagged(torch.randn(2, 4, 1), offsets),
            lambda offsets: split_2d_jagged(torch.randn(0, 1), offsets, offsets),
        ],
    )
    def test_offsets_whose_int32_steps_wrap_are_not_monotone(self, call):
        # 2**31 - 1 -> -2**31 is a step of -(2**32 - 1), which int32 arithmetic wraps to +1.
        offsets = torch.tensor([0, 2**31 - 1, -(2**31)], dtype=torch.int32)
        with pytest.raises(ValueError, match="non-decreasing"):
            call(offsets)

    def test_candidate_counts_are_compared_without_narrowing(self):
        offsets = torch.tensor([0, 3], dtype=torch.int32)
        with pytest.raises(ValueError, match="num_candidates must be in"):
            candidate_mask(offsets, torch.tensor([2**32 + 1]))  # 1 once narrowed to int32

    @pytest.mark.parametrize("op", ["concat", "split"])
    def test_concatenated_totals_past_int32_raise_before_any_work(self, op, monkeypatch):
        from hstu.ops.jagged import reference

        def unreachable(*args):
            raise AssertionError("the overflow must be caught before the index arithmetic")

        monkeypatch.setattr(reference, f"{op}_2d_jagged_reference", unreachable)
        big = torch.tensor([0, 2**31 - 1], dtype=torch.int32)
        one = torch.tensor([0, 1], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"offsets_a, offsets_b: the total row count .* 2147483648"):
            if op == "concat":  # zero-width rows: 2**31 rows that take no memory
                concat_2d_jagged(torch.empty(2**31 - 1, 0), big, torch.empty(1, 0), one)
            else:
                split_2d_jagged(torch.empty(2**31, 0), big, one)

    def test_mixed_offset_dtypes_promote_instead_of_narrowing(self):
        a, offsets_a = torch.randn(3, 2), torch.tensor([0, 1, 3], dtype=torch.int32)
        b, offsets_b = torch.randn(2, 2), torch.tensor([0, 2, 2], dtype=torch.int64)
        merged, offsets = concat_2d_jagged(a, offsets_a, b, offsets_b)
        assert offsets.dtype == torch.int64 and offsets.tolist() == [0, 3, 5]
        back_a, back_b = split_2d_jagged(merged, offsets_a, offsets_b)
        assert torch.equal(back_a, a) and torch.equal(back_b, b)

    def test_padded_sizes_past_int64_and_huge_ints_raise(self):
        values, offsets = torch.randn(5, 2), torch.tensor([0, 5])
        with pytest.raises(ValueError, match=r"max_length=4611686018427387904 is too large"):
            jagged_to_padded_dense(values, offsets, 2**62)
        with pytest.raises(ValueError, match=r"max_length=4611686018427387904 is too large"):  # strides, no elements
            jagged_to_padded_dense(values[:0], offsets[:1], 2**62)
        with pytest.raises(ValueError, match="max_length must be <= 9223372036854775807"):
            jagged_to_padded_dense(values, offsets, 2**70)


class TestPaddingValue:
    def test_must_be_a_real_number(self):
        values, offsets = torch.randn(3, 2), torch.tensor([0, 3])
        for bad in ("0", None, torch.tensor(1.0), 1j):
            with pytest.raises(TypeError, match="padding_value must be a real number"):
                jagged_to_padded_dense(values, offsets, 4, padding_value=bad)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
    def test_must_be_a_value_of_integer_and_bool_values(self, dtype):
        values, offsets = torch.ones(3, 2, dtype=dtype), torch.tensor([0, 3])
        for bad in (1.5, float("nan"), float("inf"), -1 if dtype in (torch.uint8, torch.bool) else 2**70):
            with pytest.raises(ValueError, match="padding_value"):
                jagged_to_padded_dense(values, offsets, 4, padding_value=bad)
        dense = jagged_to_padded_dense(values, offsets, 4, padding_value=1.0)
        assert dense.dtype == dtype and bool((dense[0, 3] == 1).all())

    def test_float_values_take_any_real(self):
        dense = jagged_to_padded_dense(torch.randn(1, 2), torch.tensor([0, 1]), 2, padding_value=float("-inf"))
        assert bool(torch.isneginf(dense[0, 1]).all())


def test_rows_without_elements_round_trip():
    # (B, N, 0) dense tensors: reshaping with -1 is ambiguous at zero elements.
    offsets = torch.tensor([0, 1, 3])
    dense = jagged_to_padded_dense(torch.randn(3, 0), offsets, 4)
    assert dense.shape == (2, 4, 0)
    assert dense_to_jagged(dense, offsets).shape == (3, 0)
    assert dense_to_jagged(torch.randn(2, 3, 0, 5), offsets).shape == (3, 0, 5)
