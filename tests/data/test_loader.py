"""Jagged batches: KJT content, padding, shuffling, sharding, workload balance, workers, resume."""

import numpy as np
import pytest
import torch

from hstu.data import JaggedBatch, SequenceDataset, balance_global_batch, make_dataloader


def as_plain(batch: JaggedBatch):
    out = {key: batch.sequence[key].values().tolist() for key in ("item", "action", "timestamp")}
    out["lengths"] = batch.seq_lengths.tolist()
    out["num_candidates"] = batch.num_candidates.tolist()
    out["is_padding"] = batch.is_padding.tolist()
    out["target"] = None if batch.target_item is None else batch.target_item.tolist()
    out["contextual"] = None if batch.contextual is None else batch.contextual.values().tolist()
    return out


def test_retrieval_eval_batch_content_and_padding(processed):
    ds = SequenceDataset(processed("ml-1m"), "test", max_seqlen=3)
    assert len(ds) == 3  # users 1, 2 and 5; user 3's single rating leaves no history
    loader = make_dataloader(ds, 2, shuffle=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    first, last = batches
    assert first.sequence.keys() == ["item", "action", "timestamp"]
    assert first.batch_size == 2 and first.max_seqlen == 3
    assert first.seq_lengths.tolist() == [3, 2]
    assert first.sequence["item"].values().tolist() == [1193, 914, 661, 1357, 1193]
    assert first.sequence["action"].values().tolist() == [4, 2, 2, 4, 3]
    assert first.sequence["timestamp"].values().tolist()[:1] == [978300760]
    assert first.target_item.tolist() == [2355, 3068]
    assert first.contextual.keys() == ["user_id", "gender", "age", "occupation", "zip_code"]
    assert first.contextual["user_id"].values().tolist() == [1, 2]
    assert first.contextual["zip_code"].values().tolist() == [1, 2]  # 48067, 70072: first two codes of users.dat
    assert first.contextual["gender"].lengths().tolist() == [1, 1]
    assert first.num_candidates.tolist() == [0, 0]
    # The last batch is padded to the full batch size with empty samples.
    assert last.batch_size == 2
    assert last.is_padding.tolist() == [False, True]
    assert last.seq_lengths.tolist() == [3, 0]
    assert last.sequence["item"].values().tolist() == [2333, 3952, 2987]
    assert last.target_item.tolist() == [1193, -1]
    assert last.contextual["user_id"].values().tolist() == [5, 0]
    assert last.contextual["zip_code"].values().tolist() == [5, 0]


def test_ranking_batch_candidates_and_labels(processed):
    ds = SequenceDataset(processed("kuairand-pure"), "test", task="ranking", max_seqlen=8, num_candidates=1)
    batch = next(iter(make_dataloader(ds, 8, shuffle=False)))
    real = ~batch.is_padding
    assert batch.num_candidates[real].tolist() == [1, 1, 1, 1]
    assert batch.max_seqlen == 9 and batch.target_item is None
    lengths = batch.seq_lengths
    ends = torch.cumsum(lengths, 0)[real] - 1
    labels = batch.sequence["action"].values()[ends]
    assert labels.tolist() == [1, 221, 255, 65]  # the last action of each user
    try:
        from hstu.ops import candidate_mask  # noqa: F401
    except ImportError:
        pytest.skip("hstu.ops.candidate_mask not available")
    assert batch.labels().tolist() == [1, 221, 255, 65]


def test_shuffle_is_deterministic_per_epoch(synthetic_dir):
    ds = SequenceDataset(synthetic_dir, "train", max_seqlen=30)
    a = make_dataloader(ds, 32, shuffle=True, seed=5)
    b = make_dataloader(ds, 32, shuffle=True, seed=5)
    assert list(a.rank_batches(0)) == list(b.rank_batches(0))
    assert list(a.rank_batches(0)) != list(a.rank_batches(1))
    assert list(a.rank_batches(0)) != list(make_dataloader(ds, 32, shuffle=True, seed=6).rank_batches(0))
    assert [as_plain(x) for x in a] == [as_plain(x) for x in b]


@pytest.mark.parametrize("balance", [False, True])
def test_ranks_get_disjoint_shards_and_equal_batch_counts(synthetic_dir, balance):
    ds = SequenceDataset(synthetic_dir, "train", max_seqlen=30)
    world = 3
    loaders = [make_dataloader(ds, 16, shuffle=True, seed=1, rank=r, world_size=world, balance_workload=balance)
               for r in range(world)]
    per_rank = [list(loader.rank_batches(2)) for loader in loaders]
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(batch) == 16 for batches in per_rank for batch in batches)
    ids = [i for batches in per_rank for batch in batches for i in batch if i >= 0]
    assert sorted(ids) == list(range(len(ds)))


def test_drop_last(synthetic_dir):
    ds = SequenceDataset(synthetic_dir, "train", max_seqlen=30)
    loader = make_dataloader(ds, 64, shuffle=True, drop_last=True, world_size=2)
    assert len(loader) == len(ds) // 128
    assert all(i >= 0 for batch in loader.rank_batches(0) for i in batch)


