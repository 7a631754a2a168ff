"""The attention op (CPU path = the reference) against an independent dense fp64 formulation."""

import math
import random
import warnings

import pytest
import torch

from hstu.ops import attention_mask, hstu_attention, lengths_to_offsets
from hstu.ops._validation import to_host
from hstu.ops.hstu_attention.reference import dropout_keep_mask, hstu_attention_reference
from tests.ops.dense_attention import dense_hstu_attention, mask_matrix, visible

MASK_FAMILIES = [
    dict(causal=True),
    dict(causal=True, window_size=3),
    dict(causal=True, contexts=True),
    dict(causal=True, targets=True),
    dict(causal=True, targets=True, target_group_size=2),
    dict(causal=True, contexts=True, targets=True, window_size=2, target_group_size=3),
    dict(causal=False),
    dict(causal=False, window_size=2),
]


def random_problem(rng: random.Random, family: dict, dtype=torch.float64):
    batch = rng.randint(1, 8)
    lengths = [rng.choice([0, 1, rng.randint(2, 17)]) for _ in range(batch)]
    heads = rng.randint(1, 4)
    dim_qk = rng.choice([8, 16, 24, 64, 128])
    dim_v = rng.choice([dim_qk, 8])
    total = sum(lengths)
    max_seqlen = max(lengths + [1]) + rng.randint(0, 3)
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=rng.choice([torch.int32, torch.int64])))
    q = torch.randn(total, heads, dim_qk, dtype=dtype)
    k = torch.randn(total, heads, dim_qk, dtype=dtype)
    v = torch.randn(total, heads, dim_v, dtype=dtype)
    kwargs = dict(
        alpha=rng.choice([1.0 / math.sqrt(dim_qk), 1.0]),
        causal=family["causal"],
        window_size=family.get("window_size", -1),
        target_group_size=family.get("target_group_size", 1),
    )
    if rng.random() < 0.3:
        kwargs["scaling_seqlen"] = rng.randint(1, 40)
    num_targets = None
    if family.get("targets"):
        num_targets = torch.tensor([rng.randint(0, length) for length in lengths])
        kwargs["num_targets"] = num_targets
    if family.get("contexts"):
        history = [length - (int(num_targets[b]) if num_targets is not None else 0) for b, length in enumerate(lengths)]
        kwargs["num_contexts"] = torch.tensor([rng.randint(0, h) for h in history])
    rab_heads = rng.choice([None, 1, heads])
    rab = None
    if rab_heads is not None:
        rab = torch.randn(batch, rab_heads, max_seqlen + rng.randint(0, 2), max_seqlen + rng.randint(0, 2), dtype=dtype)
    return q, k, v, offsets, max_seqlen, rab, kwargs


SWEEP = [(seed, family) for seed in range(8) for family in range(len(MASK_FAMILIES))]


@pytest.mark.parametrize("seed,family", SWEEP)
def test_forward_and_gradients_match_dense_formulation(seed, family):
    rng = random.Random(1000 * seed + family)
    q, k, v, offsets, max_seqlen, rab, kwargs = random_problem(rng, MASK_FAMILIES[family])
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    rab_leaf = None if rab is None else rab.clone().requires_grad_(True)
    out = hstu_attention(*leaves, offsets, max_seqlen, rab=rab_leaf, **kwargs)

    dense_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    dense_rab = None if rab is None else rab.clone().requires_grad_(True)
    expected = dense_hstu_attention(*dense_leaves, offsets, max_seqlen, rab=dense_rab, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    grad = torch.randn_like(expected)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    for got, want in zip(leaves + [rab_leaf], dense_leaves + [dense_rab]):
        if got is None:
            continue
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", range(len(MASK_FAMILIES)))
def test_gradcheck_float64(family):
    rng = random.Random(77 + family)
    q, k, v, offsets, max_seqlen, rab, kwargs = random_problem(rng, MASK_FAMILIES[family])
    q, k, v = (t[:, :, :8].contiguous() for t in (q, k, v))
    if rab is None:
        rab = torch.randn(offsets.numel() - 1, 1, max_seqlen, max_seqlen, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k, v, rab))
    assert torch.autograd.gradcheck(lambda q, k, v, r: hstu_attention(q, k, v, offsets, max_seqlen, rab=r, **kwargs), inputs)


