"""The attention op (CPU path = the reference) against an independent dense fp64 formulation."""

import math
import os
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
            (dict(max_seqlen=2**70), ValueError, "max_seqlen must be <= 9223372036854775807"),
            (dict(scaling_seqlen=2**64), ValueError, "scaling_seqlen must be <="),
            (dict(window_size=2**63), ValueError, "window_size must be <="),
            (dict(window_size=-(2**63) - 1), ValueError, "window_size must be >= -9223372036854775808"),
            (dict(target_group_size=2**70), ValueError, "target_group_size must be <="),
            (dict(seq_offsets=torch.tensor([0, 2**31 - 1, -(2**31)], dtype=torch.int32)), ValueError, "non-decreasing"),
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

    @pytest.mark.parametrize(
        "overrides,error,match",
        [
            (dict(q=torch.randn(6, 0, 8)), ValueError, "q must have at least one head"),
            (dict(window_size=-2), ValueError, "window_size must be -1"),
            (dict(alpha=float("nan")), ValueError, "alpha must be finite"),
            (dict(alpha=float("-inf")), ValueError, "alpha must be finite"),
            (dict(alpha=10**400), ValueError, "alpha must be finite"),
            (dict(deterministic="yes"), TypeError, "deterministic must be a bool"),
        ],
    )
    def test_extra_checks_name_the_argument(self, overrides, error, match):
        from hstu.ops._validation import check_attention_extras

        args = dict(q=self.q, window_size=-1, alpha=1.0, deterministic=False)
        args.update(overrides)
        with pytest.raises(error, match=match):
            check_attention_extras(args["q"], args["window_size"], args["alpha"], args["deterministic"])
        # ... and through the public op (without the check, H = 0 returns an empty output, window -2 means no
        # window, a NaN alpha gives NaN outputs and any truthy `deterministic` counts as True).
        with pytest.raises(error, match=match):
            self.call(**({"k": overrides["q"], "v": overrides["q"]} if "q" in overrides else {}), **overrides)

    def test_extra_checks_accept_valid_arguments(self):
        from hstu.ops._validation import check_attention_extras

        for window in (-1, 0, 5):
            check_attention_extras(self.q, window, 0.125, True)

    def test_loose_max_seqlen_costs_no_memory(self):
        # The reference pads to the longest sequence, not to max_seqlen (which only sets the default N).
        q, k, v = (torch.randn(6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = hstu_attention(q, k, v, self.offsets, 2**40, scaling_seqlen=4, window_size=2)
        expected = hstu_attention(q, k, v, self.offsets, 4, window_size=2)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(hstu_attention(q, k, v, self.offsets, 2**40), expected * 4 / 2**40)

    def test_reference_without_heads_returns_an_empty_output(self):
        out = hstu_attention_reference(torch.randn(6, 0, 8), torch.randn(6, 0, 8), torch.randn(6, 0, 4), self.offsets, 4)
        assert out.shape == (6, 0, 4)


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

    def detached_backward(grad_out, args, rab_needs_grad):
        kernel_backward_calls.append(torch.is_grad_enabled())  # True: called with create_graph=True
        with torch.no_grad():
            return op.reference.backward(grad_out, args, rab_needs_grad)

    monkeypatch.setattr(op, "_use_kernel", lambda *a: True)
    monkeypatch.setattr(op.cuda, "forward", lambda args: op.reference.forward(args))
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


# ---------------------------------------------------------------------------------------------------------------------
# Masks select: a NaN / inf in a key, value or rab entry that a row does not see changes neither that row's output nor
# any gradient it contributes to; what a row sees still propagates.

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

POISONS = (float("nan"), float("inf"), float("-inf"))


def fuzz(examples: int):
    """Deterministic in CI; HSTU_FUZZ_EXAMPLES=N explores N fresh random examples (as tests/data/test_fuzz.py)."""
    return settings(max_examples=int(os.environ.get("HSTU_FUZZ_EXAMPLES", examples)), deadline=None,
                    derandomize="HSTU_FUZZ_EXAMPLES" not in os.environ, database=None,
                    suppress_health_check=list(HealthCheck))  # fmt: skip


def _run_with_grads(q, k, v, offsets, max_seqlen, rab, kwargs, grad_out):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    rab_leaf = None if rab is None else rab.clone().requires_grad_(True)
    out = hstu_attention(*leaves, offsets, max_seqlen, rab=rab_leaf, **kwargs)
    inputs = leaves + ([rab_leaf] if rab_leaf is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), list(grads) + ([None] if rab is None else [])


def _visibility(offsets, kwargs, b):
    """(L, L) bool from the independent dense formulation: [i, j] = row i of sequence b sees key j."""
    L = int(offsets[b + 1] - offsets[b])
    c = int(kwargs["num_contexts"][b]) if "num_contexts" in kwargs else 0
    t = int(kwargs["num_targets"][b]) if "num_targets" in kwargs else 0
    return mask_matrix(L, c, t, kwargs["target_group_size"], kwargs["window_size"], kwargs["causal"]).bool()


def _assert_same_except(got, want, tainted_rows=(), what=""):
    keep = torch.ones(got.shape[0], dtype=torch.bool)
    keep[list(tainted_rows)] = False
    assert bool(torch.isfinite(got[keep]).all()), f"{what}: a row that sees no non-finite entry is not finite"
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-12, atol=1e-12, msg=what)


@fuzz(60)
@given(seed=st.integers(0, 2**31 - 1), family=st.sampled_from(range(len(MASK_FAMILIES))),
       target=st.sampled_from(["k", "v", "rab"]), poison=st.sampled_from(POISONS))  # fmt: skip
def test_invisible_nonfinite_entries_change_nothing_a_row_cannot_see(seed, family, target, poison):
    rng = random.Random(seed)
    q, k, v, offsets, max_seqlen, rab, kwargs = random_problem(rng, MASK_FAMILIES[family])
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    if target == "rab" and rab is None:
        rab = torch.randn(len(lengths), 1, max_seqlen + 1, max_seqlen, dtype=q.dtype)
    clean_out, clean_grads = _run_with_grads(q, k, v, offsets, max_seqlen, rab, kwargs, grad_out)
    b = rng.randrange(len(lengths))
    start, L = int(offsets[b]), lengths[b]
    seen = _visibility(offsets, kwargs, b)
    q2, k2, v2, rab2 = q.clone(), k.clone(), v.clone(), None if rab is None else rab.clone()
    if target == "rab":
        # Any entry of sequence b's rab block that no row sees: masked, past the sequence end, or past max_seqlen.
        hidden = torch.ones(rab.shape[2], rab.shape[3], dtype=torch.bool)
        hidden[:L, :L] = ~seen
        cells = hidden.nonzero().tolist()
        for i, j in rng.sample(cells, min(len(cells), 3)):
            rab2[b, rng.randrange(rab.shape[1]), i, j] = poison
        out, grads = _run_with_grads(q2, k2, v2, offsets, max_seqlen, rab2, kwargs, grad_out)
        _assert_same_except(out, clean_out, what="output")
        for name, got, want in zip("q k v rab".split(), grads, clean_grads):
            if got is not None:
                _assert_same_except(got, want, what=f"d{name}")
        return
    if L == 0:
        return
    j = rng.randrange(L)
    head = rng.randrange(q.shape[1])
    (k2 if target == "k" else v2)[start + j, head, rng.randrange(v.shape[2] if target == "v" else k.shape[2])] = poison
    out, grads = _run_with_grads(q2, k2, v2, offsets, max_seqlen, rab2, kwargs, grad_out)
    sees_j = [start + i for i in range(L) if seen[i, j]]
    assert start + j in sees_j  # every row sees its own key
    _assert_same_except(out, clean_out, sees_j, "output")
    if target == "k" and poison != poison:  # a NaN key: the rows that see it are NaN
        assert bool(torch.isnan(out[sees_j, head]).all(dim=-1).all())
    dq, dk, dv, drab = grads
    _assert_same_except(dq, clean_grads[0], sees_j, "dq")
    _assert_same_except(dk, clean_grads[1], [start + j], "dk")
    _assert_same_except(dv, clean_grads[2], [start + j], "dv")
    if drab is not None:
        # Only column j of sequence b's block depends on the poisoned key / value.
        drab, want = drab.clone(), clean_grads[3].clone()
        drab[b, :, :, j] = want[b, :, :, j] = 0
        _assert_same_except(drab.flatten(0, 1), want.flatten(0, 1), what="drab")


def test_rab_minus_inf_above_the_diagonal_equals_rab_zero_there():
    lengths = [5, 0, 9, 1]
    offsets = lengths_to_offsets(torch.tensor(lengths))
    q, k, v = (torch.randn(sum(lengths), 2, 16, dtype=torch.float64) for _ in range(3))
    above = torch.ones(9, 9, dtype=torch.bool).triu(1)
    rab = torch.randn(4, 2, 9, 9, dtype=torch.float64).masked_fill(above, 0.0)
    blocked = rab.masked_fill(above, float("-inf"))
    grad_out = torch.randn_like(v)
    kwargs = dict(alpha=0.25, causal=True, window_size=-1, target_group_size=1)
    want_out, want_grads = _run_with_grads(q, k, v, offsets, 9, rab, kwargs, grad_out)
    got_out, got_grads = _run_with_grads(q, k, v, offsets, 9, blocked, kwargs, grad_out)
    assert bool(torch.isfinite(got_out).all())
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    for got, want in zip(got_grads, want_grads):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_nan_rab_outside_each_sequence_of_a_jagged_batch():
    # rab is padded to max_seqlen: the part of a short sequence's block past its length is never seen.
    lengths = [2, 7, 4]
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int32))
    q, k, v = (torch.randn(13, 3, 8, dtype=torch.float64) for _ in range(3))
    rab = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    poisoned = torch.full_like(rab, float("nan"))
    for b, n in enumerate(lengths):
        poisoned[b, :, :n, :n] = rab[b, :, :n, :n]
    grad_out = torch.randn_like(v)
    for causal in (True, False):
        kwargs = dict(causal=causal, window_size=-1, target_group_size=1)
        want_out, want_grads = _run_with_grads(q, k, v, offsets, 8, rab, kwargs, grad_out)
        got_out, got_grads = _run_with_grads(q, k, v, offsets, 8, poisoned, kwargs, grad_out)
        torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
        for b, n in enumerate(lengths):  # the rab gradient is zero past each sequence, as in the clean run
            want_grads[3][b, :, n:] = want_grads[3][b, :, :, n:] = 0
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@fuzz(60)
@given(seed=st.integers(0, 2**31 - 1), family=st.sampled_from(range(len(MASK_FAMILIES))),
       poisons=st.lists(st.tuples(st.sampled_from("qkv"), st.sampled_from(POISONS + (0.0,))), min_size=1,
                        max_size=6))  # fmt: skip
