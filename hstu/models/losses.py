"""Training losses: sampled softmax for retrieval, multi-task BCE / rating cross-entropy for ranking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hstu.modules.encoder import l2_normalize

# Logit given to an accidental hit (a negative equal to the positive): exp() of it underflows to 0 in fp32.
MASKED_LOGIT = -1e9


@dataclass
class SampledSoftmaxOutput:
    loss: torch.Tensor
    num_negatives: int
    accidental_hits: torch.Tensor  # 0-d count


class SampledSoftmaxLoss(nn.Module):
    """-log softmax of the positive among [positive, negatives], logits = cos / temperature.

    Negatives:
    * ``num_uniform_negatives`` drawn uniformly from item ids [``item_id_low``, ``item_id_high``), either shared by
      every query of the batch (one GEMM) or drawn independently per query (Meta's reference);
    * ``num_in_batch_negatives`` drawn from the batch's deduplicated positive items (the seed's negatives).
    A negative equal to the query's positive (accidental hit) is masked out.
    """

    def __init__(
        self,
        item_id_low: int,
        item_id_high: int,
        num_uniform_negatives: int = 128,
        num_in_batch_negatives: int = 0,
        temperature: float = 0.05,
        share_uniform_negatives: bool = False,
        l2_normalize_embeddings: bool = True,
        l2_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if item_id_high <= item_id_low:
            raise ValueError(f"empty item id range [{item_id_low}, {item_id_high})")
        if num_uniform_negatives < 0 or num_in_batch_negatives < 0 or num_uniform_negatives + num_in_batch_negatives == 0:
            raise ValueError("need a non-negative number of negatives, at least one in total")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.item_id_low, self.item_id_high = int(item_id_low), int(item_id_high)
        self.num_uniform_negatives = int(num_uniform_negatives)
        self.num_in_batch_negatives = int(num_in_batch_negatives)
        self.temperature = float(temperature)
        self.share_uniform_negatives = bool(share_uniform_negatives)
        self.normalize = l2_normalize_embeddings
        self.eps = l2_norm_eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(x, self.eps) if self.normalize else x

    def forward(
        self,
        queries: torch.Tensor,
        positive_ids: torch.Tensor,
        positive_embeddings: torch.Tensor,
        lookup_items: Callable[[torch.Tensor], torch.Tensor],
        uniform_negative_ids: Optional[torch.Tensor] = None,
    ) -> SampledSoftmaxOutput:
        """queries, positive_embeddings: (P, D); positive_ids: (P,); lookup_items(ids (N,)) -> (N, D).

        ``uniform_negative_ids`` overrides the random draw ((M,) shared or (P, M) per query; for tests).
        """
        queries = self._norm(_at_least_fp32(queries))
        positives = self._norm(_at_least_fp32(positive_embeddings))
        logits = [(queries * positives).sum(-1, keepdim=True)]
        hits = [torch.zeros_like(positive_ids, dtype=torch.bool).unsqueeze(1)]
        num_queries = queries.shape[0]
        device = queries.device

        if self.num_uniform_negatives > 0:
            ids = uniform_negative_ids
            if ids is None:
                shape = (self.num_uniform_negatives,) if self.share_uniform_negatives else (num_queries, self.num_uniform_negatives)
                ids = torch.randint(self.item_id_low, self.item_id_high, shape, device=device)
            catalogue_size = self.item_id_high - self.item_id_low
            if ids.dim() == 1:
                unique_ids, inverse = torch.unique(ids, return_inverse=True)
                negatives = self._norm(_at_least_fp32(lookup_items(unique_ids)))
                logits.append((queries @ negatives.T)[:, inverse])
                hits.append(ids.unsqueeze(0) == positive_ids.unsqueeze(1))
            elif catalogue_size <= ids.shape[1] * queries.shape[1]:
                # Small catalogue: one (P, catalogue) GEMM against every item, then each query's own negatives.
                everything = torch.arange(self.item_id_low, self.item_id_high, device=device)
                negatives = self._norm(_at_least_fp32(lookup_items(everything)))
                logits.append(torch.gather(queries @ negatives.T, 1, ids - self.item_id_low))
                hits.append(ids == positive_ids.unsqueeze(1))
            else:
                unique_ids, inverse = torch.unique(ids, return_inverse=True)
                negatives = self._norm(_at_least_fp32(lookup_items(unique_ids)))
                logits.append(torch.einsum("pd,pmd->pm", queries, negatives[inverse]))
                hits.append(ids == positive_ids.unsqueeze(1))

        if self.num_in_batch_negatives > 0 and num_queries > 0:
            unique_pos, first_index = _unique_first_index(positive_ids)
            take = torch.randperm(unique_pos.numel(), device=device)[: self.num_in_batch_negatives]
            logits.append(queries @ positives[first_index[take]].T)
            hits.append(unique_pos[take].unsqueeze(0) == positive_ids.unsqueeze(1))

        all_logits = torch.cat(logits, dim=1) / self.temperature
        all_hits = torch.cat(hits, dim=1)
        all_logits = all_logits.masked_fill(all_hits, MASKED_LOGIT)
        target = torch.zeros(num_queries, dtype=torch.int64, device=device)
        loss = F.cross_entropy(all_logits, target) if num_queries > 0 else all_logits.sum() * 0.0
        return SampledSoftmaxOutput(loss, all_logits.shape[1] - 1, all_hits.sum())  # a tensor: no device sync


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Logits / temperature amplify rounding: never compute them in bf16.
    return x if x.dtype == torch.float64 else x.float()


def _unique_first_index(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and, for each, the index of its first occurrence in ``ids``."""
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((unique_ids.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amin")
    return unique_ids, first


def bitmask_to_labels(actions: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """(N,) action bitmasks -> (N, num_tasks) float 0/1 labels, task t = bit t."""
    bits = torch.arange(num_tasks, device=actions.device)
    return ((actions.unsqueeze(1) >> bits) & 1).to(torch.float32)


class MultiTaskLoss(nn.Module):
    """Ranking loss: Σ_t w_t BCE(logit_t, bit_t) ("bitmask"), or cross-entropy over rating classes ("rating")."""

    def __init__(self, task_type: str, num_outputs: int, task_weights: Optional[Sequence[float]] = None):
        super().__init__()
        if task_type not in ("bitmask", "rating"):
            raise ValueError(f"task_type must be 'bitmask' or 'rating', got {task_type!r}")
        self.task_type, self.num_outputs = task_type, int(num_outputs)
        if task_type == "bitmask":
            weights = [1.0] * num_outputs if not task_weights else list(task_weights)
            if len(weights) != num_outputs:
                raise ValueError(f"{len(weights)} task weights for {num_outputs} tasks")
            self.register_buffer("task_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
            self.all_tasks_weighted = all(w != 0 for w in weights)

    def forward(self, logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = logits.float()
        if logits.shape[0] == 0:
            return logits.sum() * 0.0, {}
        if self.task_type == "rating":
            return F.cross_entropy(logits, actions.clamp(0, self.num_outputs - 1)), {}
        labels = bitmask_to_labels(actions, self.num_outputs)
        weights = self.task_weights.to(logits.device)
        per_task = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
        if self.all_tasks_weighted:
            return (per_task * weights).sum(), {"per_task": per_task.detach()}
        # Tasks of weight 0 are left out: their logits are selected away before the loss, so a NaN or inf there
        # reaches neither the loss nor the gradient.
        active = weights != 0
        selected = F.binary_cross_entropy_with_logits(torch.where(active, logits, torch.zeros_like(logits)), labels,
                                                      reduction="none").mean(0)
        return torch.where(active, selected * weights, torch.zeros_like(selected)).sum(), {"per_task": per_task.detach()}