def test_mask_matches_contract_wording():
    rng = random.Random(5)
    for _ in range(40):
        L = rng.randint(0, 12)
        t = rng.randint(0, L)
        c = rng.randint(0, L - t)
        g = rng.randint(1, 4)
        w = rng.choice([-1, 0, 1, 3])
        causal = rng.random() < 0.8
        if not causal:
            c = t = 0
        got = attention_mask(torch.tensor([L]), 14, causal=causal, window_size=w, num_contexts=torch.tensor([c]),
                             num_targets=torch.tensor([t]), target_group_size=g)[0]  # fmt: skip
        expected = torch.zeros(14, 14, dtype=torch.bool)
        expected[:L, :L] = mask_matrix(L, c, t, g, w, causal).bool()
        assert torch.equal(got, expected), (L, c, t, g, w, causal)


def test_mask_semantics_by_hand():
    # L=6, 1 context, 2 targets (group 1), no window: rows 0..3 are context/history, 4..5 targets.
    L, c, t = 6, 1, 2
    assert visible(0, 3, L, c, t, 1, -1, True)  # context row sees the whole history
    assert not visible(0, 4, L, c, t, 1, -1, True)  # ... but no target
    assert visible(2, 2, L, c, t, 1, -1, True) and not visible(2, 3, L, c, t, 1, -1, True)  # causal history
    assert visible(4, 3, L, c, t, 1, -1, True) and not visible(5, 4, L, c, t, 1, -1, True)  # targets isolated
    assert visible(5, 4, L, c, t, 2, -1, True)  # same target group of 2
    assert visible(3, 0, L, c, t, 1, 1, True)  # everyone sees contexts even outside the window
    assert not visible(3, 1, L, c, t, 1, 1, True)  # 3-1 > window 1


def test_empty_batch_and_all_empty_sequences():
    for lengths in ([], [0, 0, 0]):
        offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
        q = torch.randn(0, 2, 8, requires_grad=True)
        out = hstu_attention(q, q, q, offsets, 4)
        assert out.shape == (0, 2, 8)
        out.sum().backward()


def test_length_one_sequences_see_only_themselves():
    offsets = torch.tensor([0, 1, 2])
    q, k, v = (torch.randn(2, 1, 8, dtype=torch.float64) for _ in range(3))
    out = hstu_attention(q, k, v, offsets, 1, alpha=0.5)
    expected = torch.nn.functional.silu(0.5 * (q * k).sum(-1, keepdim=True)) * v
    torch.testing.assert_close(out, expected)


def test_scaling_seqlen_divides():
    offsets = torch.tensor([0, 5])
    q, k, v = (torch.randn(5, 2, 8, dtype=torch.float64) for _ in range(3))
    base = hstu_attention(q, k, v, offsets, 5)
    torch.testing.assert_close(hstu_attention(q, k, v, offsets, 5, scaling_seqlen=10), base / 2)
    torch.testing.assert_close(hstu_attention(q, k, v, offsets, 10), base / 2)


def test_low_precision_output_dtype_and_closeness():
    rng = random.Random(3)
    q, k, v, offsets, max_seqlen, rab, kwargs = random_problem(rng, MASK_FAMILIES[5], dtype=torch.float32)
    expected = hstu_attention(q, k, v, offsets, max_seqlen, rab=rab, **kwargs)
    for dtype in (torch.bfloat16, torch.float16):
        out = hstu_attention(q.to(dtype), k.to(dtype), v.to(dtype), offsets, max_seqlen, rab=rab, **kwargs)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


