"""The jagged ops take the sizes they need from the caller (issue 22): given host copies of the lengths they read
no device value, so on GPU they make no device-to-host sync. On the CPU the proof is that they run on meta tensors
(a meta tensor has no values: any read, nonzero, boolean index or data-dependent output size raises) and give the
same results as without the host copies; wrong host copies raise errors naming the argument. The GPU count is in
test_jagged_syncs_cuda.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.ops.jagged import (
    candidate_indices,
    candidate_mask,
    concat_2d_jagged,
    dense_to_jagged,
    jagged_to_padded_dense,
    lengths_to_offsets,
    sequence_positions,
    split_2d_jagged,
)
from hstu.ops.jagged import cuda as jagged_cuda
from hstu.ops.jagged import op as jagged_op

lengths_lists = st.lists(st.integers(0, 6), min_size=1, max_size=6)


def _case(lengths, device, index_dtype=torch.int64, width=3, seed=0):
    host = torch.tensor(lengths, dtype=torch.int64)
    offsets = lengths_to_offsets(host.to(device=device, dtype=index_dtype), host)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), width, generator=gen).to(device), offsets, host


def _run_all(lengths_a, lengths_b, counts, device, host: bool):
    """Every op on jagged a and b (b's sequences with counts[i] <= len_b candidates); host copies when asked."""
    a, offsets_a, host_a = _case(lengths_a, device, torch.int32, seed=1)
    b, offsets_b, host_b = _case(lengths_b, device, torch.int64, seed=2)
    host_counts = torch.tensor(counts)
    device_counts = host_counts.to(device)

    def sizes(**kwargs):
        return kwargs if host else {}

    longest = max(lengths_b)
    padded = jagged_to_padded_dense(b, offsets_b, longest + 1, -1.0, **sizes(host_lengths=host_b))
    merged, merged_offsets = concat_2d_jagged(a, offsets_a, b, offsets_b,
                                              **sizes(host_lengths_a=host_a, host_lengths_b=host_b))
    return {
        "padded": padded,
        "unpadded": dense_to_jagged(padded, offsets_b, **sizes(host_lengths=host_b)),
        "merged": merged,
        "merged_offsets": merged_offsets,
        "split": split_2d_jagged(merged, offsets_a, offsets_b, **sizes(host_lengths_a=host_a, host_lengths_b=host_b)),
        "mask": candidate_mask(offsets_b, device_counts, **sizes(host_lengths=host_b, host_num_candidates=host_counts)),
        "rows": candidate_indices(offsets_b, device_counts,
                                  **sizes(host_lengths=host_b, host_num_candidates=host_counts)),
        "positions": sequence_positions(offsets_b, host_b if host else None),
    }


@st.composite
def jagged_pairs(draw):
    lengths_b = draw(lengths_lists)
    lengths_a = draw(st.lists(st.integers(0, 4), min_size=len(lengths_b), max_size=len(lengths_b)))
    counts = [draw(st.integers(0, n)) for n in lengths_b]
    return lengths_a, lengths_b, counts


@settings(max_examples=40, deadline=None)
@given(jagged_pairs())
def test_ops_read_no_device_value_given_host_sizes(case):
    lengths_a, lengths_b, counts = case
    plain = _run_all(lengths_a, lengths_b, counts, "cpu", host=False)
    hosted = _run_all(lengths_a, lengths_b, counts, "cpu", host=True)
    meta = _run_all(lengths_a, lengths_b, counts, "meta", host=True)  # raises on any read of a device value
    for key in plain:
        for p, h, m in zip(*(x if isinstance(x, tuple) else (x,) for x in (plain[key], hosted[key], meta[key]))):
            assert torch.equal(p, h), key
            assert (m.shape, m.dtype) == (p.shape, p.dtype), key
    # the candidate rows are the mask's rows
    assert torch.equal(hosted["rows"], plain["mask"].nonzero().flatten())
    assert hosted["rows"].tolist() == [
        start + length - count + i
        for start, length, count in zip(torch.tensor([0, *lengths_b]).cumsum(0).tolist(), lengths_b, counts)
        for i in range(count)
    ]


def test_without_host_sizes_meta_offsets_are_refused_by_name():
    """The contrast to the property above: without host copies the ops need the values, which meta lacks."""
    b, offsets_b, host_b = _case([2, 3], "meta")
    with pytest.raises(ValueError, match="offsets_a is a meta tensor, but split_2d_jagged needs its values"):
        split_2d_jagged(b, offsets_b, offsets_b)
    with pytest.raises(ValueError, match="offsets is a meta tensor, but dense_to_jagged needs its values"):
        dense_to_jagged(torch.empty(2, 3, 3, device="meta"), offsets_b)
    with pytest.raises(ValueError, match="num_candidates is a meta tensor, but candidate_indices needs its values"):
        candidate_indices(offsets_b, torch.ones(2, dtype=torch.int64, device="meta"), host_lengths=host_b)


def test_wrong_host_sizes_raise_named_errors():
    a, offsets_a, host_a = _case([1, 2], "cpu")
    b, offsets_b, host_b = _case([3, 0], "cpu")
    with pytest.raises(ValueError, match=r"host_lengths_a sum to 4, but offsets_a\[-1\] must equal the number of "
                                         r"rows 3"):
        concat_2d_jagged(a, offsets_a, b, offsets_b, host_lengths_a=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="host_lengths_b must have 2 elements, got 3"):
        concat_2d_jagged(a, offsets_a, b, offsets_b, host_lengths_b=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="host_lengths_b must be non-negative, got minimum -1"):
        split_2d_jagged(torch.cat([a, b]), offsets_a, offsets_b, host_lengths_b=torch.tensor([4, -1]))
    with pytest.raises(ValueError, match=r"values has 5 rows but offsets_a\[-1\] \+ offsets_b\[-1\] = 6"):
        split_2d_jagged(torch.cat([a, b])[:5], offsets_a, offsets_b, host_lengths_a=host_a, host_lengths_b=host_b)
    with pytest.raises(TypeError, match="host_lengths_a must be int32 or int64"):
        split_2d_jagged(torch.cat([a, b]), offsets_a, offsets_b, host_lengths_a=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="host_lengths must be a host \\(CPU\\) tensor, got one on meta"):
        dense_to_jagged(torch.randn(2, 3, 3), offsets_b, host_lengths=host_b.to("meta"))
    with pytest.raises(ValueError, match=r"offsets has a sequence of length 3 > dense.shape\[1\]=2"):
        dense_to_jagged(torch.randn(2, 2, 3), offsets_b, host_lengths=host_b)
    with pytest.raises(ValueError, match="offsets describes 2 sequences but dense has batch 3"):
        dense_to_jagged(torch.randn(3, 4, 3), offsets_b, host_lengths=host_b)
    with pytest.raises(ValueError, match=r"num_candidates must be in \[0, sequence length\]"):
        candidate_indices(offsets_b, torch.tensor([1, 0]), host_lengths=host_b,
                          host_num_candidates=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="host_num_candidates must have 2 elements, got 1"):
        candidate_mask(offsets_b, torch.tensor([1, 0]), host_num_candidates=torch.tensor([1]))
    with pytest.raises(ValueError, match="host_num_candidates must be non-negative"):
        candidate_mask(offsets_b, torch.tensor([1, 0]), host_num_candidates=torch.tensor([-1, 0]))


def test_kernel_dispatch_takes_the_host_totals(monkeypatch):
    """With USE_CUDA_KERNELS on and the kernels available, the public ops hand the CUDA functions their host totals
    (the kernels never read a size on the device); checked on the CPU with recording stand-ins."""
    calls = {}

    def record(name):
        def stand_in(*args):
            calls[name] = args
            return getattr(jagged_op.reference, f"{name}_reference")(*args)

        return stand_in

    monkeypatch.setattr(jagged_op, "USE_CUDA_KERNELS", True)
    monkeypatch.setattr(jagged_cuda, "available", lambda *tensors: True)
    for name in ("jagged_to_padded_dense", "dense_to_jagged", "concat_2d_jagged", "split_2d_jagged"):
        monkeypatch.setattr(jagged_cuda, name, record(name))
    a, offsets_a, host_a = _case([1, 2], "cpu")
    b, offsets_b, host_b = _case([3, 0], "cpu")
    padded = jagged_to_padded_dense(b, offsets_b, 3, host_lengths=host_b)
    dense_to_jagged(padded, offsets_b, host_lengths=host_b)
    merged, _ = concat_2d_jagged(a, offsets_a, b, offsets_b, host_lengths_a=host_a, host_lengths_b=host_b)
    split_2d_jagged(merged, offsets_a, offsets_b, host_lengths_a=host_a, host_lengths_b=host_b)
    assert set(calls) == {"jagged_to_padded_dense", "dense_to_jagged", "concat_2d_jagged", "split_2d_jagged"}
    assert calls["dense_to_jagged"][2] == 3
    assert calls["split_2d_jagged"][3:] == (3, 3)
    monkeypatch.setattr(jagged_op, "USE_CUDA_KERNELS", False)
    calls.clear()
    jagged_to_padded_dense(b, offsets_b, 3, host_lengths=host_b)
    assert calls == {}
