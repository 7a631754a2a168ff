"""hstu_attention(rab_tables=...): the relative attention bias from weight tables equals the dense-rab path with the
same weights gathered into a dense tensor (outputs and table gradients), and bad table arguments are named errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hstu.ops.hstu_attention import RelativeBiasTables, hstu_attention, hstu_attention_reference
from hstu.testing.parity import BACKWARD_FACTOR, FORWARD_FACTOR, assert_parity


def _bucket(dt: int, num_buckets: int, divisor: float = 0.301) -> int:
    # float32 like the op (a float64 log could land on the other side of a bucket edge)
    magnitude = torch.tensor(float(max(abs(dt), 1)), dtype=torch.float32)
    return min(int(torch.log(magnitude) / divisor), num_buckets)


def dense_from_tables(t: RelativeBiasTables, lengths: list[int], heads: int, n: int) -> torch.Tensor:
    """The bias of the tables written out entry by entry: (B, 1 or H, n, n) in float64 (differentiable in both
    tables through plain indexing)."""
    per_head = any(w is not None and w.dim() == 2 for w in (t.position_weights, t.time_weights))
    rows = []
    start = 0
    for b, length in enumerate(lengths):
        times = t.timestamps[start:start + length].tolist() if t.timestamps is not None else []
        shared = int(t.shared_positions[b]) if t.shared_positions is not None else 0
        entries = []
        for h in range(heads if per_head else 1):
            matrix = [[torch.zeros((), dtype=torch.float64)] * n for _ in range(n)]
            for i in range(length):
                if t.time_weights is None:
                    ref = 0
                elif t.time_reference == "next":
                    if i + 1 < length:
                        ref = times[i + 1]
                    else:
                        ref = int(t.next_timestamps[b]) if t.next_timestamps is not None else times[i]
                else:
                    ref = times[i]
                for j in range(length):
                    value = torch.zeros((), dtype=torch.float64)
                    if t.time_weights is not None:
                        w = t.time_weights if t.time_weights.dim() == 1 else t.time_weights[h]
                        value = value + w[_bucket(ref - times[j], w.shape[0] - 1, t.time_divisor)].double()
                    if t.position_weights is not None:
                        w = t.position_weights if t.position_weights.dim() == 1 else t.position_weights[h]
                        half = (w.shape[0] + 1) // 2
                        pi, pj = min(i, length - shared), min(j, length - shared)
                        value = value + w[max(-(half - 1), min(half - 1, pi - pj)) + half - 1].double()
                    matrix[i][j] = value
            entries.append(torch.stack([torch.stack(r) for r in matrix]) if n else torch.zeros(0, 0))
        rows.append(torch.stack(entries))
        start += length
    return torch.stack(rows) if rows else torch.zeros(0, 1, n, n, dtype=torch.float64)


@st.composite
def problems(draw, max_len=7):
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=3))
    total = sum(lengths)
    heads = draw(st.integers(1, 2))
    num_buckets = draw(st.sampled_from([1, 3, 16, 128]))
    half = draw(st.integers(1, max_len + 1))
    gaps = draw(st.sampled_from(["zero", "equal", "huge", "decreasing", "random"]))
    if gaps == "zero":
        times = [0] * total
    elif gaps == "equal":
        times = [1000 * i for i in range(total)]
    elif gaps == "huge":
        times = [draw(st.integers(-(2**40), 2**40)) for _ in range(total)]
    elif gaps == "decreasing":
        times = [10**9 - 3**i for i in range(total)]
    else:
        times = [draw(st.integers(0, 10**7)) for _ in range(total)]
    causal = draw(st.booleans())
    targets = contexts = None
    if causal and draw(st.booleans()):
        targets = [draw(st.integers(0, length)) for length in lengths]
        if draw(st.booleans()):
            contexts = [draw(st.integers(0, length - nt)) for length, nt in zip(lengths, targets)]
    shared = [draw(st.integers(0, length)) for length in lengths] if draw(st.booleans()) else None
    return dict(
        lengths=lengths, heads=heads, num_buckets=num_buckets, half=half, times=times, causal=causal,
        window=draw(st.sampled_from([-1, 0, 2])), targets=targets, contexts=contexts, shared=shared,
        reference=draw(st.sampled_from(["query", "next"])), use_next=draw(st.booleans()),
        next_gap=draw(st.sampled_from([0, 5, 10**12])), per_head_time=draw(st.booleans()),
        per_head_position=draw(st.booleans()), use_time=draw(st.booleans()), use_position=draw(st.booleans()),
        group=draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**16)),
    )


def build(p, dtype=torch.float32, table_dtype=torch.float32):
    g = torch.Generator().manual_seed(p["seed"])
    lengths, heads = p["lengths"], p["heads"]
    total, n = sum(lengths), max(max(lengths), 1)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    q, k, v = (torch.randn(total, heads, 8, generator=g).to(dtype) for _ in range(3))
    use_time = p["use_time"] or not p["use_position"]
    time = pos = None
    if use_time:
        shape = (heads, p["num_buckets"] + 1) if p["per_head_time"] else (p["num_buckets"] + 1,)
        time = torch.randn(shape, generator=g).to(table_dtype)
    if p["use_position"]:
        shape = (heads, 2 * p["half"] - 1) if p["per_head_position"] else (2 * p["half"] - 1,)
        pos = torch.randn(shape, generator=g).to(table_dtype)
    times = torch.tensor(p["times"], dtype=torch.int64)
    next_times = None
    if use_time and p["reference"] == "next" and p["use_next"]:
        last = [p["times"][int(offsets[b + 1]) - 1] if lengths[b] else 0 for b in range(len(lengths))]
        next_times = torch.tensor(last, dtype=torch.int64) + p["next_gap"]
    shared = torch.tensor(p["shared"]) if p["shared"] is not None and pos is not None else None
    tables = RelativeBiasTables(pos, time, times if use_time else None, p["reference"], next_times, shared)
    masks = dict(causal=p["causal"], window_size=p["window"], target_group_size=p["group"],
                 num_targets=None if p["targets"] is None else torch.tensor(p["targets"]),
                 num_contexts=None if p["contexts"] is None else torch.tensor(p["contexts"]))
    return q, k, v, offsets, n, tables, masks


def _leaves(tables: RelativeBiasTables, dtype=None) -> RelativeBiasTables:
    return tables._replace(**{name: getattr(tables, name).detach().to(dtype or getattr(tables, name).dtype)
                              .requires_grad_() for name in ("position_weights", "time_weights")
                              if getattr(tables, name) is not None})  # fmt: skip


def _table_grads(out, tables, grad_out):
    weights = [w for w in (tables.position_weights, tables.time_weights) if w is not None]
    return torch.autograd.grad(out, weights, grad_out, allow_unused=True, materialize_grads=True)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(problems())
def test_tables_match_the_dense_bias_float32(p):
    q, k, v, offsets, n, tables, masks = build(p)
    kwargs = dict(alpha=0.7, scaling_seqlen=n, **masks)
    table_leaves = _leaves(tables)
    out = hstu_attention(q, k, v, offsets, n, rab_tables=table_leaves, **kwargs)
    dense_leaves = _leaves(tables)
    rab = dense_from_tables(dense_leaves, p["lengths"], p["heads"], n).float()
    rab = rab if rab.requires_grad else rab.requires_grad_()  # (no entry read a weight: the gradients are zero)
    expected = hstu_attention(q, k, v, offsets, n, rab=rab, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(p["seed"] + 1))
    got = _table_grads(out, table_leaves, grad_out)
    for a, b in zip(got, _table_grads(expected, dense_leaves, grad_out)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)
    # The reference's own autograd (the public reference function) gives the same table gradients.
    ref_leaves = _leaves(tables)
    ref = hstu_attention_reference(q, k, v, offsets, n, rab_tables=ref_leaves, **kwargs)
    torch.testing.assert_close(ref, out, rtol=1e-6, atol=1e-6)
    if ref.requires_grad:
        for a, b in zip(got, _table_grads(ref, ref_leaves, grad_out)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems())
def test_tables_in_bfloat16_meet_the_parity_rule(p):
    q, k, v, offsets, n, tables, masks = build(p, dtype=torch.bfloat16)
    kwargs = dict(alpha=0.7, scaling_seqlen=n, **masks)
    # (bf16 values: every run gets the gradient the bf16 call gets)
    grad_out = torch.randn(q.shape[0], q.shape[1], 8, generator=torch.Generator().manual_seed(p["seed"] + 1))
    grad_out = grad_out.to(torch.bfloat16).float()

    def run(fn, dtype, table_dtype):
        leaves = [t.float().to(dtype).requires_grad_() for t in (q, k, v)]
        table_leaves = _leaves(tables, table_dtype)
        out = fn(*leaves, offsets, n, rab_tables=table_leaves, **kwargs)
        grads = torch.autograd.grad(out, leaves + [w for w in table_leaves[:2] if w is not None],
                                    grad_out.to(out.dtype), allow_unused=True, materialize_grads=True)  # fmt: skip
        return out.detach(), grads

    kernel_out, kernel_grads = run(hstu_attention, torch.bfloat16, torch.float32)
    ref_out, ref_grads = run(hstu_attention_reference, torch.float32, torch.float32)
    low_out, low_grads = run(lambda *a, **kw: hstu_attention_reference(*a, upcast=False, **kw), torch.bfloat16,
                             torch.bfloat16)  # fmt: skip
    assert_parity("out", kernel_out, ref_out, low_out, factor=FORWARD_FACTOR)
    for i, (a, b, c) in enumerate(zip(kernel_grads, ref_grads, low_grads)):
        assert_parity(f"grad{i}", a, b, c.to(a.dtype), factor=BACKWARD_FACTOR)


def test_model_style_ranking_bias_is_bit_identical_to_the_dense_path():
    # fp32 CPU: the table path gathers the same weights in the same order (time part, then position part) and sums
    # their gradients with the same bincount over the same (b, i, j) order as a dense bias built by gathering.
    torch.manual_seed(3)
    lengths = torch.tensor([5, 0, 7, 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    total, n, heads = int(lengths.sum()), 7, 2
    q, k, v = (torch.randn(total, heads, 8) for _ in range(3))
    times = torch.cumsum(torch.randint(0, 10**6, (total,)), 0)
    targets = torch.tensor([2, 0, 3, 1])
    pos, time = torch.randn(15, requires_grad=True), torch.randn(33, requires_grad=True)
    tables = RelativeBiasTables(pos, time, times, "next", times[offsets[1:].clamp(max=total) - 1] + 60, targets)
    out = hstu_attention(q, k, v, offsets, n, alpha=0.3, num_targets=targets, rab_tables=tables)
    got = torch.autograd.grad(out.square().sum(), (pos, time))
    from hstu.modules.positional import RelativeAttentionBias, gather_weights

    buckets = RelativeAttentionBias.time_bucket_matrix(times, offsets, n, 32, "next", tables.next_timestamps)
    i = torch.arange(n)
    positions = torch.minimum(i.view(1, n), (lengths - targets).view(-1, 1))
    index = (positions.unsqueeze(2) - positions.unsqueeze(1)).clamp(-7, 7) + 7
    rab = (gather_weights(time, buckets) + gather_weights(pos, index)).unsqueeze(1)
    expected = hstu_attention(q, k, v, offsets, n, alpha=0.3, num_targets=targets, rab=rab)
    want = torch.autograd.grad(expected.square().sum(), (pos, time))
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _call(**overrides):
    q = torch.randn(5, 2, 4)
    offsets = torch.tensor([0, 2, 5])
    tables = RelativeBiasTables(torch.randn(9), torch.randn(5), torch.arange(5))
    kwargs = dict(rab_tables=tables)
    kwargs.update(overrides)
    return hstu_attention(q, q, q, offsets, 3, **kwargs)


def _tables(**fields):
    return RelativeBiasTables(torch.randn(9), torch.randn(5), torch.arange(5))._replace(**fields)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(rab=torch.zeros(2, 1, 3, 3)), ValueError, "mutually exclusive"),
    (dict(rab_tables=(torch.randn(9), None, None)), TypeError, "rab_tables must be"),
    (dict(rab_tables=RelativeBiasTables()), ValueError, "position_weights or time_weights"),
    (dict(rab_tables=_tables(position_weights=torch.randn(8))), ValueError, "rab_tables.position_weights.*odd"),
    (dict(rab_tables=_tables(position_weights=torch.randn(3, 9))), ValueError, "rab_tables.position_weights"),
    (dict(rab_tables=_tables(time_weights=torch.randn(2, 2, 5))), ValueError, "rab_tables.time_weights"),
    (dict(rab_tables=_tables(time_weights=torch.zeros(5, dtype=torch.int64))), TypeError, "rab_tables.time_weights"),
    (dict(rab_tables=_tables(time_weights=torch.zeros(0))), ValueError, "rab_tables.time_weights"),
    (dict(rab_tables=_tables(time_weights=torch.randn(5, dtype=torch.float64))), TypeError, "share one dtype"),
    (dict(rab_tables=_tables(position_weights=[0.0])), TypeError, "rab_tables.position_weights"),
    (dict(rab_tables=_tables(timestamps=None)), ValueError, "rab_tables.timestamps"),
    (dict(rab_tables=_tables(timestamps=torch.arange(4))), ValueError, "rab_tables.timestamps"),
    (dict(rab_tables=_tables(timestamps=torch.arange(5.0))), TypeError, "rab_tables.timestamps"),
    (dict(rab_tables=_tables(time_reference="future")), ValueError, "rab_tables.time_reference"),
    (dict(rab_tables=_tables(time_divisor=0.0)), ValueError, "rab_tables.time_divisor"),
    (dict(rab_tables=_tables(time_divisor=float("nan"))), ValueError, "rab_tables.time_divisor"),
    (dict(rab_tables=_tables(next_timestamps=torch.tensor([1, 2]))), ValueError, "rab_tables.next_timestamps"),
    (dict(rab_tables=_tables(time_reference="next", next_timestamps=torch.tensor([1]))), ValueError,
     "rab_tables.next_timestamps"),
    (dict(rab_tables=_tables(time_weights=None)), ValueError, "rab_tables.timestamps"),
    (dict(rab_tables=_tables(position_weights=None, shared_positions=torch.tensor([0, 1]))), ValueError,
     "rab_tables.shared_positions"),
    (dict(rab_tables=_tables(shared_positions=torch.tensor([0, 4]))), ValueError, r"shared_positions\[1\]=4"),
    (dict(rab_tables=_tables(shared_positions=torch.tensor([-1, 0]))), ValueError, r"shared_positions\[0\]"),
    (dict(rab_tables=_tables(shared_positions=torch.tensor([0]))), ValueError, "rab_tables.shared_positions"),
    (dict(rab_tables=_tables(timestamps=torch.arange(5, device="meta"))), ValueError, "rab_tables.timestamps"),
])  # fmt: skip
def test_bad_table_arguments_are_named_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_table_call_under_fake_tensors_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (torch.randn(5, 2, 4, requires_grad=True) for _ in range(3))
    offsets = torch.tensor([0, 2, 5])
    pos, time = torch.randn(2, 9, requires_grad=True), torch.randn(5, requires_grad=True)
    times = torch.tensor([0, 10, 100, 5, 7])

    def step(q, k, v, pos, time):
        tables = RelativeBiasTables(pos, time, times, "next", torch.tensor([200, 9]), torch.tensor([1, 2]))
        return hstu_attention(q, k, v, offsets, 3, alpha=0.5, rab_tables=tables)

    eager = step(q, k, v, pos, time)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v, pos, time))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    out = compiled(q, k, v, pos, time)
    torch.testing.assert_close(out, eager)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v, pos, time)), eager_grads):
        torch.testing.assert_close(got, want)
    with FakeTensorMode():
        fq = torch.randn(5, 2, 4, requires_grad=True)
        fpos, ftime = torch.randn(2, 9, requires_grad=True), torch.randn(5, requires_grad=True)
        tables = RelativeBiasTables(fpos, ftime, torch.zeros(5, dtype=torch.int64))
        fake = hstu_attention(fq, fq, fq, torch.tensor([0, 2, 5]), 3, rab_tables=tables)
        grads = torch.autograd.grad(fake.sum(), (fq, fpos, ftime))
        assert [g.shape for g in grads] == [fq.shape, fpos.shape, ftime.shape]


def test_time_bucket_constants_follow_the_formula():
    # bucket(dt) = trunc(ln(max(|dt|, 1)) / divisor) clamped to K: gaps of 0, 1, e^k and huge, both signs.
    times = torch.tensor([0, 0, 1, -1, 3, 10**12, -(10**12)])
    offsets = torch.tensor([0, 7])
    q = torch.zeros(7, 1, 4)
    time = torch.randn(41, dtype=torch.float64, requires_grad=True)
    out = hstu_attention(q.double(), q.double(), torch.ones(7, 1, 4, dtype=torch.float64), offsets, 7, causal=False,
                         rab_tables=RelativeBiasTables(None, time, times, time_divisor=0.5))  # fmt: skip
    (grad,) = torch.autograd.grad(out.sum(), time)
    counts = torch.zeros(41, dtype=torch.float64)
    for i in range(7):
        for j in range(7):
            counts[min(int(math.log(max(abs(int(times[i]) - int(times[j])), 1)) / 0.5), 40)] += 1
    # q = 0: every score is the bias; a weight has a gradient exactly when some pair reads it
    assert torch.equal(grad != 0, counts != 0)


def test_cuda_binding_receives_the_tables(monkeypatch):
    # cuda.forward / backward hand the tables and their gradient workspaces to the binding; calls without tables pass
    # no table keyword.
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    calls = {}

    class Ext:
        class KernelOptions:
            def __init__(self, **fields):
                self.fields = fields

        def hstu_attn_fwd(self, *args, **kwargs):
            calls["fwd"] = kwargs

        def hstu_attn_bwd(self, *args, **kwargs):
            calls["bwd"] = kwargs

    monkeypatch.setattr(cuda, "load_extension", lambda: Ext())
    cuda._ext_options.cache_clear()
    try:
        q = torch.randn(5, 2, 32, dtype=torch.bfloat16)
        args = AttentionArgs(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5, 0.25, 5)
        cuda.forward(args)
        assert not any(key.startswith("rab_") for key in calls["fwd"])
        times, pos = torch.arange(5), torch.randn(2, 9)
        with_tables = args._replace(rab_position_weights=pos, rab_timestamps=times, rab_time_weights=torch.randn(4),
                                    rab_time_reference="next", rab_time_divisor=0.5)  # fmt: skip
        cuda.forward(with_tables)
        assert calls["fwd"]["rab_position_weights"] is pos and calls["fwd"]["rab_timestamps"] is times
        assert calls["fwd"]["rab_time_next"] is True and calls["fwd"]["rab_time_divisor"] == 0.5
        grads = cuda.backward(q, with_tables, True)
        assert calls["bwd"]["drab_position"].shape == pos.shape and calls["bwd"]["drab_time"].shape == (4,)
        assert grads[4].shape == pos.shape and grads[5].shape == (4,)
    finally:
        cuda._ext_options.cache_clear()


def _kernel_reads_tables() -> bool:
    if not torch.cuda.is_available():
        return False
    from hstu.ops.hstu_attention import cuda

    return bool(cuda.build_info().get("rab_tables", False))


_NEEDS_TABLE_KERNELS = pytest.mark.skipif(not _kernel_reads_tables(),
                                          reason="needs a CUDA GPU and an extension whose kernels read the tables")


def _gpu_table_problem(dim, dtype, *, lengths, heads=2, seed=0, reference="next", per_head=True):
    """q, k, v, grad_out (CUDA, dtype), int32 offsets, n, fp32 CUDA tables, mask keywords: timestamps with zero, equal,
    decreasing and huge gaps kept off the exact bucket edges (float32 log here and there may round an edge apart)."""
    g = torch.Generator().manual_seed(seed)
    total, n = sum(lengths), max(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, dout = (torch.randn(total, heads, dim, generator=g).to(dtype) for _ in range(4))
    gaps = (torch.rand(total, generator=g) * 16).exp().long() * torch.randint(-1, 3, (total,), generator=g)
    times = (10**9 + gaps.cumsum(0)).tolist()
    for i, t in enumerate(times):
        while any(abs(t - u) > 1 and abs((f := math.log(abs(t - u)) / 0.301) - round(f)) < 1e-4 * max(1.0, f)
                  for u in times[max(0, i - 300):i]):  # fmt: skip
            t += 1
        times[i] = t
    tables = RelativeBiasTables(
        torch.randn((heads, 2 * 64 - 1) if per_head else (2 * 64 - 1,), generator=g),
        torch.randn((heads, 41) if not per_head else (41,), generator=g),
        torch.tensor(times, dtype=torch.int64), reference, None,
        torch.tensor([min(3, length) for length in lengths], dtype=torch.int32))  # fmt: skip
    targets = torch.tensor([min(3, length) for length in lengths], dtype=torch.int32)
    cuda_ = lambda t: None if t is None else t.cuda()  # noqa: E731
    gpu_tables = RelativeBiasTables(*(cuda_(x) if isinstance(x, torch.Tensor) else x for x in tables))
    return (*(t.cuda() for t in (q, k, v, dout)), offsets.cuda(), n, gpu_tables, dict(num_targets=targets.cuda()))


def _kernel_table_call(q, k, v, dout, offsets, n, tables, masks, *, alpha, deterministic=False, grads=True):
    """out, dq, dk, dv, d position_weights, d time_weights of the table kernels (cuda.forward / cuda.backward)."""
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    t = tables
    args = AttentionArgs(q, k, v, offsets, n, alpha, n, num_targets=masks["num_targets"],
                         deterministic=deterministic, rab_position_weights=t.position_weights,
                         rab_time_weights=t.time_weights, rab_timestamps=t.timestamps,
                         rab_next_timestamps=t.next_timestamps, rab_shared_positions=t.shared_positions,
                         rab_time_reference=t.time_reference, rab_time_divisor=t.time_divisor)  # fmt: skip
    out = cuda.forward(args)
    dq, dk, dv, _, dpos, dtime = cuda.backward(dout, args, grads)
    return [out, dq, dk, dv, dpos, dtime]


def _reference_table_call(q, k, v, dout, offsets, n, tables, masks, *, alpha, dtype, upcast=True):
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    weights = [w.to(dtype if not upcast else torch.float32).requires_grad_()
               for w in (tables.position_weights, tables.time_weights)]  # fmt: skip
    t = tables._replace(position_weights=weights[0], time_weights=weights[1])
    kw = {} if upcast else dict(upcast=False)
    out = hstu_attention_reference(*leaves, offsets.long(), n, alpha=alpha, rab_tables=t, **masks, **kw)
    return [out.detach(), *torch.autograd.grad(out, leaves + weights, dout.to(dtype))]


@_NEEDS_TABLE_KERNELS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_table_kernels_match_the_reference(dim, dtype, deterministic):
    # the kernels' table path (bias per entry from the tables, table gradients by histogram + atomics, or with
    # deterministic=True per-warp slots summed in a fixed order) against the fp32 reference: 2x / 5x the error of
    # the same-dtype PyTorch reference
    from hstu.ops.hstu_attention import cuda

    info = cuda.build_info()
    if dim not in info["head_dims"] or str(dtype).split(".")[-1] not in info["dtypes"]:
        pytest.skip(f"head dim {dim} / {dtype} is not compiled in")
    for seed, (reference, per_head) in enumerate((("next", True), ("query", False))):
        problem = _gpu_table_problem(dim, dtype, lengths=[0, 1, 300, 129, 517], seed=seed + dim, reference=reference,
                                     per_head=per_head)  # fmt: skip
        alpha = 1.0 / math.sqrt(dim)
        got = _kernel_table_call(*problem, alpha=alpha, deterministic=deterministic)
        want = _reference_table_call(*problem, alpha=alpha, dtype=torch.float32)
        low = _reference_table_call(*problem, alpha=alpha, dtype=dtype, upcast=False)
        for name, a, b, c in zip(("out", "dq", "dk", "dv", "d position_weights", "d time_weights"), got, want, low):
            assert torch.isfinite(a).all(), name
            assert_parity(f"{name} ({reference}, per_head={per_head})", a, b.to(a.dtype), c.to(a.dtype),
                          factor=FORWARD_FACTOR if name == "out" else BACKWARD_FACTOR)  # fmt: skip


@_NEEDS_TABLE_KERNELS
def test_cuda_table_path_allocates_nothing_of_size_l_squared():
    # one 4096-token sequence, one head of 32: a dense (1, 1, L, L) bias alone (bf16: 32 MiB) would exceed the bound
    torch.cuda.synchronize()
    q, k, v, dout, offsets, n, tables, masks = _gpu_table_problem(32, torch.bfloat16, lengths=[4096], heads=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _kernel_table_call(q, k, v, dout, offsets, n, tables, masks, alpha=0.2)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # out, dq, dk, dv, the float32 dq workspace and the table gradients, with room for allocator rounding
    bound = 4 * q.nbytes + 2 * q.nbytes + 4 * (2 << 20)
    assert peak <= bound < n * n * 2, (peak, bound)


@_NEEDS_TABLE_KERNELS
def test_cuda_table_kernels_deterministic_backward_is_bitwise_repeatable():
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    problem = _gpu_table_problem(64, torch.bfloat16, lengths=[700, 0, 1, 333], seed=9)
    runs = [_kernel_table_call(*problem, alpha=0.125, deterministic=True, grads=False) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run[:4], runs[0][:4]))
    # with the table gradients (per-warp slots summed in a fixed order): every output bitwise equal run after run
    runs = [_kernel_table_call(*problem, alpha=0.125, deterministic=True) for _ in range(3)]
    for run in runs[1:]:
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(run, runs[0]))
    # the binding's checks still name the argument
    q, k, v, dout, offsets, n, t, masks = problem
    args = AttentionArgs(q, k, v, offsets, n, 0.125, n, deterministic=True, rab_position_weights=t.position_weights,
                         rab_time_weights=t.time_weights, rab_timestamps=t.timestamps.to(torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="rab_timestamps"):
        cuda.backward(dout, args, True)


@_NEEDS_TABLE_KERNELS
def test_cuda_table_calls_plan_the_sm80_kernels():
    from hstu.ops.hstu_attention import cuda

    for direction in ("forward", "backward"):
        plan = cuda.kernel_plan(direction, head_dim=128, batch=4, heads=2, max_seqlen=512, rab_tables=True)
        assert plan["kernel"] == "sm80", plan
