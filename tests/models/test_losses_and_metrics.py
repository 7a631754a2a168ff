"""Loss sanity and metrics on hand-computed cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hstu.metrics import RankingMetrics, RetrievalMetrics, grouped_auc, seen_item_mask, target_ranks
from hstu.models import MultiTaskLoss, SampledSoftmaxLoss, bitmask_to_labels


def _table(num_items=20, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_items, dim, generator=g, dtype=torch.float64)


def test_sampled_softmax_matches_manual_and_masks_accidental_hits():
    table = _table()
    queries = torch.randn(3, 4, dtype=torch.float64)
    positive_ids = torch.tensor([2, 5, 7])
    negatives = torch.tensor([5, 9, 11])  # shared; 5 is query 1's positive: an accidental hit
    loss_fn = SampledSoftmaxLoss(1, 20, num_uniform_negatives=3, temperature=0.5, share_uniform_negatives=True)
    out = loss_fn(queries, positive_ids, table[positive_ids], lambda ids: table[ids], uniform_negative_ids=negatives)
    q = F.normalize(queries, dim=-1)
    e = F.normalize(table, dim=-1)
    expected = []
    for p in range(3):
        candidates = [int(positive_ids[p])] + [int(n) for n in negatives if int(n) != int(positive_ids[p])]
        logits = torch.stack([q[p] @ e[c] for c in candidates]) / 0.5
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert out.accidental_hits == 1
    assert float(out.loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-9)


def test_per_query_negatives_and_both_code_paths_agree():
    table = _table(num_items=50)
    queries = torch.randn(4, 4, dtype=torch.float64)
    positive_ids = torch.tensor([3, 4, 5, 6])
    negatives = torch.randint(1, 50, (4, 6))
    negatives[0, 0] = 3  # accidental hit
    small = SampledSoftmaxLoss(1, 50, num_uniform_negatives=6)  # catalogue 49 <= 6*4: full-catalogue GEMM path
    large = SampledSoftmaxLoss(1, 50, num_uniform_negatives=6)
    large.item_id_high = 10**6  # forces the unique + gather path (ids stay in range)
    a = small(queries, positive_ids, table[positive_ids], lambda ids: table[ids], negatives)
    b = large(queries, positive_ids, table[positive_ids], lambda ids: table[ids], negatives)
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-9)
    assert a.accidental_hits == b.accidental_hits >= 1


def test_in_batch_negatives_exclude_own_positive():
    table = _table()
    queries = table[[1, 2, 2]] * 3  # query p points at its positive
    positive_ids = torch.tensor([1, 2, 2])
    loss_fn = SampledSoftmaxLoss(1, 20, num_uniform_negatives=0, num_in_batch_negatives=10, temperature=0.05)
    out = loss_fn(queries, positive_ids, table[positive_ids], lambda ids: table[ids])
    # Two distinct positives: each query's only real negative is the other item; its own item is masked.
    assert out.num_negatives == 2 and out.accidental_hits == 3
    q = F.normalize(queries, dim=-1)
    e = F.normalize(table, dim=-1)
    expected = []
    for p, other in ((0, 2), (1, 1), (2, 1)):
        logits = torch.stack([q[p] @ e[positive_ids[p]], q[p] @ e[other]]) / 0.05
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert float(out.loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-9)


def test_multitask_losses():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    actions = torch.tensor([0b01, 0b10])
    labels = bitmask_to_labels(actions, 2)
    assert labels.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    loss, details = MultiTaskLoss("bitmask", 2, [1.0, 3.0])(logits, actions)
    per_task = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
    assert float(loss) == pytest.approx(float(per_task[0] + 3 * per_task[1]))
    ce, _ = MultiTaskLoss("rating", 2)(logits, torch.tensor([0, 1]))
    assert float(ce) == pytest.approx(float(F.cross_entropy(logits, torch.tensor([0, 1]))))


def test_retrieval_metrics_hand_computed():
    # Ranks 1, 3, 10, 11: HR@10 = 3/4 (rank <= K counts, rank 10 included), NDCG@10, MRR.
    metrics = RetrievalMetrics(top_k=(1, 10))
    metrics.update(torch.tensor([1, 3]))
    metrics.update(torch.tensor([10, 11]))
    out = metrics.compute()
    assert out["HR@10"] == pytest.approx(0.75)
    assert out["HR@1"] == pytest.approx(0.25)
    assert out["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 4)
    assert out["NDCG@1"] == pytest.approx(0.25)
    assert out["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 11) / 4)


def test_target_ranks_and_seen_filter():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    targets = torch.tensor([2, 0])
    assert target_ranks(scores, targets).tolist() == [3, 4]
    # Item ids 1..4 map to columns 0..3; sample 0 has seen item ids 1 and 3 (columns 0, 2); sample 1 saw id 4.
    seen = seen_item_mask(torch.tensor([1, 3, 4, 0]), torch.tensor([2, 2]), item_id_low=1, num_catalogue=4)
    assert seen.tolist() == [[True, False, True, False], [False, False, False, True]]
    # Sample 0's target (column 2) was seen: a miss (rank = catalogue + 1). Sample 1: column 3 no longer beats it.
    assert target_ranks(scores, targets, seen).tolist() == [5, 3]


def test_auc_and_gauc_hand_computed():
    scores = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.8, 0.3, 0.5])
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1])
    users = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    auc, valid = grouped_auc(scores, labels, users)
    # User 0: positives {0.9, 0.4}, negatives {0.2, 0.6}: pairs won 2 + 1 of 4 -> 0.75. User 1: 1.0. User 2: none.
    assert valid.tolist() == [True, True, False]
    assert auc[:2].tolist() == pytest.approx([0.75, 1.0])
    metrics = RankingMetrics(["click"])
    metrics.update(scores.unsqueeze(1), labels.unsqueeze(1), users)
    out = metrics.compute()
    assert out["GAUC/click"] == pytest.approx((0.75 * 4 + 1.0 * 2) / 6)
    # Global AUC: 4 positives x 3 negatives; count won pairs by hand.
    pos, neg = scores[labels == 1], scores[labels == 0]
    won = sum(float(p > n) for p in pos for n in neg)
    assert out["AUC/click"] == pytest.approx(won / 12)


def test_grouped_auc_ties_count_half():
    auc, valid = grouped_auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1, 0, 0]), torch.tensor([0, 0, 0]))
    assert valid.tolist() == [True] and auc.tolist() == pytest.approx([0.5])


def test_grouped_auc_matches_sklearn_style_bruteforce():
    rng = np.random.default_rng(0)
    n = 300
    scores = torch.from_numpy(rng.integers(0, 20, n).astype(np.float64))  # many ties
    labels = torch.from_numpy(rng.integers(0, 2, n))
    users = torch.from_numpy(rng.integers(0, 7, n))
    auc, valid = grouped_auc(scores, labels, users)
    for u in range(7):
        s, y = scores[users == u], labels[users == u]
        pos, neg = s[y == 1], s[y == 0]
        expected = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
        assert float(auc[u]) == pytest.approx(float(expected))


# ---- undefined metrics are missing, not numbers ------------------------------------------------------------------
def test_auc_of_a_task_without_positives_or_negatives_is_missing_with_a_warning():
    import warnings

    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.6], [0.7, 0.4, 0.5], [0.3, 0.6, 0.2]])
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])  # task 1: no positive; task 2: no negative
    users = torch.tensor([0, 0, 1, 1])
    metrics = RankingMetrics(["click", "like", "long_view"])
    metrics.update(scores, labels, users)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = metrics.compute()
    assert out["AUC/click"] == pytest.approx(1.0) and out["GAUC/click"] == pytest.approx(1.0)
    for task in ("like", "long_view"):
        assert f"AUC/{task}" not in out and f"GAUC/{task}" not in out
    messages = [str(w.message) for w in caught if w.category.__name__ == "UndefinedMetricWarning"]
    assert any("'like'" in m and "no positive label" in m for m in messages), messages
    assert any("'long_view'" in m and "no negative label" in m for m in messages), messages


def test_gauc_without_a_user_holding_both_classes_is_missing_with_a_warning():
    from hstu.metrics import UndefinedMetricWarning

    metrics = RankingMetrics(["click"])
    # Each user has one class only: the global AUC exists, no per-user AUC does.
    metrics.update(torch.tensor([[0.9], [0.8], [0.1]]), torch.tensor([[1], [1], [0]]), torch.tensor([0, 0, 1]))
    with pytest.warns(UndefinedMetricWarning, match=r"GAUC/click undefined: no evaluated user has both"):
        out = metrics.compute()
    assert out["AUC/click"] == pytest.approx(1.0) and "GAUC/click" not in out


def test_undefined_metric_warning_is_shown_once_per_task():
    import warnings

    from hstu.metrics import UndefinedMetricWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: each distinct message once
        for size in (3, 5):  # different counts: the message must not change with them
            metrics = RankingMetrics(["click", "like"])
            metrics.update(torch.rand(size, 2), torch.zeros(size, 2), torch.arange(size))
            assert metrics.compute() == {}
    caught = [w for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert len(caught) == 2 and {"'click'" in str(w.message) for w in caught} == {True, False}


def test_retrieval_metrics_without_queries_are_missing_with_a_warning():
    from hstu.metrics import UndefinedMetricWarning

    metrics = RetrievalMetrics(top_k=(10,))
    metrics.update(torch.zeros(0, dtype=torch.int64))
    with pytest.warns(UndefinedMetricWarning, match="no query was evaluated"):
        assert metrics.compute() == {}


# ---- masks select, they do not multiply --------------------------------------------------------------------------
def test_zero_weight_task_with_nan_logits_reaches_neither_loss_nor_gradient():
    logits = torch.tensor([[2.0, float("nan")], [0.5, float("inf")]], requires_grad=True)
    actions = torch.tensor([0b01, 0b10])
    loss, details = MultiTaskLoss("bitmask", 2, [2.0, 0.0])(logits, actions)
    expected = 2.0 * F.binary_cross_entropy_with_logits(logits[:, 0].detach(), torch.tensor([1.0, 0.0]))
    assert float(loss.detach()) == pytest.approx(float(expected))
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 1].eq(0).all()
    assert details["per_task"].shape == (2,)


def test_empty_sequence_user_embedding_is_zero_whatever_the_other_rows_hold():
    from types import SimpleNamespace

    from hstu.models import RetrievalModel
    from hstu.modules import EncoderConfig, TokenLayout

    config = EncoderConfig(embedding_dim=4, num_layers=1, qk_dim=4, v_dim=4, max_tokens=4)
    model = RetrievalModel(10, config, SampledSoftmaxLoss(1, 10, num_uniform_negatives=2)).eval()
    lengths = torch.tensor([0, 2, 1])
    outputs = torch.tensor([[float("inf")] * 4, [1.0, 0.0, 0.0, 0.0], [float("nan")] * 4])
    # Sequence 0 is empty: its "last row" index lands on sequence 1's first row, which holds inf.
    layout = TokenLayout.build(lengths, lengths, torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                               has_candidates=False, num_contextual=0, interleave_actions=False)
    model.encode = lambda batch, next_timestamps=None: (None, SimpleNamespace(item_outputs=outputs, layout=layout))
    batch = SimpleNamespace(seq_lengths=lengths, seq_lengths_on_host=lambda: lengths)
    users = model.user_embeddings(batch)
    assert users[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert users[1].tolist() == [1.0, 0.0, 0.0, 0.0]
