"""The parity rule itself: it must pass a faithful implementation and fail a wrong one."""

import pytest
import torch

from hstu.ops import hstu_attention, lengths_to_offsets
from hstu.testing import ParityError, assert_parity, attention_parity


def problem(dtype=torch.bfloat16):
    offsets = lengths_to_offsets(torch.tensor([5, 0, 1, 13]))
    q, k, v = (torch.randn(19, 2, 32).to(dtype) for _ in range(3))
    return q, k, v, offsets


def test_rule_arithmetic():
    ref = torch.tensor([1.0, 2.0])
    lowp = torch.tensor([1.0, 2.1])
    assert assert_parity("x", torch.tensor([1.0, 2.19]), ref, lowp, factor=2.0).ok
    with pytest.raises(ParityError, match="x: kernel error"):
        assert_parity("x", torch.tensor([1.0, 2.3]), ref, lowp, factor=2.0)
    with pytest.raises(ParityError, match="kernel error inf"):
        assert_parity("x", torch.tensor([float("nan"), 2.0]), ref, lowp, factor=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_path_passes(dtype):
    q, k, v, offsets = problem(dtype)
    rab = torch.randn(4, 2, 13, 13)
    results = attention_parity(q, k, v, offsets, 13, rab=rab, rab_requires_grad=True, alpha=0.2,
                               num_targets=torch.tensor([2, 0, 1, 3]))  # fmt: skip
    assert [r.name for r in results] == ["out", "dq", "dk", "dv", "drab"]


def test_wrong_implementation_fails():
    q, k, v, offsets = problem()

    def off_by_a_bit(q, k, v, offsets, max_seqlen, **kw):
        return hstu_attention(q, k, v, offsets, max_seqlen, **kw) * 1.05

    with pytest.raises(ParityError, match="out"):
        attention_parity(q, k, v, offsets, 13, impl=off_by_a_bit, backward=False)

    def ignores_causality(q, k, v, offsets, max_seqlen, **kw):
        kw["causal"] = False
        return hstu_attention(q, k, v, offsets, max_seqlen, **kw)

    with pytest.raises(ParityError):
        attention_parity(q, k, v, offsets, 13, impl=ignores_causality)