def test_nonfinite_inputs_follow_ieee_for_what_rows_see(seed, family, poisons):
    # Visible NaN / inf entries, also several in one row with opposite signs, give what the term-by-term dense
    # formulation gives: NaN, +inf or -inf in exactly the right places (assert_close compares them).
    rng = random.Random(seed)
    q, k, v, offsets, max_seqlen, rab, kwargs = random_problem(rng, MASK_FAMILIES[family])
    if q.shape[0] == 0:
        return
    for name, value in poisons:
        t = {"q": q, "k": k, "v": v}[name]
        t[rng.randrange(t.shape[0]), rng.randrange(t.shape[1]), rng.randrange(t.shape[2])] = value
    if rng.random() < 0.5:  # large finite values too: products that overflow to +-inf
        v[rng.randrange(v.shape[0])] *= 1e308
    out = hstu_attention(q, k, v, offsets, max_seqlen, rab=rab, **kwargs)
    expected = dense_hstu_attention(q, k, v, offsets, max_seqlen, rab=rab, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_dropped_entries_are_selected_like_masked_ones():
    q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64) for _ in range(3))
    offsets = torch.tensor([0, 4, 9])
    keep = dropout_keep_mask((2, 2, 5, 5), 0.4, seed=3, device=torch.device("cpu"))
    keep[1, 0, 4, 1] = False  # row 4 of sequence 1 sees key 1 but drops it in head 0
    keep[1, 0, :4, 1] = True
    k2 = k.clone()
    k2[4 + 1, 0] = float("nan")
    out = hstu_attention_reference(q, k2, v, offsets, 5, dropout_p=0.4, dropout_mask=keep)
    clean = hstu_attention_reference(q, k, v, offsets, 5, dropout_p=0.4, dropout_mask=keep)
    torch.testing.assert_close(out[8, 0], clean[8, 0], rtol=0, atol=0)
    assert bool(torch.isnan(out[5:8, 0]).all())
    expected = dense_hstu_attention(q, k2, v, offsets, 5, keep_mask=keep, dropout_p=0.4)
    torch.testing.assert_close(out, expected, equal_nan=True)