def test_balance_reduces_squared_length_spread(synthetic_dir):
    ds = SequenceDataset(synthetic_dir, "train", max_seqlen=400)
    cost = ds.sample_lengths().astype(np.float64) ** 2
    world, batch_size = 4, 8

    def spreads(balance):
        loaders = [make_dataloader(ds, batch_size, shuffle=True, seed=3, rank=r, world_size=world,
                                   balance_workload=balance) for r in range(world)]
        batches = [list(loader.rank_batches(0)) for loader in loaders]
        loads = np.array([[cost[[i for i in b if i >= 0]].sum() for b in rank] for rank in batches])
        return loads.max(axis=0) - loads.min(axis=0), loads.max(axis=0)

    plain_spread, plain_max = spreads(False)
    balanced_spread, balanced_max = spreads(True)
    assert balanced_spread.mean() < 0.5 * plain_spread.mean()
    assert balanced_max.sum() < plain_max.sum()


def test_balance_global_batch_is_lpt():
    ids = np.arange(6)
    costs = np.array([9.0, 1.0, 8.0, 2.0, 7.0, 3.0])
    assigned = balance_global_batch(ids, costs, world_size=2, batch_size=3)
    loads = sorted(costs[row].sum() for row in assigned)
    # LPT with capacity: 9→0, 8→1, 7→1, 3→0, 2→0 (rank 0 full), 1→1; round robin would give 24 vs 6.
    assert loads == [14.0, 16.0]
    np.testing.assert_array_equal(assigned, balance_global_batch(ids, costs, 2, 3))


def test_resume_mid_epoch_continues_exactly(synthetic_dir):
    ds = SequenceDataset(synthetic_dir, "train", max_seqlen=30)
    reference = make_dataloader(ds, 24, shuffle=True, seed=9, world_size=2, rank=1)
    reference.set_epoch(3)
    expected = [as_plain(b) for b in reference]
    assert reference.state_dict()["epoch"] == 4  # a full pass advances the cursor

    first = make_dataloader(ds, 24, shuffle=True, seed=9, world_size=2, rank=1)
    first.set_epoch(3)
    consumed = []
    for batch in first:
        consumed.append(as_plain(batch))
        if len(consumed) == 3:
            break
    state = first.state_dict()
    assert state["epoch"] == 3 and state["batches_consumed"] == 3

    resumed = make_dataloader(ds, 24, shuffle=True, seed=9, world_size=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the training loop re-announcing the same epoch must not restart it
    rest = [as_plain(b) for b in resumed]
    assert consumed + rest == expected
    with pytest.raises(ValueError):
        make_dataloader(ds, 12, shuffle=True, seed=9, world_size=2).load_state_dict(state)


def test_worker_processes_give_identical_batches(synthetic_dir):
    ds = SequenceDataset(synthetic_dir, "valid", task="ranking", max_seqlen=40, num_candidates=3)
    serial = [as_plain(b) for b in make_dataloader(ds, 50, shuffle=True, seed=2)]
    parallel_loader = make_dataloader(ds, 50, shuffle=True, seed=2, num_workers=2)
    parallel = [as_plain(b) for b in parallel_loader]
    assert parallel == serial
    assert parallel_loader.state_dict()["epoch"] == 1
    # The workers persist across passes and follow each pass's plan: the next epoch, a pass abandoned after
    # two batches, and the epoch after it all match the serial loader.
    workers = parallel_loader._workers
    serial_loader = make_dataloader(ds, 50, shuffle=True, seed=2)
    serial_loader.set_epoch(1)
    assert [as_plain(b) for b in parallel_loader] == [as_plain(b) for b in serial_loader]
    parallel_loader.set_epoch(2)
    serial_loader.set_epoch(2)
    first_two = [as_plain(b) for _, b in zip(range(2), parallel_loader)]
    assert first_two == [as_plain(b) for b in serial_loader][:2]
    parallel_loader.set_epoch(3)
    assert [as_plain(b) for b in parallel_loader] == [as_plain(b) for b in serial_loader]  # serial is at epoch 3
    assert parallel_loader._workers is workers


def test_dataset_pickles_without_memory_maps(synthetic_dir):
    import pickle

    ds = SequenceDataset(synthetic_dir, "train", max_seqlen=30)
    _ = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._data is None
    assert clone[3]["item"].tolist() == ds[3]["item"].tolist()
    assert len(pickle.dumps(ds)) < 200_000


def test_model_facing_metadata(synthetic_bitmask_dir):
    ds = SequenceDataset(synthetic_bitmask_dir, "train", task="ranking", max_seqlen=20, num_candidates=5)
    assert ds.action_spec["kind"] == "bitmask" and ds.action_vocab_size == 256
    assert ds.contextual_vocab_sizes == {"user_id": 201, "activity_level": 5}
    batch = next(iter(make_dataloader(ds, 16, shuffle=False)))
    assert int(batch.sequence["item"].values().max()) < ds.num_items
    assert int(batch.sequence["action"].values().max()) < 256
