"""Parity of the fused CUDA HSTU attention kernels against the fp32 reference (2x forward / 5x gradient rule).

Skips without a GPU or without the compiled extension. On GPU: a seeded randomized sweep (HSTU_CUDA_TEST_CONFIGS
configs, default 320) over batch shapes (empty and length-1 sequences, lengths that are no tile multiple, a few
long sequences), heads, head dims, dtypes, every mask combination, rab none / 1-head / H-head with and without
gradient, alpha in {1/sqrt(D), 1}; forward and every gradient. Output buffers are NaN-poisoned before each launch
(HSTU_POISON_OUTPUTS=1) so unwritten elements fail.
"""

from __future__ import annotations

import math
import os
import random
import warnings

import pytest
import torch

from hstu.ops._extension import load_extension

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(load_extension() is None, reason="the hstu CUDA extension is not built"),
]

NUM_CONFIGS = int(os.environ.get("HSTU_CUDA_TEST_CONFIGS", "320"))
HEAD_DIMS = (32, 64, 128, 256)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("HSTU_POISON_OUTPUTS", "1")
    yield


def _random_config(seed: int) -> dict:
    rng = random.Random(seed)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    dim = HEAD_DIMS[seed % 4] if seed < 16 else rng.choice(HEAD_DIMS)
    long_case = seed % 60 == 59  # a few long sequences
    if long_case:
        max_len = rng.choice([4096, 8192])
        batch = rng.randint(1, 2)
        heads = rng.randint(1, 2)
    else:
        max_len = rng.choice([1, 2, 7, 16, 33, 64, 100, 127, 129, 200, 257, 383, 515, 1000])
        batch = rng.choice([1, 2, 3, 5, 8, 13, 32])
        heads = rng.randint(1, 8)
        while batch * max_len * heads > 40000 and batch > 1:
            batch //= 2
    lengths = [rng.randint(0, max_len) for _ in range(batch)]
    if batch >= 3:
        lengths[0] = 0
        lengths[1] = 1
    lengths[-1] = max_len if rng.random() < 0.7 else max(1, lengths[-1])  # all-empty batches: see test_empty_batch
    causal = rng.random() < 0.8
    window = -1
    if rng.random() < 0.35:
        window = rng.randint(0, max(1, max_len))
    num_contexts = num_targets = None
    group = 1
    if causal:
        if rng.random() < 0.4:
            num_targets = [rng.randint(0, n) for n in lengths]
            group = rng.choice([1, 1, 2, 3, 7])
        if rng.random() < 0.4:
            tg = num_targets or [0] * batch
            num_contexts = [rng.randint(0, min(n - t, 12)) for n, t in zip(lengths, tg)]
    rab_kind = rng.choice(["none", "none", "one", "heads"])
    rab_grad = rab_kind != "none" and rng.random() < 0.6
    alpha = rng.choice([1.0 / math.sqrt(dim), 1.0])
    max_seqlen = max_len + (rng.randint(0, 5) if rng.random() < 0.3 else 0)
    scaling = None if rng.random() < 0.6 else rng.randint(1, 2 * max_seqlen + 1)
    return dict(seed=seed, dtype=dtype, dim=dim, heads=heads, lengths=lengths, max_seqlen=max_seqlen, causal=causal,
                window=window, num_contexts=num_contexts, num_targets=num_targets, group=group, rab_kind=rab_kind,
                rab_grad=rab_grad, alpha=alpha, scaling=scaling)


def _build_inputs(cfg: dict, device: str = "cuda"):
    g = torch.Generator(device="cpu").manual_seed(cfg["seed"] + 1000)
    lengths = torch.tensor(cfg["lengths"], dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    total, heads, dim = int(offsets[-1]), cfg["heads"], cfg["dim"]
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(device=device, dtype=cfg["dtype"]) for _ in range(3))
    rab = None
    if cfg["rab_kind"] != "none":
        rh = 1 if cfg["rab_kind"] == "one" else heads
        n = cfg["max_seqlen"]
        rab = torch.randn(len(lengths), rh, n, n, generator=g).to(device=device, dtype=cfg["dtype"])
    as_i32 = lambda xs: None if xs is None else torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return q, k, v, offsets.to(device=device, dtype=torch.int32), rab, as_i32(cfg["num_contexts"]), as_i32(
        cfg["num_targets"]
    )


def _describe(cfg: dict) -> str:
    keys = ("seed", "dtype", "dim", "heads", "max_seqlen", "causal", "window", "group", "rab_kind", "rab_grad", "alpha",
            "scaling")  # fmt: skip
    lens = cfg["lengths"]
    return " ".join(f"{k}={cfg[k]}" for k in keys) + f" B={len(lens)} lengths={lens[:8]}{'...' if len(lens) > 8 else ''}" + (
        f" ctx={cfg['num_contexts'][:8]}" if cfg["num_contexts"] else "") + (
        f" tgt={cfg['num_targets'][:8]}" if cfg["num_targets"] else "")  # fmt: skip


