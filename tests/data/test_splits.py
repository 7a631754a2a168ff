"""Split strategies and truncation, on hand-made offsets and on the ml-1m fixture."""

import numpy as np
import pytest

from hstu.data import SequenceDataset
from hstu.data.splits import split_windows

# Three users with 5, 2 and 7 interactions.
OFFSETS = np.array([0, 5, 7, 14])
TIMES = np.concatenate([np.arange(10, 15), np.arange(100, 102), np.arange(1, 8) * 3])


def windows(split, **kw):
    w = split_windows(OFFSETS, TIMES, split, **kw)
    return list(zip(w.user.tolist(), w.lo.tolist(), w.hi.tolist(), w.held_out.tolist()))


def test_leave_one_out_retrieval():
    # train: all but the last two (needs >= 2 items); valid ends at the second to last; test at the last.
    assert windows("train") == [(0, 0, 3, 3), (2, 7, 12, 5)]
    assert windows("valid") == [(0, 0, 4, 1), (2, 7, 13, 1)]
    assert windows("test") == [(0, 0, 5, 1), (1, 5, 7, 1), (2, 7, 14, 1)]


def test_leave_one_out_ranking_holds_out_num_candidates():
    assert windows("train", task="ranking", num_candidates=2) == [(0, 0, 1, 1), (2, 7, 10, 3)]
    assert windows("valid", task="ranking", num_candidates=2) == [(0, 0, 3, 2), (2, 7, 12, 2)]
    assert windows("test", task="ranking", num_candidates=2) == [(0, 0, 5, 2), (1, 5, 7, 2), (2, 7, 14, 2)]


def test_user_ratio_first_users_train_rest_evaluate():
    assert windows("train", strategy="user_ratio", train_ratio=0.67) == [(0, 0, 5, 5), (1, 5, 7, 2)]
    assert windows("test", strategy="user_ratio", train_ratio=0.67) == [(2, 7, 14, 1)]
    assert windows("valid", strategy="user_ratio", train_ratio=0.67) == windows("test", strategy="user_ratio", train_ratio=0.67)


def test_time_split_uses_global_cuts():
    # Sorted timestamps: 3 6 9 10 11 12 12 13 14 15 18 21 100 101; quantiles 0.5/0.75 (method "lower") → 12, 15.
    q = (0.5, 0.75)
    assert windows("train", strategy="time", time_quantiles=q) == [(0, 0, 2, 2), (2, 7, 10, 3)]
    # Retrieval valid: the first interaction in [12, 15) is the target, with all earlier ones as history.
    assert windows("valid", strategy="time", time_quantiles=q) == [(0, 0, 3, 1), (2, 7, 11, 1)]
    # Test: user 0 has nothing >= 15; user 1's first event >= 15 has no history; user 2's is 15 (row 11).
    assert windows("test", strategy="time", time_quantiles=q) == [(2, 7, 12, 1)]
    ranking_test = windows("test", strategy="time", time_quantiles=q, task="ranking", num_candidates=5)
    # Ranking candidates are all events >= 15 (up to 5): user 1 has 100, 101; user 2 has 15, 18, 21.
    assert ranking_test == [(1, 5, 7, 2), (2, 7, 14, 3)]


def test_retrieval_samples_and_truncation(processed):
    path = processed("ml-1m")
    test = SequenceDataset(path, "test", max_seqlen=3)
    first = test[0]  # user 1: 3408 1193 914 661 | 2355
    assert first["item"].tolist() == [1193, 914, 661] and first["target_item"] == 2355
    oldest = SequenceDataset(path, "test", max_seqlen=3, truncate="oldest")[0]
    assert oldest["item"].tolist() == [3408, 1193, 914] and oldest["target_item"] == 2355
    train = SequenceDataset(path, "train", max_seqlen=2)
    assert [train[i]["item"].tolist() for i in range(len(train))] == [[1193, 914], [2333, 3952]]
    valid = SequenceDataset(path, "valid", max_seqlen=10)
    assert [(valid[i]["item"].tolist(), valid[i]["target_item"]) for i in range(len(valid))] == [
        ([3408, 1193, 914], 661), ([1357], 1193), ([2333, 3952], 2987)]


def test_ranking_samples_end_with_candidates(processed):
    path = processed("ml-1m")
    ds = SequenceDataset(path, "test", task="ranking", max_seqlen=2, num_candidates=2)
    sample = ds[0]  # user 1: history 3408 1193 914 → keep last 2; candidates 661 2355
    assert sample["item"].tolist() == [1193, 914, 661, 2355]
    assert sample["num_candidates"] == 2 and sample["action"][-2:].tolist() == [2, 4]
    assert ds.max_sequence_length == 4
    assert all(len(ds[i]["item"]) <= ds.max_sequence_length for i in range(len(ds)))
    oldest = SequenceDataset(path, "test", task="ranking", max_seqlen=2, num_candidates=2, truncate="oldest")[0]
    assert oldest["item"].tolist() == [3408, 1193, 661, 2355]


@pytest.mark.parametrize("strategy", ["leave_one_out", "user_ratio", "time"])
def test_splits_on_synthetic_are_consistent(synthetic_dir, strategy):
    for task, k in (("retrieval", 0), ("ranking", 4)):
        for split in ("train", "valid", "test"):
            ds = SequenceDataset(synthetic_dir, split, task=task, max_seqlen=50, num_candidates=k, split_strategy=strategy)
            assert len(ds) > 0
            lengths = ds.sample_lengths()
            assert lengths.max() <= ds.max_sequence_length and lengths.min() >= 1
