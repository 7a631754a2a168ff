"""torchrun worker of the distributed tests: trains small models for a few steps and writes the loss sequences.

    torchrun --nproc_per_node N tests/distributed/worker.py --out results.json --scenarios row_wise,checkpoint

Every scenario trains from the same initial weights (seeded construction) on the same *global* batches; rank r of
the data-parallel group takes its contiguous slice of each global batch. The recorded loss of a step is the mean
over DP ranks of the per-rank mean loss, which equals the loss of one rank on the whole global batch because every
rank holds the same number of samples and the loss is a mean over samples.

Scenarios (``--scenarios``, comma separated):
  row_wise, table_wise, column_wise   all tables of that sharding type, fused row-wise Adagrad
  mixed                                item row-wise, action data-parallel, category chosen by the planner
  replicated_adam                      sparse Adam (no fused CPU kernel: tables stay replicated on CPU)
  checkpoint                           20 steps straight vs 10 steps + save + fresh model + load + 10 steps
  resume_other_world                   load the checkpoint of --checkpoint-dir (saved by another world size) at
                                       step 10 and train steps 10..19
  ranking_model                        the real hstu.models.RankingModel (row-wise item table)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from typing import Optional

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor  # noqa: E402

from hstu.distributed import (  # noqa: E402
    ParallelismSettings,
    destroy_parallelism,
    init_parallelism,
    load_checkpoint,
    parallelize,
    save_checkpoint,
)
from hstu.modules.hstu_layer import AttentionInputs, HSTULayer, HSTUStack  # noqa: E402
from hstu.ops import lengths_to_offsets  # noqa: E402

NUM_ITEMS, NUM_ACTIONS, NUM_CATEGORIES, DIM = 300, 12, 40, 16
GLOBAL_BATCH = 8
STEPS = 20


class TinySparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.collection = EmbeddingCollection(tables=[
            EmbeddingConfig(name="item", embedding_dim=DIM, num_embeddings=NUM_ITEMS, feature_names=["item"]),
            EmbeddingConfig(name="action", embedding_dim=DIM, num_embeddings=NUM_ACTIONS, feature_names=["action"]),
            EmbeddingConfig(name="category", embedding_dim=DIM, num_embeddings=NUM_CATEGORIES,
                            feature_names=["category"]),
        ])

    def forward(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return {name: jagged.values() for name, jagged in self.collection(features).items()}


class TinyModel(nn.Module):
    """Sum of three token embeddings -> 2 HSTU layers (2 heads) -> next-action classifier."""

    def __init__(self):
        super().__init__()
        self.embeddings = TinySparse()
        self.layers = HSTUStack([HSTULayer(DIM, 2, 8, 8, dropout=0.0, scaling_seqlen=32) for _ in range(2)])
        self.head = nn.Linear(DIM, NUM_ACTIONS)

    def forward(self, batch: dict) -> torch.Tensor:
        values = self.embeddings(batch["features"])
        x = values["item"] + values["action"] + values["category"]
        lengths = batch["lengths"]
        offsets = lengths_to_offsets(lengths)
        x = self.layers(x, AttentionInputs(seq_offsets=offsets, max_seqlen=int(lengths.max())))
        token_loss = F.cross_entropy(self.head(x), batch["targets"], reduction="none")
        # Mean over tokens per sample, then over samples: every sample weighs the same on every rank.
        sample_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
        per_sample = torch.zeros(lengths.numel(), device=x.device).index_add(0, sample_ids, token_loss)
        return (per_sample / lengths.clamp(min=1)).mean()


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(4, 17, (GLOBAL_BATCH,), generator=g)
    total = int(lengths.sum())
    items = torch.randint(0, NUM_ITEMS, (total,), generator=g)
    return {"lengths": lengths, "item": items, "action": torch.randint(0, NUM_ACTIONS, (total,), generator=g),
            "category": items % NUM_CATEGORIES, "targets": (items * 7) % NUM_ACTIONS}


def local_batch(step: int, dp_rank: int, dp_size: int, device) -> dict:
    full = global_batch(step)
    per_rank = GLOBAL_BATCH // dp_size
    offsets = lengths_to_offsets(full["lengths"])
    first, last = dp_rank * per_rank, (dp_rank + 1) * per_rank
    rows = slice(int(offsets[first]), int(offsets[last]))
    lengths = full["lengths"][first:last]
    features = KeyedJaggedTensor(keys=["item", "action", "category"],
                                 values=torch.cat([full[k][rows] for k in ("item", "action", "category")]),
                                 lengths=lengths.repeat(3))
    return {"features": features.to(device), "lengths": lengths.to(device), "targets": full["targets"][rows].to(device)}


SCENARIO_SETTINGS = {
    "row_wise": dict(default_embedding_sharding="row_wise"),
    "table_wise": dict(default_embedding_sharding="table_wise"),
    "column_wise": dict(default_embedding_sharding="column_wise"),
    "mixed": dict(embedding_sharding={"item": "row_wise", "action": "data_parallel"}),
    "replicated_adam": dict(default_embedding_sharding="row_wise", sparse_optimizer="adam"),
}


SEQUENCE_PARALLEL = True  # set from --no-sequence-parallel in main()


class Optim:  # dense optimizer settings, OptimizerArgs-like
    optimizer, learning_rate, betas, eps, weight_decay = "adam", 1e-2, (0.9, 0.98), 1e-8, 0.0


def build(ctx, settings: dict, tp_size: int):
    torch.manual_seed(0)  # identical construction on every rank and in every world size
    model = TinyModel()
    ps = ParallelismSettings(tensor_model_parallel_size=tp_size, sequence_parallel=SEQUENCE_PARALLEL,
                             sparse_learning_rate=0.05, shard_single_process=True, **settings)
    return model, parallelize(model, ctx, ps, Optim(), grad_clip_norm=None)


def train(model, parallel, ctx, steps: range) -> list[float]:
    losses = []
    for step in steps:
        batch = local_batch(step, ctx.dp_rank, ctx.dp_size, ctx.device)
        parallel.zero_grad()
        loss = model(batch)
        loss.backward()
        parallel.finish_grad_sync()
        parallel.step()
        logged = loss.detach().clone()
        dist.all_reduce(logged, group=ctx.dp_group)
        losses.append(float(logged) / ctx.dp_size)
    return losses


def run_checkpoint(ctx, tp_size: int, directory: str) -> dict:
    settings = SCENARIO_SETTINGS["row_wise"]
    model, parallel = build(ctx, settings, tp_size)
    first = train(model, parallel, ctx, range(0, 10))
    save_checkpoint(directory, parallel, extra_state={"step": 10, "rank": ctx.rank})
    straight = train(model, parallel, ctx, range(10, 20))
    model, parallel = build(ctx, settings, tp_size)  # fresh weights: everything must come from the checkpoint
    extra = load_checkpoint(directory, parallel)
    assert extra == {"step": 10, "rank": ctx.rank}, extra
    resumed = train(model, parallel, ctx, range(10, 20))
    return {"first": first, "straight": straight, "resumed": resumed}


def run_resume_other_world(ctx, tp_size: int, directory: str) -> list[float]:
    model, parallel = build(ctx, SCENARIO_SETTINGS["row_wise"], tp_size)
    load_checkpoint(directory, parallel)
    return train(model, parallel, ctx, range(10, 20))


def run_ranking_model(ctx, tp_size: int, bf16: bool = False, attention_dtypes: Optional[set] = None) -> list[float]:
    """``attention_dtypes`` collects the dtype of every q that reaches hstu_attention (bf16 autocast: bf16 runs the
    fused kernel on GPU; float32 would be the slow reference)."""
    import hstu.modules.hstu_layer as hstu_layer
    from hstu.data.batch import JaggedBatch
    from hstu.models import MultiTaskLoss, RankingModel
    from hstu.modules import EncoderConfig

    torch.manual_seed(0)
    config = EncoderConfig(embedding_dim=DIM, num_layers=2, num_heads=2, qk_dim=8, v_dim=8, dropout=0.0,
                           input_dropout=0.0, max_tokens=64, interleave_actions=True, relative_attention_bias=True)
    model = RankingModel(NUM_ITEMS, 256, config, MultiTaskLoss("bitmask", 2), head_hidden_dims=(16,))
    ps = ParallelismSettings(tensor_model_parallel_size=tp_size, sequence_parallel=SEQUENCE_PARALLEL,
                             sparse_learning_rate=0.05, shard_single_process=True, embedding_sharding={"item": "row_wise", "action": "table_wise"})
    parallel = parallelize(model, ctx, ps, Optim())
    losses = []
    for step in range(STEPS):
        full = global_batch(step)
        per_rank = GLOBAL_BATCH // ctx.dp_size
        offsets = lengths_to_offsets(full["lengths"])
        first, last = ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank
        rows = slice(int(offsets[first]), int(offsets[last]))
        lengths = full["lengths"][first:last]
        times = torch.arange(rows.stop - rows.start) * 60
        sequence = KeyedJaggedTensor(keys=["item", "action", "timestamp"],
                                     values=torch.cat([full["item"][rows], full["targets"][rows] % 4, times]),
                                     lengths=lengths.repeat(3))
        batch = JaggedBatch(sequence=sequence, num_candidates=torch.full((per_rank,), 2),
                            is_padding=torch.zeros(per_rank, dtype=torch.bool), max_seqlen=16).to(ctx.device)
        parallel.zero_grad()
        attention = hstu_layer.hstu_attention

        def recording_attention(q, *args, **kwargs):
            if attention_dtypes is not None:
                attention_dtypes.add(str(q.dtype))
            return attention(q, *args, **kwargs)

        hstu_layer.hstu_attention = recording_attention
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = model(batch).loss  # (TrainerArgs.bf16)
        finally:
            hstu_layer.hstu_attention = attention
        loss.backward()
        parallel.finish_grad_sync()
        parallel.step()
        logged = loss.detach().clone()
        dist.all_reduce(logged, group=ctx.dp_group)
        losses.append(float(logged) / ctx.dp_size)
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default="row_wise")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--no-sequence-parallel", action="store_true", help="TP without SP (the only TP on CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--checkpoint-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    # Deterministic mode (as TrainerArgs.deterministic): the resume test compares losses bit for bit, and on GPU
    # atomics-based kernels (embedding / index_put backward) may round differently between two identical runs.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    global SEQUENCE_PARALLEL
    SEQUENCE_PARALLEL = not args.no_sequence_parallel
    ctx = init_parallelism(ParallelismSettings(tensor_model_parallel_size=args.tp, sequence_parallel=SEQUENCE_PARALLEL),
                           device=args.device, seed=0)
    results = {"world_size": ctx.world_size, "tp_size": ctx.tp_size, "dp_size": ctx.dp_size}
    for scenario in args.scenarios.split(","):
        if scenario == "checkpoint":
            directory = args.checkpoint_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "ckpt")
            results[scenario] = run_checkpoint(ctx, args.tp, directory)
        elif scenario == "resume_other_world":
            results[scenario] = run_resume_other_world(ctx, args.tp, args.checkpoint_dir)
        elif scenario == "ranking_model":
            results[scenario] = run_ranking_model(ctx, args.tp)
        elif scenario == "ranking_model_bf16":
            dtypes = set()
            results[scenario] = run_ranking_model(ctx, args.tp, bf16=True, attention_dtypes=dtypes)
            results[scenario + "_attention_dtypes"] = sorted(dtypes)
        else:
            model, parallel = build(ctx, SCENARIO_SETTINGS[scenario], args.tp)
            results[scenario] = train(model, parallel, ctx, range(STEPS))
            results[scenario + "_plan"] = {d.table: d.sharding for d in parallel.sparse.decisions}
    if ctx.is_main:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    destroy_parallelism(ctx)


if __name__ == "__main__":
    main()
