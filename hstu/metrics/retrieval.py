"""Full-catalogue retrieval metrics: HR@K, NDCG@K, MRR from the rank of the held-out item.

rank = 1 + number of catalogue items scoring strictly higher than the target (rank 1 = best).
HR@K counts rank <= K; NDCG@K = 1/log2(rank + 1) when rank <= K (one relevant item); MRR = mean 1/rank.
Data parallel: every rank accumulates sums and counts; :meth:`RetrievalMetrics.compute` all-reduces the sums, then
divides, so the result equals the single-process metric over the union of the ranks' samples.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from hstu.metrics.undefined import warn_undefined


def seen_item_mask(
    history_items: torch.Tensor, seq_lengths: torch.Tensor, item_id_low: int, num_catalogue: int
) -> torch.Tensor:
    """(B, num_catalogue) bool: item already in the sample's history (ids outside the catalogue are ignored)."""
    batch = seq_lengths.numel()
    seq_ids = torch.repeat_interleave(torch.arange(batch, device=history_items.device), seq_lengths.to(torch.int64),
                                      output_size=history_items.numel())
    columns = history_items - item_id_low
    inside = (columns >= 0) & (columns < num_catalogue)
    mask = torch.zeros(batch, num_catalogue, dtype=torch.bool, device=history_items.device)
    mask[seq_ids[inside], columns[inside]] = True
    return mask


def target_ranks(scores: torch.Tensor, target_columns: torch.Tensor, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1-based rank of each row's target among its scores; ``exclude`` (B, I) bool items are never ranked.

    An excluded target (e.g. a repeat of a seen item under seen-item filtering) gets rank I + 1: a miss.
    """
    target_scores = scores.gather(1, target_columns.unsqueeze(1))
    higher = scores > target_scores
    if exclude is not None:
        higher = higher & ~exclude
        target_excluded = exclude.gather(1, target_columns.unsqueeze(1)).squeeze(1)
    ranks = 1 + higher.sum(dim=1)
    if exclude is not None:
        ranks = torch.where(target_excluded, torch.full_like(ranks, scores.shape[1] + 1), ranks)
    return ranks


class RetrievalMetrics:
    def __init__(self, top_k: Sequence[int] = (10,), device: Optional[torch.device] = None):
        self.top_k = sorted(set(int(k) for k in top_k))
        if not self.top_k or self.top_k[0] < 1:
            raise ValueError("top_k must hold positive integers")
        self.device = device
        self.reset()

    def reset(self) -> None:
        # sums: [count, reciprocal rank, hits@k..., ndcg@k...]; float64 so large evals stay exact enough.
        self._sums = torch.zeros(2 + 2 * len(self.top_k), dtype=torch.float64, device=self.device)

    def update(self, ranks: torch.Tensor) -> None:
        ranks = ranks.to(self._sums.device, torch.float64)
        parts = [torch.tensor(float(ranks.numel()), dtype=torch.float64, device=ranks.device), (1.0 / ranks).sum()]
        hits = [(ranks <= k).sum().to(torch.float64) for k in self.top_k]
        ndcg = [torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks)).sum() for k in self.top_k]
        self._sums += torch.stack(parts + hits + ndcg)

    def compute(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        sums = self._sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        count = float(sums[0])
        if count == 0:
            warn_undefined("MRR, HR@K and NDCG@K", "no query was evaluated (no sample with a target in the catalogue)")
            return {}
        out = {"MRR": float(sums[1]) / count}
        n = len(self.top_k)
        for i, k in enumerate(self.top_k):
            out[f"HR@{k}"] = float(sums[2 + i]) / count
            out[f"NDCG@{k}"] = float(sums[2 + n + i]) / count
        out["num_samples"] = count
        return out


def ndcg_of_rank(rank: int, k: int) -> float:
    """Reference value for tests and docs."""
    return 1.0 / math.log2(rank + 1) if rank <= k else 0.0
