"""HSTU retrieval model: next-item prediction at every position, sampled softmax, full-catalogue evaluation.

Sparse part: ``self.embeddings`` (:class:`~hstu.modules.SparseEmbeddings`; tables ``item`` and optional contextual
features). Dense part: ``self.encoder`` (:class:`~hstu.modules.HSTUEncoder`). The loss has no parameters.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hstu.data.batch import JaggedBatch
from hstu.models.common import StepOutput, interleave_contextual, sparse_features
from hstu.models.losses import SampledSoftmaxLoss
from hstu.modules.embeddings import EmbeddingTableSpec, SparseEmbeddings
from hstu.modules.encoder import EncoderConfig, EncoderInputs, HSTUEncoder, l2_normalize


class RetrievalModel(nn.Module):
    def __init__(
        self,
        num_items: int,
        encoder_config: EncoderConfig,
        loss: SampledSoftmaxLoss,
        *,
        contextual_vocab_sizes: Optional[dict[str, int]] = None,
        embedding_init_std: float = 0.02,
        item_id_low: int = 1,
        l2_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.contextual_keys = list((contextual_vocab_sizes or {}).keys())
        tables = [EmbeddingTableSpec("item", num_items)]
        tables += [EmbeddingTableSpec(name, size) for name, size in (contextual_vocab_sizes or {}).items()]
        self.embeddings = SparseEmbeddings(tables, encoder_config.embedding_dim, init_std=embedding_init_std)
        self.encoder = HSTUEncoder(encoder_config)
        self.loss = loss
        self.num_items = int(num_items)
        self.item_id_low = int(item_id_low)
        self.l2_norm_eps = l2_norm_eps

    # ---- shared by training and evaluation ----------------------------------------------------------------------
    def encode(self, batch: JaggedBatch, next_timestamps: Optional[torch.Tensor] = None):
        values = self.embeddings(sparse_features(self.embeddings, batch, ["item"], self.contextual_keys))
        inputs = EncoderInputs(
            item_embeddings=values["item"],
            seq_lengths=batch.seq_lengths,
            timestamps=batch.sequence["timestamp"].values(),
            contextual_embeddings=interleave_contextual(values, self.contextual_keys, batch.batch_size),
            num_contextual=len(self.contextual_keys),
            next_timestamps=next_timestamps,
            host_seq_lengths=batch.seq_lengths_on_host(),
        )
        return values["item"], self.encoder(inputs)

    def forward(self, batch: JaggedBatch) -> StepOutput:
        """Training step: every position predicts the next item of its sequence."""
        item_embeddings, outputs = self.encode(batch)
        query_rows = outputs.layout.rows_with_next()
        items = batch.sequence["item"].values()
        result = self.loss(
            outputs.item_outputs[query_rows],
            items[query_rows + 1],
            item_embeddings[query_rows + 1],
            lambda ids: self.embeddings.lookup("item", ids),
        )
        return StepOutput(result.loss, outputs.num_tokens, outputs.sum_squared_lengths,
                          {"num_queries": query_rows.numel(), "accidental_hits": result.accidental_hits})

    # ---- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def catalogue_embeddings(self, chunk: int = 1 << 16) -> torch.Tensor:
        """L2-normalised embeddings of item ids [item_id_low, num_items), through the (maybe sharded) tables."""
        device = next(self.encoder.parameters()).device
        ids = torch.arange(self.item_id_low, self.num_items, device=device)
        parts = [self.embeddings.lookup("item", ids[i : i + chunk]) for i in range(0, ids.numel(), chunk)]
        return l2_normalize(torch.cat(parts).float(), self.l2_norm_eps)

    @torch.no_grad()
    def user_embeddings(self, batch: JaggedBatch, next_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, D) L2-normalised output at each sequence's last event (zeros for empty sequences).

        next_timestamps: (B,) request time of the item to predict, for a relative bias with time reference "next".
        """
        _, outputs = self.encode(batch, next_timestamps)
        layout = outputs.layout
        if outputs.item_outputs.shape[0] == 0:
            return outputs.item_outputs.new_zeros(layout.num_sequences, self.encoder.config.embedding_dim)
        # An empty sequence's index points at another sequence's row: select zeros, whatever that row holds.
        last_outputs = outputs.item_outputs[layout.last_rows()].float()
        users = torch.where((layout.event_lengths > 0).unsqueeze(1), last_outputs, torch.zeros_like(last_outputs))
        return l2_normalize(users, self.l2_norm_eps)
