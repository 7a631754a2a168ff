"""The CUDA cached-attention forward (csrc/hstu_attention/cached.h through hstu.ops.cached_attention.cuda) against
the fp32 cached reference under the parity rule (|kernel - fp32 ref| <= 2 x |same-dtype full recompute - fp32 ref|),
on fresh random inputs. Skips without a GPU or the compiled extension (the CPU emulation of the same kernel runs in
test_hstu_attention_cuda_emulation.py)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.ops.attention_cuda_common import gpu_test

pytestmark = pytest.mark.usefixtures("attention_cuda_env")


@pytest.fixture(autouse=True)
def _cached_kernels_on(monkeypatch):
    # the dispatcher's switch stays off until this file passes on a GPU: here the kernel is what is tested
    from hstu.ops.cached_attention import op

    monkeypatch.setattr(op, "USE_CUDA_KERNELS", True)


def _random_problem(seed: int) -> dict:
    r = random.Random(seed)
    batch = r.randint(1, 6)
    cache = [r.choice([0, 1, r.randint(2, 700)]) for _ in range(batch)]
    delta = [r.choice([0, 1, r.randint(2, 260)]) for _ in range(batch)]
    targets = [r.randint(0, n) for n in delta]
    contexts = None
    if r.random() < 0.4:
        contexts = [r.randint(0, min(8, c + n - t)) for c, n, t in zip(cache, delta, targets)]
    return dict(cache=cache, delta=delta, targets=targets, contexts=contexts, heads=r.randint(1, 4),
                group=r.choice([1, 1, 2, 5]), window=r.choice([-1, -1, 0, 64]), dim=r.choice([32, 64, 128, 256]),
                rab=r.choice([None, 1, "heads"]), dtype=r.choice([torch.bfloat16, torch.float16]), seed=seed)


def _check(p: dict) -> None:
    from hstu.ops.cached_attention import cached_attention_reference, cached_hstu_attention, cuda, op
    from hstu.testing.parity import FORWARD_FACTOR, assert_parity
    from tests.inference.test_cached_attention import _cached, _full

    q = torch.empty(1, p["heads"], p["dim"], dtype=p["dtype"], device="cuda")
    assert op._kernel_for(q, q, None if p["rab"] is None else q) is cuda.forward, cuda.unsupported_reason(q, q, None)
    got = _cached(p, p["dtype"], cached_hstu_attention, device="cuda")
    want = _cached(p, torch.float32, cached_attention_reference, device="cuda")
    assert got.shape == want.shape and got.dtype == p["dtype"]
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) or non-finite rows"
    assert_parity(f"cached out {p}", got.float(), want, _full(p, p["dtype"], False, device="cuda").float(),
                  factor=FORWARD_FACTOR)  # fmt: skip


@gpu_test
@pytest.mark.parametrize("seed", range(40))
def test_cached_kernel_parity_random(seed):
    """Random batches: cache lengths 0 / 1 / up to 700, new rows 0 / 1 / up to 260 (several query tiles), M-FALCON
    targets and groups, contexts, windows, rab none / 1-head / H-head, every head dim, both dtypes."""
    p = _random_problem(seed)
    if sum(p["delta"]) == 0:
        p["delta"][0] = 1
    _check(p)


@gpu_test
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_cached_kernel_one_user_long_history(dim):
    """The serving shape: one user, 4096 cached tokens, 128 M-FALCON candidates (and a 1-row append)."""
    for delta, targets in ((128, 128), (1, 0)):
        _check(dict(cache=[4096], delta=[delta], targets=[targets], contexts=None, heads=2, group=1, window=-1,
                    dim=dim, rab=None, dtype=torch.bfloat16, seed=dim + delta))  # fmt: skip


@gpu_test
def test_cached_kernel_empty_inputs():
    """No new rows at all (every delta empty, or no users) gives an empty output; empty caches are plain causal
    attention over the new rows."""
    from hstu.ops.cached_attention import cached_hstu_attention

    dev, h, d = "cuda", 2, 64
    empty = torch.zeros(0, h, d, dtype=torch.bfloat16, device=dev)
    cache = torch.randn(5, h, d, device=dev).bfloat16()
    out = cached_hstu_attention(empty, empty, empty, torch.tensor([0, 0, 0], device=dev), cache, cache,
                                torch.tensor([0, 2, 5], device=dev), alpha=0.5, scaling_seqlen=8)  # fmt: skip
    assert out.shape == (0, h, d)
    out = cached_hstu_attention(empty, empty, empty, torch.tensor([0], device=dev), empty, empty,
                                torch.tensor([0], device=dev), alpha=0.5, scaling_seqlen=8)  # fmt: skip
    assert out.shape == (0, h, d)
    _check(dict(cache=[0, 0], delta=[1, 37], targets=[0, 5], contexts=None, heads=h, group=1, window=-1, dim=d,
                rab=None, dtype=torch.float16, seed=1))  # fmt: skip


@gpu_test
def test_cached_kernel_dispatch():
    """The kernel takes bf16 / fp16 CUDA calls with Dqk == Dv at a built head dim; everything else the reference."""
    from hstu.ops.cached_attention import cuda, op

    q = torch.zeros(1, 2, 64, dtype=torch.bfloat16, device="cuda")
    assert op._kernel_for(q, q, None) is cuda.forward
    assert op._kernel_for(q.float(), q.float(), None) is None
    assert op._kernel_for(q, torch.zeros(1, 2, 32, dtype=torch.bfloat16, device="cuda"), None) is None
    assert op._kernel_for(torch.zeros(1, 2, 48, dtype=torch.bfloat16, device="cuda"),
                          torch.zeros(1, 2, 48, dtype=torch.bfloat16, device="cuda"), None) is None
    assert op._kernel_for(q.cpu(), q.cpu(), None) is None


@gpu_test
@pytest.mark.parametrize("seed", range(12))
def test_paged_cached_kernel_equals_contiguous(seed):
    """The paged cached kernel (page tables into a shuffled pool, pages of 16 / 32 / 64 rows, spare pages NaN) gives
    the contiguous kernel's outputs bit for bit, and the contiguous kernel's parity (test above) carries over."""
    from hstu.ops.cached_attention import cached_hstu_attention
    from tests.inference.test_cached_attention import _cached
    from tests.ops.test_hstu_attention_cuda_emulation import _page_layout, _to_pool

    p = _random_problem(1000 + seed)
    if sum(p["delta"]) == 0:
        p["delta"][0] = 1
    page_size = random.Random(seed).choice([16, 32, 64])
    pages_per_seq = max((n + page_size - 1) // page_size for n in p["cache"]) + 1
    table, num_pages, rows = _page_layout(p["cache"], page_size, pages_per_seq, torch.Generator().manual_seed(seed))

    def paged(q, k, v, delta_offsets, cached_k, cached_v, cache_offsets, **kw):
        pools = (_to_pool(t.cpu(), rows, num_pages, page_size).cuda() for t in (cached_k, cached_v))
        return cached_hstu_attention(q, k, v, delta_offsets, *pools, cache_offsets, page_table=table.cuda(),
                                     page_size=page_size, **kw)

    got = _cached(p, p["dtype"], paged, device="cuda")
    assert torch.isfinite(got).all()
    assert torch.equal(got, _cached(p, p["dtype"], cached_hstu_attention, device="cuda"))
