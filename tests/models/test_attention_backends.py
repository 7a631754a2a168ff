"""The triton attention backend refuses, with an error naming the argument, what Meta's kernel cannot apply (a
relative bias as a dense rab or as tables, attention dropout, full attention, target groups) instead of dropping
it; a call without them reaches the kernel. A stand-in kernel replaces Meta's package."""

from __future__ import annotations

import pytest
import torch

from hstu.modules import attention_backends
from hstu.modules.attention_backends import AttentionBackendError, triton_attention
from hstu.ops.hstu_attention import RelativeBiasTables


@pytest.fixture
def fake_kernel(monkeypatch):
    calls = []

    def kernel(N, alpha, q, k, v, seq_offsets, num_targets, contextual_seq_len):
        calls.append(dict(N=N, contextual_seq_len=contextual_seq_len))
        return torch.zeros_like(v)

    monkeypatch.setattr(attention_backends, "load_triton_attention", lambda: kernel)
    return calls


def _call(**overrides):
    q = torch.randn(5, 1, 4)
    kwargs = dict(alpha=0.5, scaling_seqlen=8, num_targets=None, num_contextual=1)
    kwargs.update(overrides)
    return triton_attention(q, q, q, torch.tensor([0, 2, 5]), 3, **kwargs)


@pytest.mark.parametrize("overrides, name", [
    (dict(rab=torch.zeros(2, 1, 3, 3)), "rab"),
    (dict(rab_tables=RelativeBiasTables(position_weights=torch.zeros(5))), "rab_tables"),
    (dict(dropout_p=0.1), "dropout_p=0.1"),
    (dict(causal=False), "causal=False"),
    (dict(target_group_size=2), "target_group_size=2"),
])  # fmt: skip
def test_triton_backend_refuses_what_it_cannot_apply(fake_kernel, overrides, name):
    with pytest.raises(AttentionBackendError, match=f"cannot apply {name}"):
        _call(**overrides)
    assert fake_kernel == []


def test_triton_backend_runs_the_kernel_without_them(fake_kernel):
    out = _call(rab=None, rab_tables=None, dropout_p=0.0, deterministic=True, num_contexts=None, window_size=-1)
    assert out.shape == (5, 1, 4) and fake_kernel == [dict(N=8, contextual_seq_len=1)]
