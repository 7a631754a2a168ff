"""Workload balance: the data pipeline's Σ L² dealing vs round robin, measured with hstu.distributed.balance."""

import numpy as np

from hstu.data.loader import balance_global_batch
from hstu.distributed import rank_workloads, workload_imbalance


def test_balanced_dealing_flattens_sum_of_squared_lengths():
    rng = np.random.default_rng(0)
    world, batch = 4, 16
    lengths = np.clip(rng.lognormal(np.log(600), 1.0, 200 * world * batch), 8, 4096).astype(np.int64)
    round_robin, balanced = [], []
    for b in range(200):
        ids = np.arange(b * world * batch, (b + 1) * world * batch)
        round_robin.append(ids.reshape(batch, world).T)  # the loader's default dealing
        balanced.append(balance_global_batch(ids, lengths[ids].astype(np.float64) ** 2, world, batch))
    before, after = workload_imbalance(round_robin, lengths), workload_imbalance(balanced, lengths)
    assert before["max_over_mean"] > 1.3  # long-tailed lengths: the slowest rank does far more than average
    assert after["max_over_mean"] < 1.1
    assert all(p.shape == (world, batch) for p in balanced)
    np.testing.assert_allclose(rank_workloads(balanced[0], lengths).sum(), (lengths[: world * batch] ** 2).sum())
