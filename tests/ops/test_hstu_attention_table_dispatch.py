"""Dispatch of bias-table calls (hstu_attention(rab_tables=...)) to the fused kernel.

CPU tests with a stand-in extension whose kernels are the PyTorch reference: when the built kernels do not read the
tables (cuda.reads_rab_tables() False) the binding gets a dense rab gathered from them and no table keywords, and the
tables' gradients come from the dense rab's gradient; when they do, the binding gets the tables. Either way the
output and every gradient equal the reference path's. The GPU test (skipped on CPU) checks the dense path's parity
with the real kernels (2x / 5x rule) and that deterministic=True gives bitwise-equal table gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hstu.ops.hstu_attention import RelativeBiasTables, cuda, hstu_attention, hstu_attention_reference, op, reference
from hstu.ops.hstu_attention.args import AttentionArgs
from hstu.testing.parity import BACKWARD_FACTOR, FORWARD_FACTOR, assert_parity


class ReferenceExtension:
    """The binding's two entry points computed by the PyTorch reference (float64 here), recording each call."""

    def __init__(self):
        self.calls = []

    class KernelOptions:
        def __init__(self, **fields):
            self.fields = fields

    @staticmethod
    def _args(positional, kwargs) -> AttentionArgs:
        q, k, v, offsets, max_seqlen, alpha, scaling, causal, window, contexts, targets, group, rab = positional
        return AttentionArgs(q, k, v, offsets, max_seqlen, alpha, scaling, causal, window, contexts, targets, group,
                             rab, kwargs["dropout_p"], kwargs["dropout_seed"], kwargs["options"].fields["deterministic"],
                             kwargs.get("rab_position_weights"), kwargs.get("rab_time_weights"),
                             kwargs.get("rab_timestamps"), kwargs.get("rab_next_timestamps"),
                             kwargs.get("rab_shared_positions"), "next" if kwargs.get("rab_time_next") else "query",
                             kwargs.get("rab_time_divisor", 0.301))  # fmt: skip

    def hstu_attn_fwd(self, *positional, **kwargs):
        self.calls.append(("fwd", positional[12], kwargs))
        positional[13].copy_(reference.forward(self._args(positional[:13], kwargs)))

    def hstu_attn_bwd(self, grad_out, *positional, **kwargs):
        self.calls.append(("bwd", positional[12], kwargs))
        args = self._args(positional[:13], kwargs)
        dq, dk, dv, drab = positional[13:17]
        wants_tables = kwargs.get("drab_position") is not None or kwargs.get("drab_time") is not None
        grads = reference.backward(grad_out, args, drab is not None or wants_tables)
        for out, grad in zip((dq, dk, dv, drab, kwargs.get("drab_position"), kwargs.get("drab_time")), grads):
            if out is not None:
                out.copy_(grad)


@pytest.fixture
def fake_kernels(monkeypatch):
    ext = ReferenceExtension()
    monkeypatch.setattr(cuda, "load_extension", lambda: ext)
    monkeypatch.setattr(op, "_use_kernel", lambda args: True)
    monkeypatch.setattr(op, "_padded_head_dim", lambda q, v: 0)
    cuda._ext_options.cache_clear()
    yield ext, monkeypatch
    cuda._ext_options.cache_clear()


@st.composite
def problems(draw):
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    total = sum(lengths)
    heads = draw(st.integers(1, 2))
    use_time, use_position = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    targets = [draw(st.integers(0, length)) for length in lengths] if draw(st.booleans()) else None
    shared = [draw(st.integers(0, length)) for length in lengths] if use_position and draw(st.booleans()) else None
    return dict(lengths=lengths, heads=heads, use_time=use_time, use_position=use_position, targets=targets,
                shared=shared, per_head_time=draw(st.booleans()), per_head_position=draw(st.booleans()),
                reference=draw(st.sampled_from(["query", "next"])), buckets=draw(st.sampled_from([1, 4, 32])),
                half=draw(st.integers(1, 8)), max_slack=draw(st.integers(0, 2)),
                times=[draw(st.integers(0, 10**6)) for _ in range(total)], seed=draw(st.integers(0, 2**16)))  # fmt: skip