def _check_config(cfg: dict) -> None:
    from hstu.ops.hstu_attention import cuda
    from hstu.testing.parity import attention_parity

    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    assert cuda.unsupported_reason(q, k, v, rab, 0.0) is None, cuda.unsupported_reason(q, k, v, rab, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn: fail instead
        attention_parity(
            q, k, v, offsets, cfg["max_seqlen"], rab=rab, rab_requires_grad=cfg["rab_grad"], alpha=cfg["alpha"],
            scaling_seqlen=cfg["scaling"], causal=cfg["causal"], window_size=cfg["window"], num_contexts=nc,
            num_targets=nt, target_group_size=cfg["group"],
        )  # fmt: skip


@pytest.mark.parametrize("seed", range(NUM_CONFIGS))
def test_parity_random(seed):
    cfg = _random_config(seed)
    try:
        _check_config(cfg)
    except AssertionError as err:
        raise AssertionError(f"{_describe(cfg)}: {err}") from None


@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("mask", ["causal", "noncausal", "window", "ctx_tgt", "noncausal_window", "tgt_group_window"])
def test_parity_mask_grid(dim, mask):
    """Every mask family at every head dim, 1-head rab with gradient, odd lengths."""
    lengths = [0, 1, 77, 130, 255]
    n = max(lengths)
    cfg = dict(seed=10_000 + dim + len(mask), dtype=torch.bfloat16, dim=dim, heads=3, lengths=lengths, max_seqlen=n,
               causal=mask not in ("noncausal", "noncausal_window"), window=-1, num_contexts=None, num_targets=None,
               group=1, rab_kind="one", rab_grad=True, alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    if "window" in mask:
        cfg["window"] = 17
    if mask in ("ctx_tgt", "tgt_group_window"):
        cfg["num_targets"] = [0, 1, 20, 9, 64]
        cfg["group"] = 1 if mask == "ctx_tgt" else 4
    if mask == "ctx_tgt":
        cfg["num_contexts"] = [0, 0, 5, 3, 12]
    _check_config(cfg)


@pytest.mark.parametrize("rab_heads", [0, 1, 2])
def test_empty_batch(rab_heads):
    """T = 0 (every sequence empty): output and gradients are empty / zero, nothing is launched out of bounds."""
    from hstu.ops import hstu_attention

    q, k, v = (torch.randn(0, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    offsets = torch.zeros(3, dtype=torch.int32, device="cuda")
    rab = torch.randn(2, rab_heads, 4, 4, device="cuda", requires_grad=True) if rab_heads else None
    out = hstu_attention(q, k, v, offsets, 4, rab=rab)
    assert out.shape == (0, 2, 64)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    if rab is not None:
        assert rab.grad is None or bool((rab.grad == 0).all())
    torch.cuda.synchronize()


@pytest.mark.parametrize("rab_heads", [1, 3])
def test_float32_rab_with_bf16_inputs(rab_heads):
    """rab in float32 next to bf16 q/k/v: the binding casts it for the kernel and returns drab in float32."""
    from hstu.testing.parity import attention_parity

    cfg = dict(seed=4242, dtype=torch.bfloat16, dim=64, heads=3, lengths=[5, 130, 64], max_seqlen=130, causal=True,
               window=-1, num_contexts=None, num_targets=None, group=1, rab_kind="none", rab_grad=False,
               alpha=0.125, scaling=None)  # fmt: skip
    q, k, v, offsets, _, _, _ = _build_inputs(cfg)
    rab = torch.randn(3, rab_heads, 131, 133, device="cuda", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        attention_parity(q, k, v, offsets, 130, rab=rab, rab_requires_grad=True, alpha=0.125)


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


def test_unsupported_head_dim_falls_back():
    from hstu.ops import hstu_attention
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.reference import hstu_attention_reference

    q = torch.randn(10, 2, 48, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    assert cuda.unsupported_reason(q, q, q, None, 0.0) is not None
    assert cuda.unsupported_reason(q.float(), q.float(), q.float(), None, 0.0) is not None
    assert cuda.unsupported_reason(q[..., :32].contiguous(), q[..., :32].contiguous(), q[..., :32].contiguous(), None,
                                   0.5) is not None  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hstu_attention(q, q, q, offsets, 6)
    torch.testing.assert_close(out, hstu_attention_reference(q, q, q, offsets, 6), atol=0, rtol=0)


def test_bad_inputs_raise_before_launch():
    from hstu.ops import hstu_attention

    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    with pytest.raises((ValueError, TypeError)):
        hstu_attention(q, q.half(), q, offsets, 6)
    with pytest.raises((ValueError, TypeError)):
        hstu_attention(q, q, q, torch.tensor([0, 6, 4], dtype=torch.int32, device="cuda"), 6)
    with pytest.raises((ValueError, TypeError)):
        hstu_attention(q, q, q, offsets, 5)  # a length above max_seqlen
    with pytest.raises((ValueError, TypeError)):
        hstu_attention(q, q, q, offsets, 6, num_targets=torch.tensor([5, 1], dtype=torch.int32, device="cuda"))
    # The extension itself refuses mismatched arguments before launching anything.
    ext = load_extension()
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError):
        ext.hstu_attn_fwd(q, q.half(), q, offsets, 6, 1.0, 6, True, -1, None, None, 1, None, out)
    with pytest.raises(RuntimeError):
        ext.hstu_attn_fwd(q, q, q, offsets.long(), 6, 1.0, 6, True, -1, None, None, 1, None, out)
    torch.cuda.synchronize()  # no asynchronous error was left behind