class TestDropout:
    def test_zero_probability_is_exact(self):
        q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
        offsets = torch.tensor([0, 3, 7])
        assert torch.equal(hstu_attention(q, k, v, offsets, 4), hstu_attention(q, k, v, offsets, 4, dropout_p=0.0))

    def test_matches_dense_with_same_keep_mask(self):
        q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64) for _ in range(3))
        offsets = torch.tensor([0, 4, 9])
        keep = dropout_keep_mask((2, 2, 5, 5), 0.4, seed=11, device=torch.device("cpu"))
        out = hstu_attention_reference(q, k, v, offsets, 5, dropout_p=0.4, dropout_seed=11)
        expected = dense_hstu_attention(q, k, v, offsets, 5, keep_mask=keep, dropout_p=0.4)
        torch.testing.assert_close(out, expected)
        assert not torch.allclose(out, hstu_attention_reference(q, k, v, offsets, 5))

    def test_follows_torch_manual_seed_and_gradients_use_the_forward_mask(self):
        q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        offsets = torch.tensor([0, 4, 9])

        def f(q, k, v):
            torch.manual_seed(42)
            return hstu_attention(q, k, v, offsets, 5, dropout_p=0.3)

        assert torch.equal(f(q, k, v), f(q, k, v))
        assert torch.autograd.gradcheck(f, (q, k, v))

    def test_preserves_the_mean(self):
        q, k, v = (torch.randn(64, 4, 16) for _ in range(3))
        offsets = torch.tensor([0, 64])
        base = hstu_attention(q, k, v, offsets, 64).abs().mean()
        dropped = torch.stack([hstu_attention(q, k, v, offsets, 64, dropout_p=0.5).abs().mean() for _ in range(20)])
        assert abs(float(dropped.mean()) / float(base) - 1.0) < 0.35


