"""Train / validation / test windows over the processed per-user sequences.

A split produces, per sample, a window ``[lo, hi)`` of absolute row positions in the columns and ``held_out``, the
number of rows at the end of the window that belong to this split (the rest is context):

* retrieval, train: the whole window is supervision (``held_out`` = window length);
* retrieval, valid/test: the window ends at the one held-out target (``held_out`` = 1);
* ranking: the last ``min(num_candidates, held_out)`` rows of the window are the candidates.

Strategies (``h`` = 1 for retrieval, ``max(1, num_candidates)`` for ranking):

* ``leave_one_out``: test = the last ``h`` interactions, valid = the ``h`` before them, train = the rest.
* ``user_ratio``: the first ``train_ratio`` of the users (in processed order) train on their full sequence; the others
  are evaluated on their last interaction(s). As in the seed there is one evaluation set: valid == test.
* ``time``: global cuts at the ``time_quantiles`` (valid, test) of all timestamps; train = interactions before the
  first cut, valid = the first interaction(s) in [cut1, cut2) (retrieval: the first one; ranking: the last ``h``),
  test = likewise after cut2, each with all earlier interactions as history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "valid", "test")
STRATEGIES = ("leave_one_out", "user_ratio", "time")
TASKS = ("retrieval", "ranking")


@dataclass
class SplitWindows:
    user: np.ndarray  # (S,) user row in the processed data
    lo: np.ndarray  # (S,) absolute start of the window
    hi: np.ndarray  # (S,) absolute end (exclusive)
    held_out: np.ndarray  # (S,) rows at the window's end belonging to this split

    def select(self, keep: np.ndarray) -> "SplitWindows":
        return SplitWindows(self.user[keep], self.lo[keep], self.hi[keep], self.held_out[keep])


def _time_cut_counts(offsets: np.ndarray, timestamp: np.ndarray, cut: int, chunk: int = 1 << 24) -> np.ndarray:
    """Per user, how many of its (time-ordered) interactions are strictly before ``cut`` (streams the column)."""
    # Running count of "before cut" rows, read off at every user boundary.
    cumulative = np.zeros(len(offsets), dtype=np.int64)
    running = 0
    for begin in range(0, len(timestamp), chunk):
        csum = np.cumsum(np.asarray(timestamp[begin : begin + chunk]) < cut) + running
        inside = (offsets > begin) & (offsets <= begin + len(csum))
        cumulative[inside] = csum[offsets[inside] - begin - 1]
        running = int(csum[-1])
    return np.diff(cumulative)


def time_cuts(timestamp: np.ndarray, quantiles: tuple[float, float], max_samples: int = 10_000_000) -> tuple[int, int]:
    step = max(1, len(timestamp) // max_samples)
    sample = np.asarray(timestamp[::step])
    q1, q2 = quantiles
    if not 0 < q1 <= q2 < 1:
        raise ValueError("time_quantiles must satisfy 0 < valid <= test < 1")
    cut1, cut2 = np.quantile(sample, [q1, q2], method="lower")
    return int(cut1), int(cut2)


def split_windows(
    offsets: np.ndarray,
    timestamp: np.ndarray,
    split: str,
    *,
    task: str = "retrieval",
    strategy: str = "leave_one_out",
    num_candidates: int = 0,
    train_ratio: float = 0.7,
    time_quantiles: tuple[float, float] = (0.8, 0.9),
) -> SplitWindows:
    """Windows of one split, already filtered to usable samples (see the module docstring)."""
    if split not in SPLITS or strategy not in STRATEGIES or task not in TASKS:
        raise ValueError(f"split in {SPLITS}, strategy in {STRATEGIES}, task in {TASKS}; got {split}, {strategy}, {task}")
    offsets = np.asarray(offsets, dtype=np.int64)
    num_users = len(offsets) - 1
    users = np.arange(num_users)
    start, end = offsets[:-1], offsets[1:]
    h = max(1, num_candidates) if task == "ranking" else 1

    if strategy == "leave_one_out":
        if split == "train":
            hi = end - 2 * h
            windows = SplitWindows(users, start, hi, hi - start)
        else:
            hi = end - (h if split == "valid" else 0)
            windows = SplitWindows(users, start, hi, np.full(num_users, h))
    elif strategy == "user_ratio":
        num_train = int(round(train_ratio * num_users))
        chosen = users[:num_train] if split == "train" else users[num_train:]
        length = end[chosen] - start[chosen]
        windows = SplitWindows(chosen, start[chosen], end[chosen], length if split == "train" else np.full(len(chosen), h))
    else:
        cut1, cut2 = time_cuts(timestamp, time_quantiles)
        before1 = _time_cut_counts(offsets, timestamp, cut1)
        if split == "train":
            windows = SplitWindows(users, start, start + before1, before1)
        else:
            first = before1 if split == "valid" else _time_cut_counts(offsets, timestamp, cut2)
            last = _time_cut_counts(offsets, timestamp, cut2) if split == "valid" else end - start
            available = last - first
            if task == "retrieval":
                # The first interaction after the cut is the target; everything before it is history.
                windows = SplitWindows(users, start, start + first + 1, np.ones(num_users, dtype=np.int64))
                windows = windows.select(available >= 1)
                return windows.select((windows.hi - windows.lo) >= 2)
            windows = SplitWindows(users, start, start + last, np.minimum(available, h))

    length = windows.hi - windows.lo
    windows.held_out = np.minimum(windows.held_out, np.maximum(length, 0))
    if task == "retrieval":
        # Training needs one next-item pair; evaluation needs a target and at least one history item.
        keep = length >= 2
    else:
        keep = (windows.held_out >= 1) & (length >= 1)
    return windows.select(keep)
