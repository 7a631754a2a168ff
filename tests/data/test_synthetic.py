"""The synthetic dataset: determinism, shape, learnability signal, label correlation."""

import time

import numpy as np
import pytest

from hstu.data import ProcessedData, compute_stats, generate
from hstu.data.synthetic import SyntheticConfig


def test_same_seed_same_data_other_seed_differs():
    a = generate(num_users=300, seed=11)
    b = generate(num_users=300, seed=11)
    c = generate(num_users=300, seed=12)
    for name in ("offsets", "item", "timestamp", "action"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.item[:1000], c.item[:1000])


def test_default_is_ml1m_sized_and_fast():
    started = time.perf_counter()
    data = generate()
    elapsed = time.perf_counter() - started
    lengths = np.diff(data.offsets)
    assert data.num_users == 6040 and 0.8e6 < len(data.item) < 1.2e6
    assert data.item.min() >= 1 and data.item.max() <= 3700
    assert lengths.min() >= 20 and lengths.max() <= 2000
    assert elapsed < 10
    # Timestamps strictly increase inside each sequence (so sorting is a no-op) and have session structure.
    gaps = np.diff(data.timestamp)
    inside = np.ones(len(gaps), dtype=bool)
    inside[data.offsets[1:-1] - 1] = False
    assert (gaps[inside] >= 1).all()
    assert np.median(gaps[inside]) < 600 and np.quantile(gaps[inside], 0.95) > 3600
    # Zipf-like popularity: the top 10% of items get far more than 10% of the events.
    counts = np.sort(np.bincount(data.item)[1:])[::-1]
    assert counts[: len(counts) // 10].sum() > 0.3 * counts.sum()


@pytest.mark.parametrize("distribution", ["lognormal", "pareto", "uniform", "fixed"])
def test_long_sequences_up_to_32k(distribution):
    data = generate(num_users=40, num_items=2000, mean_length=4000, min_length=100, max_length=32768,
                    length_distribution=distribution, seed=1)
    lengths = np.diff(data.offsets)
    assert lengths.min() >= 100 and lengths.max() <= 32768
    if distribution == "fixed":
        assert (lengths == 4000).all()


def test_next_item_is_predictable_from_previous_but_not_from_popularity():
    data = generate(num_users=1500, seed=4)
    offsets, items = data.offsets, data.item
    last = offsets[1:] - 1
    is_train = np.ones(len(items), dtype=bool)
    is_train[last] = False
    # Bigram statistics and popularity, from everything but each user's last item (leave-one-out).
    pairs_end = np.flatnonzero(is_train)[1:]
    pairs_end = pairs_end[~np.isin(pairs_end, offsets[:-1])]
    pairs_end = pairs_end[is_train[pairs_end]]
    num_items = int(items.max()) + 1
    bigram = np.zeros((num_items, num_items), dtype=np.int32)
    np.add.at(bigram, (items[pairs_end - 1], items[pairs_end]), 1)
    popularity = np.bincount(items[is_train], minlength=num_items)
    top_popular = np.argsort(-popularity, kind="stable")[:10]
    previous, target = items[last - 1], items[last]
    top_next = np.argsort(-bigram[previous], axis=1, kind="stable")[:, :10]
    hr_bigram = (top_next == target[:, None]).any(axis=1).mean()
    hr_popular = np.isin(target, top_popular).mean()
    assert hr_bigram > 0.45, hr_bigram
    assert hr_bigram > 4 * hr_popular, (hr_bigram, hr_popular)
    # The ground truth: about transition_prob of the events follow a successor edge.
    assert abs(data.from_transition.mean() - 0.5) < 0.02


def test_ratings_follow_preference():
    data = generate(num_users=800, seed=2)
    ratings = data.action + 1
    assert set(np.unique(ratings)) <= {1, 2, 3, 4, 5}
    assert ratings[data.from_transition].mean() > ratings[~data.from_transition].mean()
    assert len(np.unique(ratings)) == 5


def test_bitmask_variant_and_written_format(synthetic_bitmask_dir):
    data = ProcessedData.open(synthetic_bitmask_dir)
    assert data.metadata["action"]["kind"] == "bitmask"
    actions = np.asarray(data.action)
    assert actions.min() >= 0 and actions.max() < 256
    click = (actions & 1) > 0
    like = (actions & 2) > 0
    assert 0.2 < click.mean() < 0.95 and not (like & ~click).any()
    stats = compute_stats(synthetic_bitmask_dir)
    assert stats["users"] == 200 and stats["seqlen"]["min"] >= 5
    assert data.metadata["synthetic"]["seed"] == 3


def test_config_validation():
    with pytest.raises(ValueError):
        generate(length_distribution="gaussian")
    with pytest.raises(ValueError):
        generate(num_items=10, num_topics=24)
    assert SyntheticConfig().num_users == 6040
