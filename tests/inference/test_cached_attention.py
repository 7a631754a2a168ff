"""Cached attention: the new rows' outputs equal the same rows of a full hstu_attention recompute over
``cache ++ delta`` (the parity rule against a float64 reference), and bad arguments are named errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.ops import hstu_attention_reference
from hstu.ops.cached_attention import cached_hstu_attention
from hstu.testing.parity import FORWARD_FACTOR, assert_parity


def _jagged(rows_per_seq, heads, dim, dtype, generator):
    total = sum(rows_per_seq)
    return torch.randn(total, heads, dim, generator=generator).to(dtype)


def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 3))
    cache = [draw(st.integers(0, 12)) for _ in range(batch)]
    delta = [draw(st.integers(1, 6)) for _ in range(batch)]
    targets = [draw(st.integers(0, n)) for n in delta]
    with_contexts = draw(st.booleans())
    contexts = [draw(st.integers(0, min(2, c + n - t))) for c, n, t in zip(cache, delta, targets)]
    return dict(
        cache=cache, delta=delta, targets=targets, contexts=contexts if with_contexts else None,
        group=draw(st.sampled_from([1, 1, 2, 3])), window=draw(st.sampled_from([-1, -1, 0, 3])),
        heads=draw(st.integers(1, 2)), dim=draw(st.sampled_from([4, 8])),
        rab=draw(st.sampled_from([None, 1, "heads"])), dtype=draw(st.sampled_from([torch.float32, torch.bfloat16,
                                                                                    torch.float16])),
        seed=draw(st.integers(0, 2**16)),
    )


def _full_inputs(p, dtype):
    """q/k/v of the whole sequences cache_b ++ delta_b, jagged, in ``dtype`` (a fixed seed: same values in every
    dtype up to rounding)."""
    g = torch.Generator().manual_seed(p["seed"])
    lengths = [c + n for c, n in zip(p["cache"], p["delta"])]
    q, k, v = (_jagged(lengths, p["heads"], p["dim"], torch.float64, g) for _ in range(3))
    n = max(lengths)
    rab = None
    if p["rab"] is not None:
        rab = torch.randn(len(lengths), p["heads"] if p["rab"] == "heads" else 1, n, n, generator=g,
                          dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], (rab.to(dtype) if rab is not None else None), lengths


def _split(t, p):
    """(cached rows, delta rows) of a jagged tensor of the whole sequences."""
    cached, fresh, start = [], [], 0
    for c, n in zip(p["cache"], p["delta"]):
        cached.append(t[start:start + c])
        fresh.append(t[start + c:start + c + n])
        start += c + n
    return torch.cat(cached), torch.cat(fresh)


def _rab_rows(rab, p):
    """rab rows of the new rows: (B, Hr, max n, N) with row i = whole-sequence row c_b + i."""
    n_q = max(p["delta"])
    out = torch.zeros(rab.shape[0], rab.shape[1], n_q, rab.shape[3], dtype=rab.dtype)
    for b, (c, n) in enumerate(zip(p["cache"], p["delta"])):
        out[b, :, :n] = rab[b, :, c:c + n]
    return out


def _counts(p, device="cpu"):
    return dict(num_targets=torch.tensor(p["targets"], device=device),
                num_contexts=torch.tensor(p["contexts"], device=device) if p["contexts"] is not None else None)


def _full(p, dtype, upcast, device="cpu"):
    """The new rows of a full hstu_attention_reference over the whole sequences (upcast=False: the same-dtype
    baseline of the parity rule)."""
    (q, k, v), rab, lengths = _full_inputs(p, dtype)
    q, k, v = (t.to(device) for t in (q, k, v))
    rab = None if rab is None else rab.to(device)
    out = hstu_attention_reference(q, k, v, _offsets(lengths).to(device), max(lengths), alpha=0.5, scaling_seqlen=40,
                                   window_size=p["window"], target_group_size=p["group"], rab=rab, upcast=upcast,
                                   **_counts(p, device))
    return _split(out, p)[1]


def _cached(p, dtype, fn=cached_hstu_attention, device="cpu"):
    """fn (cached_hstu_attention, its reference, a kernel binding) over the problem's cached and new rows."""
    (q, k, v), rab, _ = _full_inputs(p, dtype)
    (_, dq), (ck, dk), (cv, dv) = _split(q, p), _split(k, p), _split(v, p)
    dq, dk, dv, ck, cv = (t.to(device) for t in (dq, dk, dv, ck, cv))
    return fn(
        dq, dk, dv, _offsets(p["delta"]).to(device), ck, cv, _offsets(p["cache"]).to(device), alpha=0.5,
        scaling_seqlen=40, window_size=p["window"], target_group_size=p["group"], **_counts(p, device),
        rab=_rab_rows(rab, p).to(device) if rab is not None else None,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(problems())
def test_delta_rows_match_full_recompute(p):
    dtype = p["dtype"]
    out = _cached(p, dtype)
    assert out.dtype == dtype and out.shape == (sum(p["delta"]), p["heads"], p["dim"])
    ref = _full(p, torch.float64, True)
    # The cached rows sum their keys in another order than the full pass: allow a few ulps of the output's scale on
    # top of the 2x rule (the same-dtype full pass can land within one rounding of the float64 result).
    floor = 8 * torch.finfo(dtype).eps * max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-3)
    assert_parity("cached attention", out, ref, _full(p, dtype, False), factor=FORWARD_FACTOR, abs_floor=floor)


