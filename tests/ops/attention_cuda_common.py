"""Helpers shared by the CUDA attention test files (tests/ops/test_hstu_attention_cuda_*.py): the GPU / extension
skip, random and fixed problem configurations and their inputs, and the parity checks through the public op
against the fp32 reference (2x forward / 5x gradient rule), without and with attention dropout.

The files run under the ``attention_cuda_env`` fixture (tests/ops/conftest.py): output buffers NaN-poisoned before
each launch (HSTU_POISON_OUTPUTS=1) so unwritten elements fail, and the default KernelVariant.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from hstu.ops._extension import load_extension


_NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_NEEDS_EXT = pytest.mark.skipif(load_extension() is None, reason="the hstu CUDA extension is not built")


def gpu_test(fn):
    """Skip without a GPU or without the compiled extension (the test_cpu_* tests run everywhere)."""
    return _NEEDS_GPU(_NEEDS_EXT(fn))


HEAD_DIMS = (32, 64, 128, 256)


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


def _op_with(deterministic):
    """hstu_attention with an explicit backward mode (None: the op's default; the atomic-dq path in these tests)."""
    from hstu.ops import hstu_attention

    if deterministic is None:
        return hstu_attention
    return lambda *args, **kwargs: hstu_attention(*args, deterministic=deterministic, **kwargs)


def _check_config(cfg: dict, deterministic=None) -> None:
    from hstu.ops.hstu_attention import cuda
    from hstu.testing.parity import attention_parity

    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    assert cuda.unsupported_reason(q, k, v, rab, 0.0) is None, cuda.unsupported_reason(q, k, v, rab, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn: fail instead
        attention_parity(
            q, k, v, offsets, cfg["max_seqlen"], impl=_op_with(deterministic), rab=rab,
            rab_requires_grad=cfg["rab_grad"], alpha=cfg["alpha"],
            scaling_seqlen=cfg["scaling"], causal=cfg["causal"], window_size=cfg["window"], num_contexts=nc,
            num_targets=nt, target_group_size=cfg["group"],
        )  # fmt: skip


DROPOUT_PS = (0.1, 0.5)


def _op_seed(torch_seed: int) -> int:
    """The dropout_seed that hstu_attention draws right after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**62, (1,)).item())


def _seeded_op(torch_seed: int, deterministic=None):
    """hstu_attention with its dropout seed pinned by torch.manual_seed (ignores the reference-only dropout_mask)."""
    from hstu.ops import hstu_attention

    def impl(*args, dropout_mask=None, **kwargs):
        torch.manual_seed(torch_seed)
        if deterministic is not None:
            kwargs["deterministic"] = deterministic
        return hstu_attention(*args, **kwargs)

    return impl


def _check_dropout_config(cfg: dict, p: float, torch_seed: int, deterministic=None) -> None:
    """Kernel forward + every gradient vs the fp32 reference applied with the kernels' own keep mask."""
    from hstu.ops.hstu_attention import cuda
    from hstu.testing.parity import attention_parity

    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    assert cuda.unsupported_reason(q, k, v, rab, p) is None, cuda.unsupported_reason(q, k, v, rab, p)
    seed = _op_seed(torch_seed)
    mask = cuda.dropout_keep_mask(seed, len(cfg["lengths"]), cfg["heads"], cfg["max_seqlen"], p, device=q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn: fail instead
        attention_parity(
            q, k, v, offsets, cfg["max_seqlen"], impl=_seeded_op(torch_seed, deterministic), rab=rab,
            rab_requires_grad=cfg["rab_grad"], alpha=cfg["alpha"], scaling_seqlen=cfg["scaling"],
            causal=cfg["causal"], window_size=cfg["window"], num_contexts=nc, num_targets=nt,
            target_group_size=cfg["group"], dropout_p=p, dropout_mask=mask,
        )  # fmt: skip