def build(p, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(p["seed"])
    lengths, heads = p["lengths"], p["heads"]
    total = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v = (torch.randn(total, heads, 8, generator=g, dtype=torch.float64) for _ in range(3))
    time = pos = times = None
    if p["use_time"]:
        time = torch.randn((heads, p["buckets"] + 1) if p["per_head_time"] else (p["buckets"] + 1,), generator=g,
                           dtype=torch.float64)  # fmt: skip
        times = torch.tensor(sorted(p["times"]), dtype=torch.int64)
    if p["use_position"]:
        pos = torch.randn((heads, 2 * p["half"] - 1) if p["per_head_position"] else (2 * p["half"] - 1,),
                          generator=g, dtype=torch.float64)  # fmt: skip
    shared = None if p["shared"] is None else torch.tensor(p["shared"])
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    tables = RelativeBiasTables(to(pos), to(time), to(times), p["reference"], None, to(shared))
    targets = None if p["targets"] is None else to(torch.tensor(p["targets"]))
    grad_out = torch.randn(total, heads, 8, generator=g, dtype=torch.float64)
    max_seqlen = max(lengths) + p["max_slack"]
    return [to(t.to(dtype)) for t in (q, k, v)], to(offsets), max_seqlen, tables, targets, to(grad_out.to(dtype))


def _leaves(tables: RelativeBiasTables, dtype=None) -> RelativeBiasTables:
    return tables._replace(**{name: getattr(tables, name).detach().to(dtype or getattr(tables, name).dtype)
                              .requires_grad_() for name in ("position_weights", "time_weights")
                              if getattr(tables, name) is not None})  # fmt: skip


def run(fn, p, dtype=torch.float64, device="cpu", table_dtype=None, **kwargs):
    """fn's output and the gradients of q, k, v and the tables (zeros for an unused table)."""
    qkv, offsets, max_seqlen, tables, targets, grad_out = build(p, dtype, device)
    qkv = [t.requires_grad_() for t in qkv]
    tables = _leaves(tables, table_dtype)
    out = fn(*qkv, offsets, max_seqlen, alpha=0.4, num_targets=targets, rab_tables=tables, **kwargs)
    weights = [w for w in tables[:2] if w is not None]
    grads = torch.autograd.grad(out, qkv + weights, grad_out.to(out.dtype), materialize_grads=True,
                                allow_unused=True)  # fmt: skip
    return out.detach(), grads


SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(problems(), st.booleans())
def test_kernels_without_table_support_get_the_dense_rab(fake_kernels, p, deterministic):
    ext, monkeypatch = fake_kernels
    monkeypatch.setattr(cuda, "reads_rab_tables", lambda: False)
    ext.calls.clear()
    got_out, got = run(hstu_attention, p, deterministic=deterministic)
    assert [c[0] for c in ext.calls] == ["fwd", "bwd"]
    heads = p["heads"] if (p["use_time"] and p["per_head_time"]) or (p["use_position"] and p["per_head_position"]) \
        else 1  # fmt: skip
    max_seqlen = max(p["lengths"]) + p["max_slack"]
    for _, rab, kwargs in ext.calls:
        assert rab is not None and rab.dtype == torch.float64
        assert rab.shape == (len(p["lengths"]), heads, max_seqlen, max_seqlen)
        assert not any(key.startswith(("rab_", "drab_")) for key in kwargs)
    _assert_reference_results(monkeypatch, p, got_out, got, deterministic=deterministic)


def _assert_reference_results(monkeypatch, p, got_out, got, **kwargs):
    """got_out / got equal the reference path's (no kernel) for the same call; the tables' gradients to the
    binding's float32 workspaces (float32 drab on the dense path), q, k, v's exactly to float64 rounding."""
    with monkeypatch.context() as patch:
        patch.setattr(op, "_use_kernel", lambda args: False)
        want_out, want = run(hstu_attention, p, **kwargs)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    for i, (a, b) in enumerate(zip(got, want)):
        tolerance = 1e-12 if i < 3 else 1e-6
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_kernels_reading_tables_get_the_tables(fake_kernels):
    ext, monkeypatch = fake_kernels
    monkeypatch.setattr(cuda, "reads_rab_tables", lambda: True)
    p = dict(lengths=[4, 0, 6], heads=2, use_time=True, use_position=True, targets=[1, 0, 2], shared=[1, 0, 2],
             per_head_time=True, per_head_position=False, reference="next", buckets=8, half=4, max_slack=1,
             times=list(range(0, 10**5, 10**4)), seed=3)  # fmt: skip
    got_out, got = run(hstu_attention, p)
    assert [c[0] for c in ext.calls] == ["fwd", "bwd"]
    for _, rab, kwargs in ext.calls:
        assert rab is None
        assert kwargs["rab_position_weights"].shape == (7,) and kwargs["rab_time_weights"].shape == (2, 9)
        assert kwargs["rab_time_next"] is True
    assert ext.calls[1][2]["drab_time"].shape == (2, 9)
    _assert_reference_results(monkeypatch, p, got_out, got)


def test_table_kernels_are_taken_only_when_the_variant_asks_on_both_backward_paths(fake_kernels):
    # a build whose kernels read the tables: the default variant still writes the tables out as a dense rab (the
    # path verified on a GPU); KernelVariant.table_kernels=True passes the tables, on the deterministic backward too
    # (its table gradients are summed in a fixed order), with the table-gradient workspaces
    ext, monkeypatch = fake_kernels
    monkeypatch.setattr(cuda, "build_info", lambda: {"rab_tables": True})
    p = dict(lengths=[4, 0, 6], heads=2, use_time=True, use_position=True, targets=[1, 0, 2], shared=[1, 0, 2],
             per_head_time=True, per_head_position=False, reference="next", buckets=8, half=4, max_slack=1,
             times=list(range(0, 10**5, 10**4)), seed=3)  # fmt: skip
    assert not cuda.reads_rab_tables()
    run(hstu_attention, p)
    assert all(rab is not None and "rab_position_weights" not in kwargs for _, rab, kwargs in ext.calls)
    ext.calls.clear()
    with cuda.kernel_variant(table_kernels=True):
        assert cuda.reads_rab_tables()
        run(hstu_attention, p)
        assert all(rab is None and "rab_position_weights" in kwargs for _, rab, kwargs in ext.calls)
        ext.calls.clear()
        run(hstu_attention, p, deterministic=True)
        assert ext.calls and all(rab is None and "rab_position_weights" in kwargs for _, rab, kwargs in ext.calls)
        assert [kwargs["options"].fields["deterministic"] for _, _, kwargs in ext.calls] == [False, True]
        assert ext.calls[1][2]["drab_position"].shape == (7,) and ext.calls[1][2]["drab_time"].shape == (2, 9)


def test_table_call_without_grad_runs_no_backward(fake_kernels):
    ext, monkeypatch = fake_kernels
    monkeypatch.setattr(cuda, "reads_rab_tables", lambda: False)
    p = dict(lengths=[3, 5], heads=1, use_time=True, use_position=False, targets=None, shared=None,
             per_head_time=False, per_head_position=False, reference="query", buckets=4, half=1, max_slack=0,
             times=[1, 10, 100, 1000, 10**4, 10**5, 10**6, 10**7], seed=1)  # fmt: skip
    qkv, offsets, max_seqlen, tables, targets, _ = build(p)
    with torch.no_grad():
        out = hstu_attention(*qkv, offsets, max_seqlen, rab_tables=tables)
    assert [c[0] for c in ext.calls] == ["fwd"]
    expected = hstu_attention_reference(*qkv, offsets, max_seqlen, rab_tables=tables)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", range(4))
def test_cuda_dense_table_path_meets_the_parity_rule(seed):
    from hstu.ops._extension import load_extension

    if load_extension() is None or cuda.reads_rab_tables():
        pytest.skip("needs the extension built without in-kernel tables (the dense-rab path)")
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(0, 300) for _ in range(rng.randint(1, 6))] + [rng.choice([1, 64, 300])]
    total = sum(lengths)
    p = dict(lengths=lengths, heads=rng.randint(1, 4), use_time=True, use_position=rng.random() < 0.7,
             targets=[rng.randint(0, length) for length in lengths] if rng.random() < 0.5 else None,
             shared=None, per_head_time=rng.random() < 0.5, per_head_position=rng.random() < 0.5,
             reference=rng.choice(["query", "next"]), buckets=rng.choice([16, 128]), half=rng.choice([8, 300]),
             max_slack=rng.choice([0, 5]), times=[rng.randint(0, 10**8) for _ in range(total)], seed=seed)  # fmt: skip
    if p["use_position"] and rng.random() < 0.5:
        p["shared"] = [rng.randint(0, length) for length in lengths]
    for dtype in (torch.bfloat16, torch.float16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel_out, kernel = run(hstu_attention, p, dtype, "cuda", torch.float32)
            ref_out, ref = run(hstu_attention_reference, p, torch.float32, "cuda", torch.float32)
            low_out, low = run(lambda *a, **kw: hstu_attention_reference(*a, upcast=False, **kw), p, dtype, "cuda",
                               dtype)  # fmt: skip
        assert_parity("out", kernel_out, ref_out, low_out, factor=FORWARD_FACTOR)
        for i, (a, b, c) in enumerate(zip(kernel, ref, low)):
            assert_parity(f"grad{i}", a, b, c.to(a.dtype), factor=BACKWARD_FACTOR)
        # deterministic=True: the table gradients (and dq) are bitwise reproducible
        first = run(hstu_attention, p, dtype, "cuda", torch.float32, deterministic=True)[1]
        second = run(hstu_attention, p, dtype, "cuda", torch.float32, deterministic=True)[1]
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dense_path_takes_a_batch_of_empty_sequences(fake_kernels):
    # with time_reference "next" the dense bias shifts each sequence's timestamps by one token: a batch whose
    # sequences are all empty has none to shift (an index error before)
    ext, monkeypatch = fake_kernels
    monkeypatch.setattr(cuda, "reads_rab_tables", lambda: False)
    p = dict(lengths=[0, 0], heads=1, use_time=True, use_position=True, targets=None, shared=None,
             per_head_time=False, per_head_position=False, reference="next", buckets=2, half=1, max_slack=0,
             times=[], seed=0)  # fmt: skip
    out, grads = run(hstu_attention, p)
    assert out.shape == (0, 1, 8) and [c[0] for c in ext.calls] == ["fwd", "bwd"]
    assert all(float(g.abs().sum()) == 0.0 for g in grads)
