"""gin-configurable argument groups: one dataclass per group, every field settable from gin.

A gin file binds fields as ``TrainerArgs.max_epochs = 3``; an unknown field (``TrainerArgs.max_epoch = 3``) is an
error when the file is parsed (gin checks parameter names against the dataclass signature). Command-line
overrides use the same syntax: ``--gin-param TrainerArgs.max_epochs=3`` (repeatable).

:func:`parse_gin` then checks every field (:func:`validate_args`): its type as annotated (a ``TypeError`` naming the
field and the expected type: ``"3"`` is not an int, ``True`` is not an int, an int is a valid float), then its value
(a ``ValueError`` naming the field: allowed choices, positive sizes, dropout in [0, 1), ...). A relative ``include``
in a gin file is looked up next to the including file first, then in the working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import tokenize
import typing
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import gin
import gin.config

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
    # Upper bound on the bytes of all embedding tables of one process (fp32 weights), checked before they are
    # allocated. None: this host's memory (the smaller of physical memory and the cgroup limit) divided by the
    # processes per host (LOCAL_WORLD_SIZE).
    max_embedding_bytes: Optional[int] = None


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
    """Parse gin files then ``KEY=VALUE`` bindings (later wins), instantiate every argument group and validate it.

    Every problem is a ``ValueError`` or ``TypeError`` naming the file, binding or field: a missing file or include,
    a syntax error, an unknown configurable or field, a value of the wrong type or out of range.
    """
    gin.clear_config()
    with _includes_next_to_the_including_file():
        for path in config_files:
            _parse_gin_file(path, None)
    for text in bindings:
        binding = _binding(text)
        try:
            gin.parse_config(binding)
        except (SyntaxError, tokenize.TokenError) as e:
            raise ValueError(f"--gin-param {text!r}: cannot parse the binding ({_first_line(e)})") from None
    gin.finalize()
    args = AllArgs(TrainerArgs(), DatasetArgs(), NetworkArgs(), EmbeddingArgs(), OptimizerArgs(), RetrievalArgs(),
                   RankingArgs(), ParallelismArgs())
    validate_args(args)
    return args


def _binding(text: str) -> str:
    if "=" not in text:
        raise ValueError(f"--gin-param expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return f"{key.strip()} = {value.strip()}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---- gin files and includes --------------------------------------------------------------------------------------
_including_files: list[str] = []  # the gin files being parsed, outermost first


def _parse_gin_file(name: str, including: Optional[str]) -> Any:
    """Parse gin file ``name``; a relative name inside ``including`` is looked up next to that file first."""
    if os.path.isabs(name) or including is None:
        candidates = [os.path.abspath(name)]
    else:
        candidates = [os.path.abspath(os.path.join(os.path.dirname(including), name)), os.path.abspath(name)]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        if including is None:
            raise ValueError(f"gin config file {name!r} not found (looked for {candidates[0]})")
        looked = " and ".join(dict.fromkeys(candidates))
        raise ValueError(f"gin config file {including} includes {name!r}, which does not exist (looked for {looked})")
    if path in _including_files:
        chain = " -> ".join(_including_files[_including_files.index(path):] + [path])
        raise ValueError(f"gin include cycle: {chain}")
    _including_files.append(path)
    try:
        return _gin_parse_config_file(path)
    except (SyntaxError, tokenize.TokenError) as e:
        raise ValueError(f"gin config file {path}: cannot parse it ({_first_line(e)})") from None
    except OSError as e:
        raise ValueError(f"gin config file {path}: cannot read it ({e.strerror or e})") from None
    finally:
        _including_files.pop()


_gin_parse_config_file = gin.config.parse_config_file


def _nested_include(config_file: str, skip_unknown=False, print_includes_and_imports=False) -> Any:
    if skip_unknown or print_includes_and_imports:
        raise ValueError("hstu's gin includes take no skip_unknown / print_includes_and_imports options")
    return _parse_gin_file(config_file, _including_files[-1] if _including_files else None)


@contextlib.contextmanager
def _includes_next_to_the_including_file():
    """gin resolves ``include`` statements through its module-level ``parse_config_file``; point it at ours."""
    gin.config.parse_config_file = _nested_include
    try:
        yield
    finally:
        gin.config.parse_config_file = _gin_parse_config_file


# ---- validation --------------------------------------------------------------------------------------------------
def validate_args(args: AllArgs) -> None:
    """Check every field's type (coercing ints given for floats) and value; raises TypeError / ValueError."""
    for group in dataclasses.fields(args):
        obj = getattr(args, group.name)
        cls = type(obj)
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            name = f"{cls.__name__}.{f.name}"
            value = _checked_type(getattr(obj, f.name), hints[f.name], name)
            setattr(obj, f.name, value)
            rule = _RULES.get(name)
            if rule is not None and value is not None:
                check, requirement = rule
                if not check(value):
                    raise ValueError(f"{name} must be {requirement}, got {value!r}")
    _check_combinations(args)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        inner = [p for p in params if p is not type(None)]
        return "None or " + " or ".join(_describe(p) for p in inner)
    if origin in (SequenceABC, list, tuple):
        return f"a list or tuple of {_describe(params[0]).split(' ', 1)[-1]}" if params else "a list or tuple"
    names = {bool: "a bool (True or False)", int: "an int", float: "a float", str: "a string", dict: "a dict"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _checked_type(value: Any, hint: Any, name: str) -> Any:
    """``value`` if it has type ``hint`` (an int given for a float becomes a float), else a TypeError."""
    converted = _convert(value, hint)
    if converted is _WRONG_TYPE:
        advice = " (write numbers without quotes)" if isinstance(value, str) and _looks_numeric(value) else ""
        raise TypeError(f"{name} must be {_describe(hint)}, got {type(value).__name__} {value!r}{advice}")
    return converted


_WRONG_TYPE = object()


def _convert(value: Any, hint: Any) -> Any:
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in params:
            return None
        for p in params:
            if p is not type(None) and (converted := _convert(value, p)) is not _WRONG_TYPE:
                return converted
        return _WRONG_TYPE
    if origin in (SequenceABC, list, tuple):
        if not isinstance(value, (list, tuple)):
            return _WRONG_TYPE
        items = [_convert(v, params[0]) for v in value] if params else list(value)
        return _WRONG_TYPE if any(v is _WRONG_TYPE for v in items) else type(value)(items)
    if hint is bool:
        return value if isinstance(value, bool) else _WRONG_TYPE
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG_TYPE
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _WRONG_TYPE
    if hint in (str, dict):
        return value if isinstance(value, hint) else _WRONG_TYPE
    return value if not isinstance(hint, type) or isinstance(value, hint) else _WRONG_TYPE


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _one_of(*choices: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}"


def _positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v > 0), "a finite number > 0"


