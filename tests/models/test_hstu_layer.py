"""The HSTU layer and encoder against a naive per-sequence implementation written from the paper's equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from hstu.modules import EncoderConfig, EncoderInputs, HSTUEncoder, HSTULayer, RelativeAttentionBias
from hstu.modules.hstu_layer import AttentionInputs
from hstu.modules.positional import log_time_buckets
from hstu.ops import lengths_to_offsets


def naive_visible(length, contexts, targets, i, j):
    history_end = length - targets
    if i < contexts:
        return j < history_end
    if i < history_end:
        return j <= i
    return j < history_end or j == i  # target group size 1


def naive_layer(layer: HSTULayer, x, lengths, contexts, targets, scaling, rab=None):
    """Per sequence, per row, per key: LayerNorm -> uvqk -> SiLU attention / N -> gate -> project -> residual."""
    H, dv, dqk = layer.num_heads, layer.v_dim, layer.qk_dim
    out = torch.empty_like(x)
    start = 0
    for b, L in enumerate(lengths.tolist()):
        xs = x[start : start + L]
        normed = F.layer_norm(xs, (xs.shape[1],), layer.input_norm.weight, layer.input_norm.bias, layer.input_norm.eps)
        proj = F.silu(normed @ layer.uvqk_proj.weight.T + layer.uvqk_proj.bias).view(L, H, 2 * dv + 2 * dqk)
        u, v, q, k = proj[..., :dv], proj[..., dv : 2 * dv], proj[..., 2 * dv : 2 * dv + dqk], proj[..., 2 * dv + dqk :]
        attn = torch.zeros(L, H, dv, dtype=x.dtype)
        for h in range(H):
            for i in range(L):
                for j in range(L):
                    if naive_visible(L, int(contexts[b]), int(targets[b]), i, j):
                        score = q[i, h] @ k[j, h] + (0.0 if rab is None else rab[b, 0, i, j])
                        attn[i, h] += F.silu(layer.alpha * score) / scaling * v[j, h]
        gated = F.layer_norm(attn.reshape(L, H * dv), (H * dv,), layer.attention_norm.weight,
                             layer.attention_norm.bias, layer.attention_norm.eps) * u.reshape(L, H * dv)
        out[start : start + L] = xs + gated @ layer.output_proj.weight.T
        start += L
    return out


@pytest.mark.parametrize("heads,dqk,dv", [(1, 8, 8), (2, 4, 6)])
def test_layer_matches_naive(heads, dqk, dv):
    torch.manual_seed(0)
    D = 12
    layer = HSTULayer(D, heads, dqk, dv, scaling_seqlen=9).double().eval()
    with torch.no_grad():  # non-trivial norm parameters
        for norm in (layer.input_norm, layer.attention_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    lengths = torch.tensor([5, 1, 0, 7])
    contexts = torch.tensor([1, 0, 0, 2])
    targets = torch.tensor([2, 1, 0, 3])
    x = torch.randn(int(lengths.sum()), D, dtype=torch.float64)
    inputs = AttentionInputs(lengths_to_offsets(lengths), int(lengths.max()), contexts, targets)
    expected = naive_layer(layer, x, lengths, contexts, targets, scaling=9)
    torch.testing.assert_close(layer(x, inputs), expected)
    assert layer.alpha == pytest.approx(1 / math.sqrt(dqk))


def test_layer_with_relative_bias_matches_naive_and_has_gradients():
    torch.manual_seed(1)
    D, max_len = 8, 6
    bias = RelativeAttentionBias(max_len, num_buckets := 16).double()
    layer = HSTULayer(D, 1, 4, 4, scaling_seqlen=max_len, relative_attention_bias=bias).double()
    lengths = torch.tensor([4, 6])
    offsets = lengths_to_offsets(lengths)
    times = torch.cumsum(torch.randint(0, 5000, (int(lengths.sum()),)), 0)
    buckets = RelativeAttentionBias.time_bucket_matrix(times, offsets, 6, num_buckets, "query")
    x = torch.randn(int(lengths.sum()), D, dtype=torch.float64, requires_grad=True)
    inputs = AttentionInputs(offsets, 6, time_buckets=buckets)
    out = layer(x, inputs)
    rab = bias(buckets, 2, 6)
    # The bias by hand: position weight of (i - j) plus time weight of bucket(|t_i - t_j|).
    b, i, j = 1, 4, 2
    t = times[4 + i] - times[4 + j]
    manual = bias.position_weights[i - j + max_len - 1] + bias.time_weights[log_time_buckets(t.view(1), num_buckets)[0]]
    assert float(rab[b, 0, i, j]) == pytest.approx(float(manual))
    zeros = torch.zeros(2, dtype=torch.int64)
    torch.testing.assert_close(out, naive_layer(layer, x.detach(), lengths, zeros, zeros, 6, rab.detach()))
    out.square().sum().backward()
    assert bias.time_weights.grad is not None and bias.time_weights.grad.abs().sum() > 0
    assert bias.position_weights.grad.abs().sum() > 0
    assert layer.uvqk_proj.weight.grad.abs().sum() > 0


def test_gather_weights_gradient_matches_autograd_indexing():
    from hstu.modules.positional import gather_weights

    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 10, (3, 5, 5))
    g = torch.randn(3, 5, 5, dtype=torch.float64)
    (gather_weights(w, idx) * g).sum().backward()
    expected = torch.zeros(10, dtype=torch.float64).index_add_(0, idx.reshape(-1), g.reshape(-1))
    torch.testing.assert_close(w.grad, expected)


def test_time_buckets_follow_meta():
    dt = torch.tensor([0, 1, 2, 10, 3600, -3600, 10**9])
    expected = [int(math.log(max(abs(int(v)), 1)) / 0.301) for v in dt]
    assert log_time_buckets(dt, 128).tolist() == [min(e, 128) for e in expected]


def test_recompute_gives_the_same_gradients():
    torch.manual_seed(2)
    lengths = torch.tensor([3, 5])
    inputs = AttentionInputs(lengths_to_offsets(lengths), 5)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(3)
        layer = HSTULayer(8, 2, 4, 4, dropout=0.3, recompute=recompute)
        x = torch.randn(8, 8, requires_grad=True)
        torch.manual_seed(4)
        layer(x, inputs).sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def _ranking_encoder(contextual=0):
    cfg = EncoderConfig(embedding_dim=8, num_layers=2, num_heads=2, qk_dim=4, v_dim=4, dropout=0.0, input_dropout=0.0,
                        max_tokens=40, interleave_actions=True, position_encoding="absolute", num_time_buckets=8,
                        relative_attention_bias=True)
    return HSTUEncoder(cfg).double().eval()


def _inputs(items, actions, lengths, cands, ctx=None, num_ctx=0):
    return EncoderInputs(item_embeddings=items, seq_lengths=lengths, timestamps=torch.arange(items.shape[0]) * 100,
                         num_candidates=cands, action_embeddings=actions, contextual_embeddings=ctx,
                         num_contextual=num_ctx)


def test_candidates_see_history_not_each_other_nor_their_labels():
    torch.manual_seed(5)
    enc = _ranking_encoder()
    lengths, cands = torch.tensor([6, 4]), torch.tensor([2, 1])
    items = torch.randn(10, 8, dtype=torch.float64)
    actions = torch.randn(10, 8, dtype=torch.float64)
    base = enc(_inputs(items, actions, lengths, cands)).item_outputs
    # The candidates' action embeddings (their labels) must not matter at all.
    changed_actions = actions.clone()
    changed_actions[[4, 5, 9]] += 5.0
    torch.testing.assert_close(enc(_inputs(items, changed_actions, lengths, cands)).item_outputs, base)
    # Changing candidate 5 leaves candidate 4 and all history outputs unchanged; and vice versa.
    changed_items = items.clone()
    changed_items[5] += 3.0
    out = enc(_inputs(changed_items, actions, lengths, cands)).item_outputs
    torch.testing.assert_close(out[[0, 1, 2, 3, 4, 6, 7, 8, 9]], base[[0, 1, 2, 3, 4, 6, 7, 8, 9]])
    assert not torch.allclose(out[5], base[5])
    # A history action changes the outputs of later tokens only.
    changed_actions = actions.clone()
    changed_actions[2] += torch.randn(8, dtype=torch.float64)  # not a constant shift: LayerNorm removes those
    out = enc(_inputs(items, changed_actions, lengths, cands)).item_outputs
    torch.testing.assert_close(out[[0, 1, 2, 6, 7, 8, 9]], base[[0, 1, 2, 6, 7, 8, 9]])
    assert not torch.allclose(out[3], base[3])


def test_candidates_share_one_position():
    enc = _ranking_encoder()
    lengths, cands = torch.tensor([5]), torch.tensor([3])
    items = torch.randn(5, 8, dtype=torch.float64)
    items[2:] = items[2]  # three identical candidates with identical timestamps
    actions = torch.randn(5, 8, dtype=torch.float64)
    inputs = _inputs(items, actions, lengths, cands)
    inputs.timestamps = torch.tensor([0, 100, 200, 200, 200])
    out = enc(inputs).item_outputs
    torch.testing.assert_close(out[2], out[3])
    torch.testing.assert_close(out[2], out[4])


def test_contextual_tokens_are_seen_and_stripped():
    torch.manual_seed(6)
    enc = _ranking_encoder()
    lengths, cands = torch.tensor([3, 2]), torch.tensor([1, 1])
    items = torch.randn(5, 8, dtype=torch.float64)
    actions = torch.randn(5, 8, dtype=torch.float64)
    ctx = torch.randn(4, 8, dtype=torch.float64)  # 2 samples x 2 features
    out = enc(_inputs(items, actions, lengths, cands, ctx, 2)).item_outputs
    assert out.shape == (5, 8)
    ctx2 = ctx.clone()
    ctx2[3] += torch.randn(8, dtype=torch.float64)  # sample 1's second feature
    out2 = enc(_inputs(items, actions, lengths, cands, ctx2, 2)).item_outputs
    torch.testing.assert_close(out2[:3], out[:3])
    assert not torch.allclose(out2[3:], out[3:])


def test_next_request_time_reference():
    times = torch.tensor([0, 10, 100, 5, 7])
    offsets = torch.tensor([0, 3, 5])
    buckets = RelativeAttentionBias.time_bucket_matrix(times, offsets, 3, 128, "next", torch.tensor([1000, 7]))
    query = [[10, 100, 1000], [7, 7, 0]]
    keys = [[0, 10, 100], [5, 7, 0]]
    for b in range(2):
        for i in range(3):
            for j in range(3):
                expected = log_time_buckets(torch.tensor([query[b][i] - keys[b][j]]), 128)[0]
                if (b == 1 and (i == 2 or j == 2)):
                    continue  # padding
                assert int(buckets[b, i, j]) == int(expected), (b, i, j)
