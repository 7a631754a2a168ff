"""Property-based fuzzing of the ops' argument checking (CPU).

Each example builds a valid call, then replaces up to two arguments with odd values: other Python types, other
dtypes, shapes and devices, values out of range, huge ints, offsets that do not start at 0 or go backwards (also by
int32 wrap-around), NaN / inf scalars. Every outcome must be either a correct result, compared with a plain loop (or,
for attention, the term-by-term dense formulation in tests/ops/dense_attention.py), or a ValueError / TypeError
(subclasses included) whose message names something; any other exception fails the test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hstu.ops import (
    candidate_mask,
    concat_2d_jagged,
    dense_to_jagged,
    hstu_attention,
    jagged_to_padded_dense,
    lengths_to_offsets,
    sequence_positions,
    split_2d_jagged,
)
from tests.ops.dense_attention import dense_hstu_attention
from tests.ops.test_hstu_attention_reference import fuzz

NAMED_ERRORS = (ValueError, TypeError)
NOT_TENSORS = st.sampled_from([None, 3, 2.5, "x", [0, 1], (1,)])
HUGE = 2**70


def outcome(call, arguments: tuple[str, ...]):
    """(result, None) or (None, a ValueError / TypeError naming one of `arguments`); any other exception fails the
    test with its traceback."""
    try:
        return call(), None
    except NAMED_ERRORS as error:
        assert any(name in str(error) for name in arguments), f"the error names no argument: {error!r}"
        return None, error


ATTENTION_ARGUMENTS = ("q", "k", "v", "seq_offsets", "max_seqlen", "alpha", "scaling_seqlen", "causal",
                       "window_size", "num_contexts", "num_targets", "target_group_size", "rab", "dropout_p",
                       "deterministic")  # fmt: skip


def offsets_of(lengths, dtype=torch.int64):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype)


def odd_offsets(offsets: torch.Tensor, huge: bool = True):
    """Malformed variants of a (B+1,) offsets tensor. huge: also offsets ending at 2**62, a total that contradicts any
    values tensor (ops whose output size the offsets alone set would have to allocate it)."""
    n = offsets.numel()
    wrap = torch.tensor([0, 2**31 - 1, -(2**31)] + [-(2**31)] * max(0, n - 3), dtype=torch.int32)[: max(n, 3)]
    return st.sampled_from(
        [
            offsets.tolist(),
            offsets.float(),
            offsets.to(torch.int16),
            offsets.bool(),
            offsets.view(1, -1),
            offsets[:0],
            offsets + 1,
            offsets.flip(0),
            torch.cat([offsets, offsets[-1:] + 1]),
            offsets[:-1] if n > 1 else offsets + 2,
            wrap,
            offsets.to("meta"),
        ]
        + ([torch.tensor([0, 2**62], dtype=torch.int64)] if huge else [])
    )


def random_values(draw, rows: int, row_shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn(rows, *row_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        return (x * 10).to(dtype)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# hstu_attention


@st.composite
def attention_calls(draw):
    lengths = draw(st.lists(st.integers(0, 6), max_size=4))
    total, batch, longest = sum(lengths), len(lengths), max(lengths, default=0)
    heads, dim = draw(st.integers(1, 3)), draw(st.sampled_from([1, 4, 8]))
    dim_v = draw(st.sampled_from([dim, 3]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    q, k = (random_values(draw, total, (heads, dim), dtype) for _ in range(2))
    v = random_values(draw, total, (heads, dim_v), dtype)
    offsets = offsets_of(lengths, draw(st.sampled_from([torch.int32, torch.int64])))
    max_seqlen = longest + draw(st.integers(0, 3))
    causal = draw(st.booleans())
    args = dict(q=q, k=k, v=v, seq_offsets=offsets, max_seqlen=max_seqlen, alpha=draw(st.sampled_from([1.0, 0.3])),
                scaling_seqlen=draw(st.sampled_from([None, 1, 7])), causal=causal,
                window_size=draw(st.sampled_from([-1, 0, 2])), num_contexts=None, num_targets=None,
                target_group_size=draw(st.integers(1, 3)), rab=None, dropout_p=0.0, deterministic=False)  # fmt: skip
    if causal and draw(st.booleans()):
        args["num_targets"] = torch.tensor([draw(st.integers(0, n)) for n in lengths], dtype=torch.int64)
    if causal and draw(st.booleans()):
        targets = args["num_targets"] if args["num_targets"] is not None else [0] * batch
        args["num_contexts"] = torch.tensor([draw(st.integers(0, n - int(t))) for n, t in zip(lengths, targets)],
                                            dtype=torch.int32)  # fmt: skip
    if draw(st.booleans()):
        side = max_seqlen + draw(st.integers(0, 1))
        args["rab"] = random_values(draw, batch, (draw(st.sampled_from([1, heads])), side, side), dtype)

    odd = {
        "q": st.one_of(NOT_TENSORS, st.sampled_from([q.long(), q.bool(), q.to(torch.complex64), q[:, :, 0],
                                                     q.unsqueeze(0), q[:, :0], q[:, :, :0], q.transpose(0, 1),
                                                     torch.cat([q, q[:1]]) if total else q.new_zeros(1, heads, dim),
                                                     q.half(), q.to("meta")])),  # fmt: skip
        "k": st.one_of(NOT_TENSORS, st.sampled_from([k.double() if dtype != torch.float64 else k.float(),
                                                     k[:, :1], k[:, :, :1]])),  # fmt: skip
        "v": st.one_of(NOT_TENSORS, st.sampled_from([v[:, :, :1], v[:, :1], v.float() if dtype != torch.float32
                                                     else v.double(), v.unsqueeze(-1)])),  # fmt: skip
        "seq_offsets": odd_offsets(offsets),
        "max_seqlen": st.sampled_from([-1, longest - 1, 2.0, True, None, HUGE, np.int64(longest), 10**6, "4"]),
        "alpha": st.sampled_from([float("nan"), float("inf"), "1", None, torch.tensor(1.0), True, 0, 10**400]),
        "scaling_seqlen": st.sampled_from([0, -3, 2.5, HUGE, 1000, True]),
        "causal": st.sampled_from([1, None, "yes", False]),
        "window_size": st.sampled_from([-2, -100, 0, 1, HUGE, 1.5, None]),
        "num_contexts": st.one_of(NOT_TENSORS, st.sampled_from(
            [torch.full((batch,), 2**40), torch.full((batch,), -1), torch.zeros(batch + 1, dtype=torch.int64),
             torch.zeros(batch), torch.zeros(1, batch, dtype=torch.int64), torch.ones(batch, dtype=torch.int32)])),
        "num_targets": st.one_of(NOT_TENSORS, st.sampled_from(
            [torch.full((batch,), 2**40), torch.full((batch,), -1), torch.zeros(max(0, batch - 1), dtype=torch.int64),
             torch.zeros(batch, dtype=torch.float64), torch.tensor(lengths, dtype=torch.int32)])),
        "target_group_size": st.sampled_from([0, -1, 1.5, HUGE, 3, np.int32(2)]),
        "rab": st.one_of(NOT_TENSORS, st.sampled_from(
            [torch.zeros(batch, 1, max_seqlen, max_seqlen, dtype=torch.int64), torch.zeros(batch, 1, max_seqlen),
             torch.zeros(batch + 1, 1, max_seqlen, max_seqlen), torch.zeros(batch, heads + 1, max_seqlen, max_seqlen),
             torch.zeros(batch, 1, max(0, max_seqlen - 1), max_seqlen), torch.zeros(batch, 1, max_seqlen, max_seqlen,
             dtype=torch.float16), torch.full((batch, heads, max_seqlen + 2, max_seqlen + 2), float("nan"))])),
        "dropout_p": st.sampled_from([-0.1, 1.0, float("nan"), "0.1", None, 0.5, True]),
        "deterministic": st.sampled_from(["yes", 1, None, True]),
    }  # fmt: skip
    changed = draw(st.permutations(sorted(odd)))[: draw(st.sampled_from([0, 1, 1, 1, 2, 2]))]
    for name in changed:
        args[name] = draw(odd[name])
    return args, changed


def _expected_attention(args):
    """The dense formulation of an accepted call, or None where it has nothing to compare (dropout)."""
    if args["dropout_p"]:
        return None
    q, k, v = args["q"], args["k"], args["v"]
    return dense_hstu_attention(
        q, k, v, args["seq_offsets"], int(args["max_seqlen"]), alpha=float(args["alpha"]),
        scaling_seqlen=args["scaling_seqlen"], causal=args["causal"], window_size=int(args["window_size"]),
        num_contexts=args["num_contexts"], num_targets=args["num_targets"],
        target_group_size=int(args["target_group_size"]), rab=args["rab"],
    )  # fmt: skip


@fuzz(400)
@given(call=attention_calls())
def test_hstu_attention_arguments(call):
    args, changed = call
    call_args = dict(args)
    positional = [call_args.pop(name) for name in ("q", "k", "v", "seq_offsets", "max_seqlen")]
    out, error = outcome(lambda: hstu_attention(*positional, **call_args), ATTENTION_ARGUMENTS)
    if error is not None:
        assert changed, f"a valid call was rejected: {error!r}"
        return
    q, v = args["q"], args["v"]
    assert out.dtype == q.dtype and out.shape == (q.shape[0], q.shape[1], v.shape[2])
    expected = _expected_attention(args)
    if expected is not None:
        tolerance = 1e-9 if q.dtype == torch.float64 else 2e-2
        torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------------
# jagged ops

ROW_SHAPES = [(), (2,), (0,), (2, 3)]
PAIR_ARGUMENTS = ("values", "offsets_a", "offsets_b", "values_a", "values_b")
VALUE_DTYPES = [torch.float32, torch.float64, torch.int64, torch.bool, torch.bfloat16]


@st.composite
def jagged_inputs(draw, max_batch=4):
    lengths = draw(st.lists(st.integers(0, 5), max_size=max_batch))
    row_shape = draw(st.sampled_from(ROW_SHAPES))
    dtype = draw(st.sampled_from(VALUE_DTYPES))
    values = random_values(draw, sum(lengths), row_shape, dtype)
    return lengths, values, offsets_of(lengths, draw(st.sampled_from([torch.int32, torch.int64])))


class Mutator:
    """Replaces an argument by an odd value one time in four, remembering whether any was replaced."""

    def __init__(self, draw):
        self.draw, self.changed = draw, False

    def __call__(self, value, odd_strategy):
        if self.draw(st.integers(0, 3)):
            return value
        self.changed = True
        return self.draw(odd_strategy)

    def check_rejection(self, error):
        assert self.changed, f"valid arguments were rejected: {error!r}"


def odd_values(values):
    return st.one_of(NOT_TENSORS, st.sampled_from([values.sum(), values.to("meta"), values[:-1] if values.shape[0]
                                                   else values.new_zeros(1, *values.shape[1:])]))  # fmt: skip


def sequences(values, offsets):
    return [values[int(offsets[b]) : int(offsets[b + 1])] for b in range(offsets.numel() - 1)]


@fuzz(250)
@given(data=st.data())
def test_lengths_to_offsets_arguments(data):
    lengths = data.draw(st.lists(st.one_of(st.integers(-2, 9), st.sampled_from([2**31 - 1, 2**62, 2**63 - 1])),
                                 max_size=4))  # fmt: skip
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    if dtype == torch.int32:
        lengths = [min(x, 2**31 - 1) for x in lengths]
    tensor = torch.tensor(lengths, dtype=dtype)
    odd = Mutator(data.draw)
    tensor = odd(tensor, st.one_of(NOT_TENSORS, st.sampled_from([tensor.float(), tensor.view(1, -1),
                                                                 tensor.to(torch.int16)])))  # fmt: skip
    out, error = outcome(lambda: lengths_to_offsets(tensor), ("lengths",))
    fits = sum(lengths) <= (2**31 - 1 if dtype == torch.int32 else 2**63 - 1)
    if out is None:
        assert odd.changed or min(lengths, default=0) < 0 or not fits, f"valid lengths rejected: {error!r}"
        return
    assert fits and out.dtype == dtype and out.tolist() == [0, *itertools.accumulate(lengths)]


@fuzz(250)
@given(data=st.data(), inputs=jagged_inputs())
def test_jagged_to_padded_dense_arguments(data, inputs):
    lengths, values, offsets = inputs
    max_length = data.draw(st.integers(0, 6))
    padding = data.draw(st.sampled_from([0.0, -1, 1.5, float("nan"), float("-inf"), True]))
    odd = Mutator(data.draw)
    values = odd(values, odd_values(values))
    offsets = odd(offsets, odd_offsets(offsets))
    max_length = odd(max_length, st.sampled_from([-1, 2.0, None, True, HUGE, 2**63 - 1, np.int64(3)]))
    padding = odd(padding, st.sampled_from(["0", None, torch.tensor(0.0), 1j, 2**70]))
    out, error = outcome(lambda: jagged_to_padded_dense(values, offsets, max_length, padding),
                           ("values", "offsets", "max_length", "padding_value"))
    if out is None:
        if odd.changed or values.dtype.is_floating_point or padding in (0, 1, -1) and values.dtype != torch.bool:
            odd.check_rejection(error)  # (an unchanged padding of 0 or -1 suits integer values; 0 / 1 suit bool)
        return
    pieces = sequences(values, offsets)
    expected = torch.full((len(pieces), int(max_length), *values.shape[1:]), 0, dtype=values.dtype)
    expected[...] = float(padding) if values.dtype.is_floating_point else int(padding)
    assert values.dtype.is_floating_point or padding == int(padding)  # integer values got an integral padding
    for b, rows in enumerate(pieces):
        expected[b, : min(len(rows), int(max_length))] = rows[: int(max_length)]
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@fuzz(250)
@given(data=st.data(), inputs=jagged_inputs())
def test_dense_to_jagged_arguments(data, inputs):
    lengths, values, offsets = inputs
    width = max(lengths, default=0) + data.draw(st.integers(-1, 2))
    dense = random_values(data.draw, len(lengths), (max(width, 0), *values.shape[1:]), values.dtype)
    odd = Mutator(data.draw)
    dense = odd(dense, st.one_of(NOT_TENSORS, st.sampled_from([dense.flatten(0, 1), dense[:1], dense.sum()])))
    offsets = odd(offsets, odd_offsets(offsets))
    out, error = outcome(lambda: dense_to_jagged(dense, offsets), ("dense", "offsets"))
    if out is None:
        if width >= max(lengths, default=0):
            odd.check_rejection(error)
        return
    pieces = [dense[b, : int(offsets[b + 1] - offsets[b])] for b in range(offsets.numel() - 1)]
    expected = torch.cat(pieces) if pieces else dense.new_zeros(0, *dense.shape[2:])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@fuzz(250)
@given(data=st.data(), a=jagged_inputs(max_batch=3))
def test_concat_and_split_2d_jagged_arguments(data, a):
    lengths_a, values_a, offsets_a = a
    lengths_b = [data.draw(st.integers(0, 4)) for _ in lengths_a]
    values_b = random_values(data.draw, sum(lengths_b), values_a.shape[1:], values_a.dtype)
    offsets_b = offsets_of(lengths_b, data.draw(st.sampled_from([torch.int32, torch.int64])))
    odd = Mutator(data.draw)
    values_a = odd(values_a, odd_values(values_a))
    values_b = odd(values_b, st.one_of(odd_values(values_b), st.sampled_from(
        [values_b.to(torch.complex64), values_b.unsqueeze(-1)])))  # fmt: skip
    offsets_a = odd(offsets_a, odd_offsets(offsets_a))
    offsets_b = odd(offsets_b, odd_offsets(offsets_b))
    result, error = outcome(lambda: concat_2d_jagged(values_a, offsets_a, values_b, offsets_b), PAIR_ARGUMENTS)
    if result is not None:
        merged, offsets = result
        pieces = [p for pair in zip(sequences(values_a, offsets_a), sequences(values_b, offsets_b)) for p in pair]
        expected = torch.cat(pieces) if pieces else values_a[:0]
        torch.testing.assert_close(merged, expected, rtol=0, atol=0)
        assert offsets.dtype == torch.promote_types(offsets_a.dtype, offsets_b.dtype)
        assert offsets.tolist() == [x + y for x, y in zip(offsets_a.tolist(), offsets_b.tolist())]
        values = merged
    else:
        odd.check_rejection(error)
        values = values_a
    parts, error = outcome(lambda: split_2d_jagged(values, offsets_a, offsets_b), PAIR_ARGUMENTS)
    if parts is None:
        assert result is None, f"split rejected what concat produced: {error!r}"
        return
    n_a = offsets_a[1:] - offsets_a[:-1]
    firsts, rests = [], []
    for b, rows in enumerate(sequences(values, offsets_a + offsets_b.to(offsets_a.dtype))):
        firsts.append(rows[: int(n_a[b])])
        rests.append(rows[int(n_a[b]) :])
    for got, want in zip(parts, (firsts, rests)):
        torch.testing.assert_close(got, torch.cat(want) if want else values[:0], rtol=0, atol=0)


@fuzz(250)
@given(data=st.data(), inputs=jagged_inputs())
def test_candidate_mask_and_sequence_positions_arguments(data, inputs):
    lengths, _, offsets = inputs
    counts = torch.tensor([data.draw(st.integers(0, n)) for n in lengths], dtype=data.draw(
        st.sampled_from([torch.int32, torch.int64])))  # fmt: skip
    odd = Mutator(data.draw)
    counts = odd(counts, st.one_of(NOT_TENSORS, st.sampled_from(
        [counts.float(), counts - 1, counts + 7, torch.cat([counts, counts[:1]]) if len(lengths) else counts + 1,
         torch.full_like(counts, 2**40, dtype=torch.int64), counts.view(1, -1)])))  # fmt: skip
    offsets = odd(offsets, odd_offsets(offsets, huge=False))
    mask, error = outcome(lambda: candidate_mask(offsets, counts), ("seq_offsets", "num_candidates"))
    if mask is None:
        odd.check_rejection(error)
    else:
        lengths = (offsets[1:] - offsets[:-1]).tolist()
        assert mask.tolist() == [p >= n - int(c) for n, c in zip(lengths, counts) for p in range(n)]
    positions, error = outcome(lambda: sequence_positions(offsets), ("seq_offsets",))
    if positions is None:
        odd.check_rejection(error)
    else:
        assert positions.tolist() == [p for n in (offsets[1:] - offsets[:-1]).tolist() for p in range(n)]


def test_fuzz_error_contract_rejects_other_exceptions():
    # The harness itself: an exception other than ValueError / TypeError is a failure, not an accepted outcome.
    with pytest.raises(RuntimeError):
        outcome(lambda: torch.empty(2).view(3), ("x",))
    assert outcome(lambda: int("x"), ("x",))[1] is not None
    with pytest.raises(AssertionError, match="names no argument"):
        outcome(lambda: int("x"), ("y",))