def test_m_falcon_candidates_do_not_see_each_other():
    """Changing one candidate's key/value leaves the other candidates' outputs unchanged (group size 1), and
    changes them with group size 2 for its group partner."""
    p = dict(cache=[5], delta=[4], targets=[4], contexts=None, group=1, window=-1, heads=1, dim=8, rab=None,
             dtype=torch.float32, seed=3)
    (q, k, v), _, _ = _full_inputs(p, torch.float32)
    (_, dq), (ck, dk), (cv, dv) = _split(q, p), _split(k, p), _split(v, p)

    def run(dk, dv, group):
        return cached_hstu_attention(dq, dk, dv, _offsets([4]), ck, cv, _offsets([5]), alpha=0.5, scaling_seqlen=9,
                                     num_targets=torch.tensor([4]), target_group_size=group)

    changed_k, changed_v = dk.clone(), dv.clone()
    changed_k[0], changed_v[0] = 10.0, -10.0
    for group, partner_changes in ((1, False), (2, True)):
        before, after = run(dk, dv, group), run(changed_k, changed_v, group)
        assert not torch.equal(before[0], after[0])
        assert torch.equal(before[1], after[1]) != partner_changes
        assert torch.equal(before[2:], after[2:])


def test_unseen_nonfinite_cache_entries_change_nothing():
    """A NaN in a value / key that no new row sees (a future row under causality) leaves the outputs finite."""
    p = dict(cache=[3], delta=[3], targets=[0], contexts=None, group=1, window=-1, heads=1, dim=4, rab=None,
             dtype=torch.float32, seed=1)
    (q, k, v), _, _ = _full_inputs(p, torch.float32)
    (_, dq), (ck, dk), (cv, dv) = _split(q, p), _split(k, p), _split(v, p)
    args = (_offsets([3]), ck, cv, _offsets([3]))
    clean = cached_hstu_attention(dq, dk, dv, *args, alpha=0.5, scaling_seqlen=6)
    dk, dv = dk.clone(), dv.clone()
    dk[2], dv[2] = float("nan"), float("inf")
    poisoned = cached_hstu_attention(dq, dk, dv, *args, alpha=0.5, scaling_seqlen=6)
    assert torch.equal(poisoned[:2], clean[:2])
    assert torch.isnan(poisoned[2]).all()  # the row that sees its own NaN key


@pytest.mark.parametrize("change, message", [
    (dict(k=torch.zeros(2, 1, 4, dtype=torch.float64)), "dtype"),
    (dict(cached_k=torch.zeros(3, 2, 4)), "cached_k"),
    (dict(cache_offsets=torch.tensor([0, 3, 3])), "cache_offsets"),
    (dict(delta_offsets=torch.tensor([0, 1])), "delta_offsets"),
    (dict(num_targets=torch.tensor([3])), "num_targets"),
    (dict(num_targets=torch.tensor([-1])), "num_targets"),
    (dict(rab=torch.zeros(1, 1, 2, 4)), "rab"),
    (dict(scaling_seqlen=0), "scaling_seqlen"),
    (dict(target_group_size=0), "target_group_size"),
    (dict(q="not a tensor"), "q"),
])
def test_bad_arguments_are_named(change, message):
    args = dict(q=torch.zeros(2, 1, 4), k=torch.zeros(2, 1, 4), v=torch.zeros(2, 1, 4), delta_offsets=torch.tensor([0, 2]),
                cached_k=torch.zeros(3, 1, 4), cached_v=torch.zeros(3, 1, 4), cache_offsets=torch.tensor([0, 3]),
                alpha=1.0, scaling_seqlen=5)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        cached_hstu_attention(**args)