class TestBadInputs:
    def setup_method(self):
        self.q = torch.randn(6, 2, 8)
        self.offsets = torch.tensor([0, 2, 6])

    def call(self, **overrides):
        args = dict(q=self.q, k=self.q, v=self.q, seq_offsets=self.offsets, max_seqlen=4)
        args.update(overrides)
        positional = [args.pop(n) for n in ("q", "k", "v", "seq_offsets", "max_seqlen")]
        return hstu_attention(*positional, **args)

    @pytest.mark.parametrize(
        "overrides,error,match",
        [
            (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
            (dict(q=torch.randn(6, 2, 8).long()), TypeError, "q must have dtype"),
            (dict(k=torch.randn(6, 2, 8).double()), TypeError, "k has dtype"),
            (dict(q=torch.randn(6, 16)), ValueError, "q must be 3-D"),
            (dict(k=torch.randn(6, 2, 4)), ValueError, "k must have q's shape"),
            (dict(v=torch.randn(5, 2, 8)), ValueError, "v must be"),
            (dict(seq_offsets=torch.tensor([0.0, 6.0])), TypeError, "seq_offsets must be int32 or int64"),
            (dict(seq_offsets=torch.tensor([[0, 6]])), ValueError, "seq_offsets must be 1-D"),
            (dict(seq_offsets=torch.tensor([1, 6])), ValueError, r"seq_offsets\[0\] must be 0"),
            (dict(seq_offsets=torch.tensor([0, 4, 3, 6])), ValueError, "non-decreasing"),
            (dict(seq_offsets=torch.tensor([0, 2, 5])), ValueError, r"seq_offsets\[-1\] must equal"),
            (dict(max_seqlen=3), ValueError, "max_seqlen=3 is less than the longest"),
            (dict(max_seqlen=4.0), TypeError, "max_seqlen must be an int"),
            (dict(max_seqlen=-1), ValueError, "max_seqlen must be >= 0"),
            (dict(num_targets=torch.tensor([3, 0])), ValueError, r"num_targets\[0\]=3 exceeds"),
            (dict(num_targets=torch.tensor([-1, 0])), ValueError, "num_targets must be non-negative"),
            (dict(num_targets=torch.tensor([1, 0, 0])), ValueError, "num_targets must have 2 elements"),
            (dict(num_contexts=torch.tensor([2, 5])), ValueError, r"num_contexts\[1\]=5 exceeds"),
            (dict(num_contexts=torch.tensor([1, 1]), num_targets=torch.tensor([2, 0])), ValueError, "num_contexts"),
            (dict(num_contexts=torch.tensor([-1, 0])), ValueError, "num_contexts must be non-negative"),
            (dict(num_contexts=torch.tensor([1.0, 0.0])), TypeError, "num_contexts must be int32 or int64"),
            (dict(causal=False, num_targets=torch.tensor([1, 1])), ValueError, "need causal=True"),
            (dict(causal=False, num_contexts=torch.tensor([1, 1])), ValueError, "need causal=True"),
            (dict(target_group_size=0), ValueError, "target_group_size must be >= 1"),
            (dict(rab=torch.randn(2, 3, 4, 4)), ValueError, "rab must be"),
            (dict(rab=torch.randn(1, 2, 4, 4)), ValueError, "rab must be"),
            (dict(rab=torch.randn(2, 1, 3, 4)), ValueError, "rab's last two dims"),
            (dict(rab=torch.randn(2, 4, 4)), ValueError, "rab must be 4-D"),
            (dict(rab=torch.ones(2, 1, 4, 4, dtype=torch.int32)), TypeError, "rab must have dtype"),
            (dict(dropout_p=1.0), ValueError, "dropout_p"),
            (dict(dropout_p=-0.1), ValueError, "dropout_p"),
            (dict(scaling_seqlen=0), ValueError, "scaling_seqlen must be >= 1"),
            (dict(alpha="1"), TypeError, "alpha must be a float"),
            (dict(causal=1), TypeError, "causal must be a bool"),
        ],
    )
    def test_raises_naming_the_argument(self, overrides, error, match):
        with pytest.raises(error, match=match):
            self.call(**overrides)

    def test_checked_offsets_are_not_copied_to_the_host_again(self, monkeypatch):
        """A layer stack calls the op once per layer with the same index tensors: their values go to the host once."""
        from hstu.ops.hstu_attention import op

        copies = []
        monkeypatch.setattr(op, "to_host", lambda *t: copies.append(len(t)) or to_host(*t))
        targets = torch.tensor([1, 0])
        for _ in range(3):
            self.call(num_targets=targets)
        assert len(copies) == 1
        self.call(num_targets=targets, max_seqlen=9)  # a looser bound needs no new copy
        with pytest.raises(ValueError, match="max_seqlen=3 is less than the longest"):
            self.call(num_targets=targets, max_seqlen=3)  # the cached longest length still bounds it
        assert len(copies) == 1
        self.call(num_targets=torch.tensor([1, 0]))  # another targets tensor: checked again
        self.call()
        assert len(copies) == 3

    @pytest.mark.parametrize(
        "write,match",
        [
            (lambda offsets, targets: offsets.__setitem__(1, 7), "non-decreasing"),
            (lambda offsets, targets: offsets[2:].fill_(5), r"seq_offsets\[-1\] must equal"),  # through a view
            (lambda offsets, targets: targets.__setitem__(0, 3), r"num_targets\[0\]=3 exceeds"),
        ],
    )
    def test_index_tensors_written_in_place_are_checked_again(self, write, match):
        targets = torch.tensor([1, 0])
        self.call(num_targets=targets)
        write(self.offsets, targets)
        with pytest.raises(ValueError, match=match):
            self.call(num_targets=targets)

    def test_checked_offsets_with_other_rows_are_checked_again(self):
        self.call()
        q = torch.randn(7, 2, 8)
        with pytest.raises(ValueError, match=r"seq_offsets\[-1\] must equal the number of rows 7"):
            self.call(q=q, k=q, v=q)

    def test_inference_tensors_are_checked_every_time(self):
        with torch.inference_mode():
            offsets = torch.tensor([0, 2, 6])
            self.call(seq_offsets=offsets)
            with pytest.raises(ValueError, match=r"num_targets\[0\]=3 exceeds"):
                self.call(seq_offsets=offsets, num_targets=torch.tensor([3, 0]))

    def test_mixed_devices(self):
        with pytest.raises(ValueError, match="seq_offsets is on meta"):
            self.call(seq_offsets=torch.tensor([0, 2, 6], device="meta"))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.randn(12, 3, 16)
        v = torch.randn(12, 3, 32)
        out = hstu_attention(q, q, v, torch.tensor([0, 5, 12]), 7)
        assert out.shape == (12, 3, 32)


def test_torch_compile_forward_and_backward():
    offsets = torch.tensor([0, 3, 8])
    q, k, v = (torch.randn(8, 2, 16, requires_grad=True) for _ in range(3))
    eager = hstu_attention(q, k, v, offsets, 5, alpha=0.25, num_targets=torch.tensor([1, 2]))
    compiled_fn = torch.compile(
        lambda q, k, v: hstu_attention(q, k, v, offsets, 5, alpha=0.25, num_targets=torch.tensor([1, 2])),
        backend="aot_eager",
        fullgraph=False,
    )
    out = compiled_fn(q, k, v)
    torch.testing.assert_close(out, eager)
    (grad_q,) = torch.autograd.grad(out.sum(), q)
    (eager_grad_q,) = torch.autograd.grad(eager.sum(), q)
    torch.testing.assert_close(grad_q, eager_grad_q)


def test_registered_as_custom_op():
    assert hasattr(torch.ops.hstu, "hstu_attention_forward")
    assert hasattr(torch.ops.hstu, "hstu_attention_backward")
    torch.library.opcheck(
        torch.ops.hstu.hstu_attention_forward,
        (torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.tensor([0, 2, 5], dtype=torch.int32),
         3, 1.0, 3, True, -1, None, None, 1, None, 0.0, 0, False),  # fmt: skip
    )



def test_eager_calls_skip_the_custom_op_dispatch_and_tracing_keeps_it(monkeypatch):
    # Eager calls run the ops' implementations directly (the custom-op dispatch is ~30 us of host time per call);
    # under FakeTensorMode (as under torch.compile) the custom ops must still be what runs, or tracing would see the
    # implementation's Python instead of one op.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hstu.ops.hstu_attention import op

    calls = []
    for name in ("_forward_op", "_backward_op"):
        real = getattr(op, name)
        monkeypatch.setattr(op, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    offsets = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, 2, 16, requires_grad=True) for _ in range(3))
    out = hstu_attention(q, k, v, offsets, 5, alpha=0.25)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    with torch.no_grad():
        torch.testing.assert_close(hstu_attention(q, k, v, offsets, 5, alpha=0.25), out)
    assert calls == []
    expected = hstu_attention_reference(q, k, v, offsets, 5, alpha=0.25)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)

    with FakeTensorMode():
        fq, fk, fv = (torch.randn(8, 2, 16, requires_grad=True) for _ in range(3))
        fake_out = hstu_attention(fq, fk, fv, torch.tensor([0, 3, 8], dtype=torch.int32), 5, alpha=0.25)
        torch.autograd.grad(fake_out.sum(), (fq, fk, fv))
    assert calls == ["_forward_op", "_backward_op"]

    # torch.jit.trace cannot see the extension's calls: it must record the custom op
    with warnings.catch_warnings():  # (trace's deprecation; the argument checks read index values while tracing)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda q, k, v: hstu_attention(q, k, v, offsets, 5, alpha=0.25),
                                 (q.detach(), k.detach(), v.detach()))  # fmt: skip
    assert "hstu::hstu_attention_forward" in str(traced.graph)
    torch.testing.assert_close(traced(q.detach(), k.detach(), v.detach()), expected.detach())


