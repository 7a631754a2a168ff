"""Ranking metrics: AUC per task (torchmetrics) and GAUC (per-user AUC averaged, weighted by candidates).

Data parallel: torchmetrics gathers its states across ranks in ``compute``; GAUC all-reduces its two sums (every
user lives on exactly one rank, so per-user AUCs are local).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC


def grouped_auc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group AUC with tie-averaged ranks, vectorised.

    Returns (auc, valid): auc (G,) float64 for group ids 0..G-1 (G = groups.max() + 1), valid (G,) bool for groups
    with at least one positive and one negative (the others have no AUC).
    """
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    scores = scores.to(torch.float64)
    labels = labels.to(torch.bool)
    groups = groups.to(torch.int64)
    # Sort by (group, score): stable sort by score, then stable sort by group.
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    g, s, y = groups[order], scores[order], labels[order]
    n = g.numel()
    position = torch.arange(n, dtype=torch.float64, device=scores.device)
    group_start = torch.zeros(num_groups, dtype=torch.float64, device=scores.device)
    counts = torch.bincount(g, minlength=num_groups)
    group_start[1:] = torch.cumsum(counts, 0)[:-1].to(torch.float64)
    # Runs of equal (group, score) share their average rank.
    new_run = torch.ones(n, dtype=torch.bool, device=scores.device)
    if n > 1:
        new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_id = torch.cumsum(new_run.to(torch.int64), 0) - 1
    run_count = torch.bincount(run_id).to(torch.float64)
    run_sum = torch.zeros_like(run_count).index_add_(0, run_id, position)
    rank_in_group = (run_sum / run_count)[run_id] - group_start[g] + 1.0
    positives = torch.bincount(g, weights=y.to(torch.float64), minlength=num_groups)
    negatives = counts.to(torch.float64) - positives
    positive_rank_sum = torch.bincount(g, weights=rank_in_group * y, minlength=num_groups)
    valid = (positives > 0) & (negatives > 0)
    auc = (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives).clamp(min=1)
    return auc, valid


class RankingMetrics:
    """AUC/<task> and GAUC/<task> for binary tasks (bitmask bits, or "high rating" for rating labels)."""

    def __init__(self, task_names: Sequence[str], device: Optional[torch.device] = None):
        self.task_names = list(task_names)
        self.device = device
        self.aucs = [BinaryAUROC(thresholds=None).to(device) for _ in self.task_names]
        self.reset()

    def reset(self) -> None:
        for auc in self.aucs:
            auc.reset()
        self._gauc = torch.zeros(len(self.task_names), 2, dtype=torch.float64, device=self.device)  # [Σ w·auc, Σ w]
        self._loss = torch.zeros(2, dtype=torch.float64, device=self.device)

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor, user_of_candidate: torch.Tensor,
               loss_sum: Optional[float] = None) -> None:
        """probabilities, labels: (N, tasks); user_of_candidate: (N,) ids unique per evaluated user on this rank."""
        if probabilities.shape[0] == 0:
            return
        for t, auc in enumerate(self.aucs):
            auc.update(probabilities[:, t].float(), labels[:, t].to(torch.int64))
            per_user, valid = grouped_auc(probabilities[:, t], labels[:, t], user_of_candidate)
            weights = torch.bincount(user_of_candidate, minlength=per_user.numel()).to(torch.float64) * valid
            self._gauc[t, 0] += (per_user * weights).sum()
            self._gauc[t, 1] += weights.sum()
        if loss_sum is not None:
            self._loss += torch.tensor([loss_sum, probabilities.shape[0]], dtype=torch.float64, device=self._loss.device)

    def compute(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        gauc, loss = self._gauc.clone(), self._loss.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(gauc, group=group)
            dist.all_reduce(loss, group=group)
        out = {}
        for t, name in enumerate(self.task_names):
            try:
                out[f"AUC/{name}"] = float(self.aucs[t].compute())
            except Exception:  # noqa: BLE001 - no samples on any rank
                continue
            if gauc[t, 1] > 0:
                out[f"GAUC/{name}"] = float(gauc[t, 0] / gauc[t, 1])
        if loss[1] > 0:
            out["eval_loss"] = float(loss[0] / loss[1])
        return out
