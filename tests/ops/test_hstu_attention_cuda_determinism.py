"""The two backward paths: atomic dq (deterministic=False, the default) and the split, atomic-free one
(deterministic=True). Both against the fp32 reference, with and without dropout; the atomic path's dk / dv / drab
bitwise reproducible and its dq close to the split path's; the split path bitwise reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.ops.attention_cuda_common import (
    gpu_test,
    HEAD_DIMS,
    _random_config,
    _build_inputs,
    _describe,
    _check_config,
    _check_dropout_config,
)

pytestmark = pytest.mark.usefixtures("attention_cuda_env")


# Jagged batches (empty, length-1, odd lengths) x masks x rab kinds for both backward paths; fp16 on every other case.
_ATOMIC_CASES = {
    "causal_rab1": dict(rab_kind="one", rab_grad=True),
    "ctx_tgt_rabH": dict(rab_kind="heads", rab_grad=True, num_targets=[0, 1, 20, 9, 64, 3],
                         num_contexts=[0, 0, 5, 3, 12, 0]),
    "tgt_group_window_rab1": dict(rab_kind="one", rab_grad=True, window=17, num_targets=[0, 1, 20, 9, 64, 30],
                                  group=4),
    "noncausal_window_norab": dict(rab_kind="none", rab_grad=False, causal=False, window=40),
    "window_rabH_nograd": dict(rab_kind="heads", rab_grad=False, window=5, scaling=97),
}


@gpu_test
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(_ATOMIC_CASES))
def test_atomic_dq_parity(deterministic, dim, case):
    """Atomic-dq backward (deterministic=False) and the split backward (True) against the fp32 reference."""
    lengths = [0, 1, 77, 130, 255, 190]
    idx = list(_ATOMIC_CASES).index(case)
    cfg = dict(seed=60_000 + 10 * dim + idx, dtype=torch.float16 if (idx + dim // 32) % 2 else torch.bfloat16, dim=dim,
               heads=3, lengths=lengths, max_seqlen=max(lengths) + 1, causal=True, window=-1, num_contexts=None,
               num_targets=None, group=1, alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    cfg.update(_ATOMIC_CASES[case])
    try:
        _check_config(cfg, deterministic=deterministic)
    except AssertionError as err:
        raise AssertionError(f"deterministic={deterministic} {_describe(cfg)}: {err}") from None


@gpu_test
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_atomic_dq_parity_dropout(deterministic, dim):
    """Both backward paths with attention dropout (the dq scale carries 1 / (1 - p))."""
    cfg = dict(seed=61_000 + dim, dtype=torch.bfloat16, dim=dim, heads=2, lengths=[0, 1, 77, 130, 255], max_seqlen=255,
               causal=True, window=-1, num_contexts=None, num_targets=[0, 1, 20, 9, 64], group=2, rab_kind="one",
               rab_grad=True, alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    try:
        _check_dropout_config(cfg, 0.3, torch_seed=dim, deterministic=deterministic)
    except AssertionError as err:
        raise AssertionError(f"deterministic={deterministic} {_describe(cfg)}: {err}") from None


@gpu_test
@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_atomic_dq_matches_split_path(dim):
    """The atomic path's dk, dv and drab (no atomics there) are bitwise reproducible run to run, its dq differs only
    by the float32 summation order; its dq matches the split path's closely."""
    from hstu.ops import hstu_attention

    cfg = _random_config(11)
    cfg.update(dtype=torch.bfloat16, dim=dim, lengths=[300, 0, 1, 511, 64], max_seqlen=511, rab_kind="one",
               rab_grad=True, heads=4, causal=True, window=-1, num_contexts=None, num_targets=None)  # fmt: skip
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    runs = {}
    for det in (False, False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, rab)]
        out = hstu_attention(*leaves[:3], offsets, 511, rab=leaves[3], alpha=cfg["alpha"], deterministic=det)
        out.backward(torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda"
                                 ).to(out.dtype))  # fmt: skip
        runs.setdefault(det, []).append([t.grad.clone() for t in leaves])
    (a, b), (c,) = runs[False], runs[True]
    for name, x, y in zip(("dq", "dk", "dv", "drab"), a, b):
        assert not bool(torch.isnan(x).any()), name
        if name == "dq":
            torch.testing.assert_close(x.float(), y.float(), atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(x, y), name
    scale = float(c[0].float().abs().max())
    assert float((a[0].float() - c[0].float()).abs().max()) <= 2e-2 * max(scale, 1e-3)


@gpu_test
def test_backward_is_deterministic():
    from hstu.ops import hstu_attention

    cfg = _random_config(7)
    cfg.update(lengths=[300, 511, 64], max_seqlen=511, rab_kind="one", rab_grad=True, heads=4, causal=True)
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, rab)]
        out = hstu_attention(*leaves[:3], offsets, 511, rab=leaves[3], alpha=cfg["alpha"], deterministic=True)
        out.backward(torch.ones_like(out))
        grads.append([t.grad.clone() for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