def _finite(low: float = -math.inf) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v >= low), "a finite number" + (f" >= {low:g}" if low > -math.inf else "")


def _fraction(open_high: bool = True) -> tuple[Callable[[Any], bool], str]:
    if open_high:
        return (lambda v: 0.0 <= v < 1.0), "in [0, 1)"
    return (lambda v: 0.0 <= v <= 1.0), "in [0, 1]"


def _each(rule: tuple[Callable[[Any], bool], str], allow_empty: bool = True) -> tuple[Callable[[Any], bool], str]:
    check, requirement = rule
    return ((lambda v: (allow_empty or len(v) > 0) and all(check(x) for x in v)),
            ("a list" if allow_empty else "a non-empty list") + f" of values {requirement}")


def _choice_rules() -> dict[str, tuple[Callable[[Any], bool], str]]:
    return {
        "TrainerArgs.eval_split": _one_of("valid", "test"),
        "TrainerArgs.device": _one_of("auto", "cpu", "cuda"),
        "DatasetArgs.split_strategy": _one_of("leave_one_out", "user_ratio", "time"),
        "DatasetArgs.truncate": _one_of("recent", "oldest"),
        "NetworkArgs.position_encoding": _one_of("absolute", "reverse", "none"),
        "NetworkArgs.rab_time_reference": _one_of("query", "next"),
        "OptimizerArgs.optimizer": _one_of("adam", "adamw", "sgd"),
        "OptimizerArgs.decay": _one_of("constant", "linear", "cosine"),
        "RankingArgs.task_type": _one_of("bitmask", "rating"),
    }


