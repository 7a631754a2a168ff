"""Ranking metrics: AUC per task (torchmetrics) and GAUC (per-user AUC averaged, weighted by candidates).

Data parallel: torchmetrics gathers its states across ranks in ``compute``; GAUC all-reduces its two sums (every
user lives on exactly one rank, so per-user AUCs are local).

Undefined values are left out (see :mod:`hstu.metrics.undefined`): AUC/<task> and GAUC/<task> when the evaluated
candidates of all ranks hold no positive or no negative for the task, GAUC/<task> when no user has both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC

from hstu.metrics.undefined import warn_undefined


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
    positive_rank_sum = torch.bincount(g, weights=torch.where(y, rank_in_group, 0.0), minlength=num_groups)
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
        self._labels = torch.zeros(len(self.task_names), 2, dtype=torch.float64, device=self.device)  # [pos, neg]

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor, user_of_candidate: torch.Tensor,
               loss_sum: Optional[float] = None) -> None:
        """probabilities, labels: (N, tasks); user_of_candidate: (N,) ids unique per evaluated user on this rank."""
        if probabilities.shape[0] == 0:
            return
        positives = (labels > 0).sum(0).to(torch.float64)
        self._labels += torch.stack([positives, labels.shape[0] - positives], dim=1).to(self._labels.device)
        for t, auc in enumerate(self.aucs):
            auc.update(probabilities[:, t].float(), labels[:, t].to(torch.int64))
            per_user, valid = grouped_auc(probabilities[:, t], labels[:, t], user_of_candidate)
            # Users without both classes have no AUC: selected out (torch.where, no device sync), never multiplied
            # by a zero weight.
            candidates = torch.bincount(user_of_candidate, minlength=per_user.numel()).to(torch.float64)
            zero = torch.zeros_like(candidates)
            self._gauc[t, 0] += torch.where(valid, per_user * candidates, zero).sum()
            self._gauc[t, 1] += torch.where(valid, candidates, zero).sum()
        if loss_sum is not None:
            self._loss += torch.tensor([loss_sum, probabilities.shape[0]], dtype=torch.float64, device=self._loss.device)

    def compute(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        """AUC/<task>, GAUC/<task>, eval_loss; undefined ones are left out (every rank decides alike)."""
        sums = torch.cat([self._gauc.flatten(), self._labels.flatten(), self._loss])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        num_tasks = len(self.task_names)
        gauc = sums[: 2 * num_tasks].view(num_tasks, 2)
        label_counts = sums[2 * num_tasks : 4 * num_tasks].view(num_tasks, 2).tolist()
        loss = sums[4 * num_tasks :]
        out = {}
        for t, name in enumerate(self.task_names):
            positives, negatives = label_counts[t]
            if positives == 0 or negatives == 0:
                missing = ("no candidate" if positives == negatives == 0 else
                           "no positive label" if positives == 0 else "no negative label")
                warn_undefined(f"AUC/{name} and GAUC/{name}", f"the evaluated data has {missing} for task {name!r}")
                continue
            out[f"AUC/{name}"] = float(self.aucs[t].compute())
            if gauc[t, 1] > 0:
                out[f"GAUC/{name}"] = float(gauc[t, 0] / gauc[t, 1])
            else:
                warn_undefined(f"GAUC/{name}", f"no evaluated user has both a positive and a negative for task {name!r}")
        if loss[1] > 0:
            out["eval_loss"] = float(loss[0] / loss[1])
        return out
