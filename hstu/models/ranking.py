"""HSTU ranking model: history as interleaved item/action tokens, candidates scored by a multi-task MLP head.

Sparse part: ``self.embeddings`` (tables ``item``, ``action`` and the contextual features). Dense part:
``self.encoder`` and ``self.head``. The candidates' actions are the labels and never enter the network.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from hstu.data.batch import JaggedBatch
from hstu.models.common import StepOutput, interleave_contextual, sparse_features
from hstu.models.losses import MultiTaskLoss
from hstu.modules.embeddings import EmbeddingProjection, EmbeddingTableSpec, SparseEmbeddings
from hstu.modules.encoder import EncoderConfig, EncoderInputs, EncoderOutputs, HSTUEncoder


HEAD_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


class MLPHead(nn.Module):
    """LayerNorm -> [Linear -> activation -> dropout]* -> Linear to the task logits.

    ``activation``: one of HEAD_ACTIVATIONS; ``bias``: whether the Linear layers have biases."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], num_outputs: int, dropout: float = 0.0,
                 activation: str = "silu", bias: bool = True):
        super().__init__()
        if activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(HEAD_ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = [nn.LayerNorm(input_dim)]
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden, bias=bias), HEAD_ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_outputs, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RankingModel(nn.Module):
    def __init__(
        self,
        num_items: int,
        action_vocab_size: int,
        encoder_config: EncoderConfig,
        loss: MultiTaskLoss,
        head_hidden_dims: Sequence[int] = (512,),
        head_dropout: float = 0.0,
        *,
        contextual_vocab_sizes: Optional[dict[str, int]] = None,
        embedding_init_std: float = 0.02,
        head_activation: str = "silu",
        head_bias: bool = True,
        item_embedding_dim: Optional[int] = None,
        contextual_embedding_dim: Optional[int] = None,
    ):
        super().__init__()
        if not encoder_config.interleave_actions:
            raise ValueError("the ranking model feeds actions as interleaved tokens: set interleave_actions=True")
        self.contextual_keys = list((contextual_vocab_sizes or {}).keys())
        # Item and action tables of item_embedding_dim, contextual ones of contextual_embedding_dim (None: the model
        # width); each kind of another width has its projection to the model width.
        tables = [EmbeddingTableSpec("item", num_items, item_embedding_dim),
                  EmbeddingTableSpec("action", action_vocab_size, item_embedding_dim)]
        tables += [EmbeddingTableSpec(name, size, contextual_embedding_dim)
                   for name, size in (contextual_vocab_sizes or {}).items()]
        self.embeddings = SparseEmbeddings(tables, encoder_config.embedding_dim, init_std=embedding_init_std)
        width = encoder_config.embedding_dim
        self.item_projection = EmbeddingProjection(item_embedding_dim, width) if item_embedding_dim else None
        self.contextual_projection = (EmbeddingProjection(contextual_embedding_dim, width)
                                      if contextual_embedding_dim and self.contextual_keys else None)
        self.encoder = HSTUEncoder(encoder_config)
        self.head = MLPHead(encoder_config.embedding_dim, head_hidden_dims, loss.num_outputs, head_dropout,
                            activation=head_activation, bias=head_bias)
        self.loss = loss

    def predict(self, batch: JaggedBatch) -> tuple[torch.Tensor, EncoderOutputs]:
        """Logits (num_candidates_total, num_outputs) of the candidates, in batch order, and the encoder's outputs
        (whose ``layout`` says which sequence every candidate belongs to)."""
        values = self.embeddings(sparse_features(self.embeddings, batch, ["item", "action"], self.contextual_keys))
        if self.item_projection is not None:
            values.update({k: self.item_projection(values[k]) for k in ("item", "action")})
        if self.contextual_projection is not None:
            values.update({k: self.contextual_projection(values[k]) for k in self.contextual_keys})
        outputs = self.encoder(
            EncoderInputs(
                item_embeddings=values["item"],
                seq_lengths=batch.seq_lengths,
                host_seq_lengths=batch.seq_lengths_on_host(),
                timestamps=batch.sequence["timestamp"].values(),
                num_candidates=batch.num_candidates,
                host_num_candidates=batch.num_candidates_on_host(),
                action_embeddings=values["action"],
                contextual_embeddings=interleave_contextual(values, self.contextual_keys, batch.batch_size),
                num_contextual=len(self.contextual_keys),
            )
        )
        return self.head(outputs.item_outputs[outputs.layout.candidate_rows()]), outputs

    def forward(self, batch: JaggedBatch) -> StepOutput:
        logits, outputs = self.predict(batch)
        loss, details = self.loss(logits, batch.labels())
        return StepOutput(loss, outputs.num_tokens, outputs.sum_squared_lengths,
                          {"num_candidates": int(logits.shape[0]), **details})
