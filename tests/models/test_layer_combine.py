"""HSTULayer.combine runs LayerNorm(attn) * u * dropout as one op (layer_norm_mul_dropout: the fused kernels on
CUDA) and on CPU gives bit for bit the layer's composition of torch's LayerNorm, product and F.dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hstu.modules import hstu_layer
from hstu.modules.hstu_layer import HSTULayer


@pytest.mark.parametrize("training", [True, False])
def test_combine_is_the_fused_op_and_bit_identical_on_cpu(training, monkeypatch):
    torch.manual_seed(0)
    layer = HSTULayer(16, 2, 4, 3, dropout=0.3).train(training)
    x = torch.randn(9, 16, requires_grad=True)
    attn = torch.randn(9, 2, 3, requires_grad=True)
    u = torch.randn(9, 6, requires_grad=True)
    calls = []
    fused = hstu_layer.layer_norm_mul_dropout

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return fused(*args, **kwargs)

    monkeypatch.setattr(hstu_layer, "layer_norm_mul_dropout", spy)
    torch.manual_seed(1)
    out = layer.combine(x, attn, u)
    assert calls and calls[0]["dropout_p"] == 0.3 and calls[0]["training"] is training
    torch.manual_seed(1)
    gated = F.dropout(layer.attention_norm(attn.reshape(9, 6)) * u, p=0.3, training=training)
    expected = x + layer.output_proj(gated)
    assert torch.equal(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, attn, u, layer.attention_norm.weight))
    want = torch.autograd.grad(expected.square().sum(), (x, attn, u, layer.attention_norm.weight))
    assert all(torch.equal(a, b) for a, b in zip(grads, want))