# Value rules by field; None values (optional fields left unset) are not checked.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_choice_rules(),
    "TrainerArgs.max_epochs": _at_least(0),
    "TrainerArgs.max_steps": _at_least(1),
    "TrainerArgs.stop_after_steps": _at_least(1),
    "TrainerArgs.eval_interval_steps": _at_least(0),
    "TrainerArgs.eval_every_epochs": _at_least(0),
    "TrainerArgs.eval_max_batches": _at_least(1),
    "TrainerArgs.log_interval_steps": _at_least(1),
    "TrainerArgs.checkpoint_interval_steps": _at_least(0),
    "TrainerArgs.keep_last_checkpoints": _at_least(1),
    "TrainerArgs.grad_clip_norm": _positive(),
    "TrainerArgs.num_threads": _at_least(0),
    "TrainerArgs.profile_steps": _at_least(0),
    "DatasetArgs.max_seqlen": _at_least(1),
    "DatasetArgs.num_candidates": _at_least(0),
    "DatasetArgs.train_ratio": ((lambda v: 0.0 < v < 1.0), "in (0, 1)"),
    "DatasetArgs.batch_size": _at_least(1),
    "DatasetArgs.eval_batch_size": _at_least(1),
    "DatasetArgs.num_workers": _at_least(0),
    "NetworkArgs.hidden_dim": _at_least(1),
    "NetworkArgs.num_layers": _at_least(1),
    "NetworkArgs.num_heads": _at_least(1),
    "NetworkArgs.qk_dim": _at_least(1),
    "NetworkArgs.v_dim": _at_least(1),
    "NetworkArgs.dropout": _fraction(),
    "NetworkArgs.input_dropout": _fraction(),
    "NetworkArgs.attention_dropout": _fraction(),
    "NetworkArgs.alpha": _finite(),
    "NetworkArgs.scaling_seqlen": _at_least(1),
    "NetworkArgs.layer_norm_eps": _positive(),
    "NetworkArgs.num_time_buckets": _at_least(0),
    "NetworkArgs.input_scale": _finite(),
    "NetworkArgs.rab_num_time_buckets": _at_least(1),
    "NetworkArgs.target_group_size": _at_least(1),
    "EmbeddingArgs.init_std": _positive(),
    "EmbeddingArgs.item_vocab_size": _at_least(1),
    "EmbeddingArgs.item_id_low": _at_least(0),
    "EmbeddingArgs.max_embedding_bytes": _at_least(1),
    "OptimizerArgs.learning_rate": _positive(),
    "OptimizerArgs.betas": ((lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v)), "two values in [0, 1)"),
    "OptimizerArgs.eps": _positive(),
    "OptimizerArgs.weight_decay": _finite(0.0),
    "OptimizerArgs.warmup_steps": _at_least(0),
    "OptimizerArgs.min_lr_ratio": _fraction(open_high=False),
    "RetrievalArgs.num_negatives": _at_least(0),
    "RetrievalArgs.num_in_batch_negatives": _at_least(0),
    "RetrievalArgs.temperature": _positive(),
    "RetrievalArgs.l2_norm_eps": _positive(),
    "RetrievalArgs.eval_top_k": _each(_at_least(1), allow_empty=False),
    "RankingArgs.task_names": ((lambda v: len(v) > 0 and len(set(v)) == len(v) and all(v)),
                               "a non-empty list of distinct, non-empty names"),
    "RankingArgs.task_weights": _each(_finite(0.0), allow_empty=False),
    "RankingArgs.num_classes": _at_least(2),
    "RankingArgs.positive_rating_threshold": _at_least(1),
    "RankingArgs.head_hidden_dims": _each(_at_least(1)),
    "RankingArgs.head_dropout": _fraction(),
    "ParallelismArgs.tensor_model_parallel_size": _at_least(1),
    "ParallelismArgs.data_parallel_max_rows": _at_least(0),
    "ParallelismArgs.sparse_learning_rate": _positive(),
    "ParallelismArgs.sparse_eps": _positive(),
    "ParallelismArgs.sparse_beta1": _fraction(),
    "ParallelismArgs.sparse_beta2": _fraction(),
    "ParallelismArgs.sparse_weight_decay": _finite(0.0),
}


def _check_combinations(args: AllArgs) -> None:
    """Rules that involve several fields."""
    n, r, k = args.network, args.retrieval, args.ranking
    bad_layers = [i for i in n.recompute_layers if not 0 <= i < n.num_layers]
    if bad_layers:
        raise ValueError(f"NetworkArgs.recompute_layers {bad_layers} are not layer indices 0..{n.num_layers - 1} "
                         f"(NetworkArgs.num_layers={n.num_layers})")
    if r.num_negatives + r.num_in_batch_negatives == 0:
        raise ValueError("RetrievalArgs.num_negatives + RetrievalArgs.num_in_batch_negatives must be >= 1, got 0")
    if k.task_names is not None and k.task_weights is not None and len(k.task_names) != len(k.task_weights):
        raise ValueError(f"RankingArgs.task_weights has {len(k.task_weights)} weights for the "
                         f"{len(k.task_names)} RankingArgs.task_names {list(k.task_names)}")
    if k.num_classes is not None and k.positive_rating_threshold is not None \
            and k.positive_rating_threshold >= k.num_classes:
        raise ValueError(f"RankingArgs.positive_rating_threshold={k.positive_rating_threshold} leaves no positive "
                         f"class: it must be < RankingArgs.num_classes={k.num_classes}")
    if args.embeddings.item_vocab_size is not None and args.embeddings.item_id_low is not None \
            and args.embeddings.item_id_low >= args.embeddings.item_vocab_size:
        raise ValueError(f"EmbeddingArgs.item_id_low={args.embeddings.item_id_low} leaves no item: it must be < "
                         f"EmbeddingArgs.item_vocab_size={args.embeddings.item_vocab_size}")
    try:  # sharding types, sparse optimizer, backend: the distributed layer's own checks, before any process group
        from hstu.training.distributed import parallelism_settings

        parallelism_settings(args.parallelism, args.optimizer)
    except ValueError as e:
        raise ValueError(f"ParallelismArgs: {e}") from None