def test_double_backward_through_the_kernel_path_takes_the_reference(monkeypatch):
    # The kernels' gradients are plain tensors: with create_graph=True the backward must run the reference (whose
    # gradients are differentiable) rather than return gradients whose own gradients would silently be missing.
    # The kernel path is simulated: forward = reference, backward = reference gradients detached (like the kernel's).
    from hstu.ops import _extension
    from hstu.ops.hstu_attention import op

    kernel_backward_calls = []

    def detached_backward(grad_out, q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window_size,
                          num_contexts, num_targets, group, rab, rab_needs_grad, dropout_p, dropout_seed, det):  # fmt: skip
        kernel_backward_calls.append(torch.is_grad_enabled())  # True: called with create_graph=True
        with torch.no_grad():
            return op.hstu_attention_reference_backward(
                grad_out, q, k, v, seq_offsets, max_seqlen, alpha=alpha, scaling_seqlen=scaling_seqlen, causal=causal,
                window_size=window_size, num_contexts=num_contexts, num_targets=num_targets, target_group_size=group,
                rab=rab, rab_needs_grad=rab_needs_grad)  # fmt: skip

    monkeypatch.setattr(op, "_use_kernel", lambda *a: True)
    monkeypatch.setattr(op.cuda, "forward", lambda *a: op._reference_forward(*a))
    monkeypatch.setattr(op.cuda, "backward", detached_backward)
    offsets = torch.tensor([0, 3, 8])
    q, k, v = (torch.randn(8, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def second_order(fn):
        out = fn(q, k, v, offsets, 5, alpha=0.25)
        (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(grad_q.sum(), (q, k, v))

    monkeypatch.setattr(_extension, "_warned", set())  # (the warning is once per process)
    with pytest.warns(RuntimeWarning, match="create_graph=True"):
        got = second_order(hstu_attention)
    # (the second pass differentiates out.pow(2)'s backward, which goes through the op's first-order backward again)
    assert True not in kernel_backward_calls
    for g, want in zip(got, second_order(hstu_attention_reference)):
        torch.testing.assert_close(g, want)
    kernel_backward_calls.clear()
    out = hstu_attention(q, k, v, offsets, 5, alpha=0.25)
    torch.autograd.grad(out.sum(), (q, k, v))  # first order: the (simulated) kernel
    assert kernel_backward_calls == [False]
    with pytest.raises(ValueError, match="dropout_p"):
        out = hstu_attention(q, k, v, offsets, 5, alpha=0.25, dropout_p=0.1)
        torch.autograd.grad(out.sum(), q, create_graph=True)

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [-1, 0, 2])
def test_mask_without_contexts_or_targets_matches_zero_counts(causal, window):
    # Absent num_contexts / num_targets take a shorter path that must equal the general rules with zeros.
    lengths = torch.tensor([0, 1, 5, 9])
    zeros = torch.zeros(4, dtype=torch.int64)
    got = attention_mask(lengths, 9, causal=causal, window_size=window)
    general = attention_mask(lengths, 9, causal=causal, window_size=window,
                             num_contexts=zeros if causal else None, num_targets=zeros if causal else None)  # fmt: skip
    assert torch.equal(got, general)


def test_public_function_skips_the_custom_op_autograd_wrapper(monkeypatch):
    # The public function applies the op's autograd formula itself: torch.library's autograd wrapper rebuilds the
    # 16-argument schema on every call (fill_defaults), ~60 us of host time per forward. The direct custom-op call
    # below shows the probe sees that wrapper.
    import torch._library.utils as library_utils

    calls = []
    fill_defaults = library_utils.fill_defaults
    monkeypatch.setattr(library_utils, "fill_defaults", lambda *a, **kw: calls.append(1) or fill_defaults(*a, **kw))
    offsets = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, 2, 16, requires_grad=True) for _ in range(3))
    out = hstu_attention(q, k, v, offsets, 5, alpha=0.25)
    torch.autograd.grad(out.sum(), (q, k, v))
    assert calls == []
    direct = torch.ops.hstu.hstu_attention_forward(q, k, v, offsets, 5, 0.25, 5, True, -1, None, None, 1, None, 0.0, 0,
                                                   False)  # fmt: skip
    torch.testing.assert_close(direct, out)
    assert calls, "the probe did not see torch.library's autograd wrapper"
