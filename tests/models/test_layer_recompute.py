"""HSTULayer's recompute_input_norm / recompute_silu: the backward keeps neither LayerNorm(x) nor u, v, q, k (SiLU's
output), recomputing them, with outputs and gradients bit for bit those without the options (fp32 on CPU), dropout
included, alone, together and under whole-layer recompute; the saved tensors shrink by exactly those tensors."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from hstu.modules.hstu_layer import AttentionInputs, HSTULayer, HSTUStack

OPTIONS = {
    "input_norm": dict(recompute_input_norm=True),
    "silu": dict(recompute_silu=True),
    "both": dict(recompute_input_norm=True, recompute_silu=True),
}


def _inputs(lengths: list[int], device: str = "cpu") -> AttentionInputs:
    offsets = [0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()]
    return AttentionInputs(torch.tensor(offsets, dtype=torch.int64, device=device), max(lengths, default=0))


def _layer(dims: tuple[int, int, int, int], device: str = "cpu", **kwargs) -> HSTULayer:
    torch.manual_seed(0)
    layer = HSTULayer(*dims, **kwargs).to(device).train()
    with torch.no_grad():  # non-trivial LayerNorm parameters and bias
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def _run(layer: torch.nn.Module, x: torch.Tensor, inputs: AttentionInputs, *, wrap=None, backwards: int = 1):
    """Output, then the gradients of x and of every parameter after ``backwards`` backward passes."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # the dropout masks
    y = wrap(layer, x) if wrap is not None else layer(x, inputs)
    loss = (y * torch.linspace(-1.0, 1.0, y.numel(), device=y.device).view_as(y)).sum() + y.square().sum()
    for i in range(backwards):
        loss.backward(retain_graph=i + 1 < backwards)
    return [y.detach(), x.grad, *(p.grad for p in layer.parameters())]


def _assert_bit_identical(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    heads=st.integers(1, 3),
    qk_dim=st.integers(1, 5),
    v_dim=st.integers(1, 5),
    width=st.integers(1, 12),
    dropout=st.sampled_from([0.0, 0.3]),
    attention_dropout=st.sampled_from([0.0, 0.25]),
    option=st.sampled_from(sorted(OPTIONS)),
    whole_layer=st.booleans(),
)
def test_options_give_bit_identical_outputs_and_gradients(lengths, heads, qk_dim, v_dim, width, dropout,
                                                          attention_dropout, option, whole_layer):
    dims = (width, heads, qk_dim, v_dim)
    inputs = _inputs(lengths)
    x = torch.randn(sum(lengths), width)
    settings_ = dict(dropout=dropout, attention_dropout=attention_dropout)
    want = _run(_layer(dims, **settings_), x, inputs)
    got = _run(_layer(dims, recompute=whole_layer, **settings_, **OPTIONS[option]), x, inputs)
    _assert_bit_identical(got, want)


def _saved(layer: HSTULayer, x: torch.Tensor, inputs: AttentionInputs, forward=None) -> collections.Counter:
    """Bytes of every distinct storage that the forward (``forward(layer, x)``, by default the layer's) saves for the
    backward, the parameters left out, seen by saved-tensor hooks around it, as a Counter of storage sizes."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(layer, x) if forward is not None else layer(x, inputs)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    return collections.Counter(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_saved_tensors_shrink_by_exactly_the_recomputed_ones(option):
    dims = width, heads, qk_dim, v_dim = (24, 2, 5, 7)
    inputs = _inputs([7, 0, 13, 1])
    tokens = 21
    x = torch.randn(tokens, width)
    normed = tokens * width * 4  # LayerNorm(x), fp32
    silu = tokens * heads * (2 * v_dim + 2 * qk_dim) * 4  # u, v, q, k together
    parts = {"input_norm": [normed], "silu": [tokens * heads * d * 4 for d in (v_dim, v_dim, qk_dim, qk_dim)]}
    dropped = {"input_norm": parts["input_norm"], "silu": parts["silu"], "both": parts["input_norm"] + parts["silu"]}

    base = _saved(_layer(dims, dropout=0.2), x, inputs)
    kept = _saved(_layer(dims, dropout=0.2, **OPTIONS[option]), x, inputs)
    # Exactly the dropped tensors are missing; everything else still reaches the outer hooks.
    assert base - kept == collections.Counter(dropped[option]) and not kept - base
    assert sum(base.elements()) - sum(kept.elements()) == {"input_norm": normed, "silu": silu,
                                                       "both": normed + silu}[option]
    # Whole-layer recompute keeps only x, with or without the options.
    whole = _saved(_layer(dims, dropout=0.2, recompute=True), x, inputs)
    assert whole == _saved(_layer(dims, dropout=0.2, recompute=True, **OPTIONS[option]), x, inputs)
    assert sum(whole.elements()) == tokens * width * 4


def test_a_second_backward_through_a_retained_graph_recomputes_again():
    dims, inputs = (10, 2, 3, 4), _inputs([5, 4])
    x = torch.randn(9, 10)
    want = _run(_layer(dims, dropout=0.3), x, inputs, backwards=2)
    got = _run(_layer(dims, dropout=0.3, **OPTIONS["both"]), x, inputs, backwards=2)
    _assert_bit_identical(got, want)


def _save_on_cpu(layer, x):
    with torch.autograd.graph.save_on_cpu():
        return layer(x, _inputs([6, 0, 5]))


def _checkpointed(layer, x):
    return checkpoint(layer, x, _inputs([6, 0, 5]), use_reentrant=False)


@pytest.mark.parametrize("wrap", [_save_on_cpu, _checkpointed], ids=["save_on_cpu", "checkpoint"])
def test_outer_saved_tensor_hooks_and_checkpoints_compose(wrap):
    def stack(**options):
        torch.manual_seed(0)
        return HSTUStack([HSTULayer(8, 2, 3, 3, dropout=0.3, **options) for _ in range(2)]).train()

    x = torch.randn(11, 8)
    want = _run(stack(), x, None, wrap=wrap)
    got = _run(stack(**OPTIONS["both"]), x, None, wrap=wrap)
    _assert_bit_identical(got, want)


def test_cpu_autocast_bf16_is_bit_identical():
    dims, inputs = (16, 2, 4, 4), _inputs([6, 3])
    x = torch.randn(9, 16)

    def autocast(layer, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x, inputs).float()

    want = _run(_layer(dims, dropout=0.2), x, inputs, wrap=autocast)
    got = _run(_layer(dims, dropout=0.2, **OPTIONS["both"]), x, inputs, wrap=autocast)
    _assert_bit_identical(got, want)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_changing_x_in_place_after_the_forward_is_autograd_s_error(option):
    inputs = _inputs([4, 3])
    for options in ({}, OPTIONS[option]):  # the same error with and without the options
        layer = _layer((8, 2, 3, 3), **options)
        x = torch.randn(7, 8, requires_grad=True)
        h = x * 1.0
        y = layer(h, inputs)
        h.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_eval_and_no_grad_forwards_are_unchanged():
    dims, inputs = (8, 2, 3, 3), _inputs([4, 3])
    x = torch.randn(7, 8)
    plain, recomputing = _layer(dims, dropout=0.2), _layer(dims, dropout=0.2, **OPTIONS["both"])
    with torch.no_grad():
        assert torch.equal(plain.eval()(x, inputs), recomputing.eval()(x, inputs))
        for a, b in zip(plain.project(x), recomputing.project(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["recompute", "recompute_input_norm", "recompute_silu"])
def test_options_must_be_bools(name):
    with pytest.raises(TypeError, match=name + " must be a bool"):
        HSTULayer(8, 2, 3, 3, **{name: 1})
