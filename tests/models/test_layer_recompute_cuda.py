"""recompute_input_norm / recompute_silu on CUDA under bf16 autocast, through the fused attention and
LayerNorm * u * dropout kernels, with the input side as torch ops and through the fused uvqk_projection kernels:
outputs and gradients bit for bit those without the options (deterministic attention backward), and the saved
tensors shrink by exactly LayerNorm(x) and u, v, q, k in bf16 (one buffer for all four from the fused op)."""

from __future__ import annotations

import collections

import pytest
import torch

from hstu.ops.uvqk import cuda as uvqk_cuda
from hstu.ops.uvqk import op as uvqk_op
from tests.models.test_layer_recompute import OPTIONS, _assert_bit_identical, _inputs, _layer, _run, _saved
from tests.ops.attention_cuda_common import gpu_test

DIMS = WIDTH, HEADS, QK_DIM, V_DIM = (256, 2, 64, 64)
LENGTHS = [100, 0, 37, 1, 250]


def _autocast(inputs):
    def forward(layer, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(x, inputs).float()

    return forward


def _cuda_layer(**options):
    layer = _layer(DIMS, "cuda", dropout=0.2, **options)
    layer.deterministic = True  # reproducible attention backward
    return layer


@pytest.fixture(params=[False, True], ids=["torch_uvqk", "fused_uvqk"])
def fused_uvqk(request, monkeypatch):
    """The layer's input side as torch ops, or through the fused uvqk_projection kernels."""
    if request.param and not uvqk_cuda.available(torch.empty(0, device="cuda")):
        pytest.skip("hstu._C was built without the uvqk kernels")
    monkeypatch.setattr(uvqk_op, "USE_CUDA_KERNELS", request.param)
    return request.param


@gpu_test
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_cuda_bf16_outputs_and_gradients_are_bit_identical(option, fused_uvqk):
    inputs = _inputs(LENGTHS, "cuda")
    x = torch.randn(sum(LENGTHS), WIDTH, device="cuda")
    want = _run(_cuda_layer(), x, inputs, wrap=_autocast(inputs))
    got = _run(_cuda_layer(**OPTIONS[option]), x, inputs, wrap=_autocast(inputs))
    _assert_bit_identical(got, want)


@gpu_test
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_cuda_bf16_saved_tensors_shrink_by_exactly_the_recomputed_ones(option, fused_uvqk):
    inputs = _inputs(LENGTHS, "cuda")
    tokens = sum(LENGTHS)
    x = torch.randn(tokens, WIDTH, device="cuda")
    normed = [tokens * WIDTH * 2]  # LayerNorm(x) as uvqk_proj's bf16 input
    silu = [tokens * HEADS * d * 2 for d in (V_DIM, V_DIM, QK_DIM, QK_DIM)]  # u, v, q, k
    if fused_uvqk:
        silu = [sum(silu)]  # the fused op's u, v, q, k: views of one (4, T, H D) buffer
    dropped = {"input_norm": normed, "silu": silu, "both": normed + silu}[option]
    base = _saved(_cuda_layer(), x, inputs, _autocast(inputs))
    kept = _saved(_cuda_layer(**OPTIONS[option]), x, inputs, _autocast(inputs))
    assert base - kept == collections.Counter(dropped) and not kept - base
