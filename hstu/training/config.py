"""gin-configurable argument groups: one dataclass per group, every field settable from gin.

A gin file binds fields as ``TrainerArgs.max_epochs = 3``; an unknown field (``TrainerArgs.max_epoch = 3``) is an
error when the file is parsed (gin checks parameter names against the dataclass signature). Command-line
overrides use the same syntax: ``--gin-param TrainerArgs.max_epochs=3`` (repeatable).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import gin

# Tasks of the KuaiRand bitmask, in bit order (bit t = task t).
KUAIRAND_TASKS = ("click", "like", "follow", "comment", "forward", "hate", "long_view", "profile_enter")


@gin.configurable
@dataclass
class TrainerArgs:
    run_dir: str = "runs/default"
    seed: int = 1234
    max_epochs: int = 1
    max_steps: Optional[int] = None  # total optimizer steps (caps max_epochs; sets the LR schedule length)
    stop_after_steps: Optional[int] = None  # exit (checkpointing) after this global step: simulates an interruption
    eval_interval_steps: Optional[int] = None  # evaluate every N steps (None: only at epoch ends)
    eval_every_epochs: int = 1  # evaluate every N epochs (0: only at the end)
    eval_split: str = "test"  # "valid" or "test"
    eval_max_batches: Optional[int] = None  # cap evaluation batches (smoke tests)
    log_interval_steps: int = 10
    checkpoint_interval_steps: Optional[int] = None  # None: at every evaluation and at the end
    keep_last_checkpoints: int = 2
    save_final_checkpoint: bool = True
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    bf16: bool = True  # autocast to bfloat16 on GPU (ignored on CPU)
    deterministic: bool = False  # torch.use_deterministic_algorithms + deterministic attention backward
    grad_clip_norm: Optional[float] = None
    progress_bar: bool = True
    tensorboard: bool = True
    plot: bool = True
    compute_baseline: bool = True  # popularity baseline (retrieval) printed next to the final metrics
    num_threads: Optional[int] = None  # torch intra-op threads on CPU (None: torch's default)
    # torch.profiler over this many training steps after 10 warm-up steps: top ops by device and host time go to
    # <run_dir>/profile.txt (rank 0). 0: off.
    profile_steps: int = 0


@gin.configurable
@dataclass
class DatasetArgs:
    dataset_dir: str = "data/synthetic"
    dataset_name: str = "synthetic"  # for error messages and the prepare hint
    prepare_if_missing: bool = False  # synthetic only: generate the data when dataset_dir is absent
    synthetic_options: dict = field(default_factory=dict)  # SyntheticConfig overrides when generating
    max_seqlen: int = 200  # history events per sample
    num_candidates: int = 0  # ranking candidates per sample
    split_strategy: str = "leave_one_out"
    truncate: str = "recent"
    train_ratio: float = 0.7  # user_ratio split
    train_through_validation: bool = False  # retrieval: also train on the validation item (Meta's protocol)
    batch_size: int = 128  # per rank
    eval_batch_size: Optional[int] = None  # None: batch_size
    shuffle: bool = True
    num_workers: int = 0
    balance_workload: bool = False


@gin.configurable
@dataclass
class NetworkArgs:
    hidden_dim: int = 50  # model width = embedding dim
    num_layers: int = 2
    num_heads: int = 1
    qk_dim: int = 50
    v_dim: int = 50
    dropout: float = 0.2
    input_dropout: float = 0.2
    attention_dropout: float = 0.0
    alpha: Optional[float] = None  # None: 1/sqrt(qk_dim)
    scaling_seqlen: Optional[int] = None  # None: the maximum token count
    layer_norm_eps: float = 1e-6
    position_encoding: str = "absolute"  # absolute | reverse | none
    num_time_buckets: int = 0  # additive log-time bucket embeddings (0: off)
    input_scale: Optional[float] = None  # None: sqrt(hidden_dim)
    relative_attention_bias: bool = True
    rab_num_time_buckets: int = 128
    rab_time_reference: str = "query"  # query: t_i - t_j; next: t_(i+1) - t_j (Meta's reference)
    rab_use_position: bool = True
    rab_use_time: bool = True
    target_group_size: int = 1
    recompute_layers: Sequence[int] = ()
    contextual_features: Sequence[str] = ()  # contextual feature names to prepend as tokens


@gin.configurable
@dataclass
class EmbeddingArgs:
    init_std: float = 0.02
    item_vocab_size: Optional[int] = None  # None: from the dataset metadata
    item_id_low: Optional[int] = None  # first real item id (None: 1 when metadata says id 0 is unused, else 0)


@gin.configurable
@dataclass
class OptimizerArgs:
    optimizer: str = "adamw"  # adam | adamw | sgd
    learning_rate: float = 1e-3
    betas: Sequence[float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"  # constant | linear | cosine (after warmup, to min_lr_ratio at the last step)
    min_lr_ratio: float = 0.0


@gin.configurable
@dataclass
class RetrievalArgs:
    num_negatives: int = 128  # uniform over the catalogue
    num_in_batch_negatives: int = 0
    share_negatives: bool = False  # one uniform draw for the whole batch (fast) instead of one per position
    temperature: float = 0.05
    l2_normalize: bool = True
    l2_norm_eps: float = 1e-6
    eval_top_k: Sequence[int] = (10, 50, 200)
    filter_seen_items: bool = False


@gin.configurable
@dataclass
class RankingArgs:
    task_type: Optional[str] = None  # bitmask | rating (None: from the dataset's action kind)
    task_names: Optional[Sequence[str]] = None  # bitmask tasks in bit order (None: from metadata)
    task_weights: Optional[Sequence[float]] = None
    num_classes: Optional[int] = None  # rating classes (None: from metadata)
    positive_rating_threshold: Optional[int] = None  # rating class >= this counts as positive for AUC (None: top 40%)
    head_hidden_dims: Sequence[int] = (512,)
    head_dropout: float = 0.0


@gin.configurable
@dataclass
class ParallelismArgs:
    """Read by ``hstu.distributed`` (``ParallelismSettings.from_args``: same field names; None = its default).

    world = tensor_model_parallel_size x data-parallel size. Embedding tables are sharded by TorchRec over all
    ranks; see docs/distributed.md.
    """

    backend: Optional[str] = None  # None: nccl on GPU, gloo on CPU
    tensor_model_parallel_size: int = 1  # > 1 with sequence_parallel needs CUDA; without it TP also runs on gloo
    sequence_parallel: bool = False  # with tensor_model_parallel_size > 1
    use_distributed_optimizer: bool = False  # Megatron's distributed optimizer (CUDA)
    grad_reduce_in_fp32: bool = True  # Megatron DDP gradient reduction in fp32
    embedding_sharding: dict = field(default_factory=dict)  # table -> row_wise|table_wise|column_wise|data_parallel
    default_embedding_sharding: str = "auto"  # tables not listed ("auto": the TorchRec planner picks RW/TW/CW)
    data_parallel_max_rows: int = 0  # tables with at most this many rows default to data_parallel (0: off)
    # Optimizer of the embedding tables (fused into backward for sharded tables): rowwise_adagrad | adagrad | adam |
    # sgd. None: follow OptimizerArgs.optimizer (adam/adamw -> adam, sgd -> sgd). FBGEMM has no fused Adam on CPU:
    # there "adam" keeps the tables unsharded (replicated, dense Adam), so CPU runs that shard tables set
    # rowwise_adagrad.
    sparse_optimizer: Optional[str] = None
    sparse_learning_rate: Optional[float] = None  # None: OptimizerArgs.learning_rate (follows the same LR schedule)
    sparse_eps: Optional[float] = None  # None: OptimizerArgs.eps
    sparse_beta1: Optional[float] = None  # None: OptimizerArgs.betas[0]
    sparse_beta2: Optional[float] = None  # None: OptimizerArgs.betas[1]
    sparse_weight_decay: Optional[float] = None  # None: OptimizerArgs.weight_decay
    # A single process keeps its tables unsharded (dense optimizer) unless this is True.
    shard_single_process: bool = False


ARG_CLASSES = (TrainerArgs, DatasetArgs, NetworkArgs, EmbeddingArgs, OptimizerArgs, RetrievalArgs, RankingArgs,
               ParallelismArgs)


@dataclass
class AllArgs:
    trainer: TrainerArgs
    dataset: DatasetArgs
    network: NetworkArgs
    embeddings: EmbeddingArgs
    optimizer: OptimizerArgs
    retrieval: RetrievalArgs
    ranking: RankingArgs
    parallelism: ParallelismArgs

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


def parse_gin(config_files: Sequence[str] = (), bindings: Sequence[str] = ()) -> AllArgs:
    """Parse gin files then ``KEY=VALUE`` bindings (later wins) and instantiate every argument group."""
    gin.clear_config()
    gin.parse_config_files_and_bindings(list(config_files), [_binding(b) for b in bindings])
    return AllArgs(TrainerArgs(), DatasetArgs(), NetworkArgs(), EmbeddingArgs(), OptimizerArgs(), RetrievalArgs(),
                   RankingArgs(), ParallelismArgs())


def _binding(text: str) -> str:
    if "=" not in text:
        raise ValueError(f"--gin-param expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return f"{key.strip()} = {value.strip()}"
