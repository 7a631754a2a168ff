"""gin-configurable argument groups: one dataclass per group, every field settable from gin.

A gin file binds fields as ``TrainerArgs.max_epochs = 3``; an unknown field (``TrainerArgs.max_epoch = 3``) is an
error when the file is parsed (gin checks parameter names against the dataclass signature). Command-line
overrides use the same syntax: ``--gin-param TrainerArgs.max_epochs=3`` (repeatable).

:func:`parse_gin` then checks every field (:func:`validate_args`): its type as annotated (a ``TypeError`` naming the
field and the expected type: ``"3"`` is not an int, ``True`` is not an int, an int is a valid float), then its value
(a ``ValueError`` naming the field: allowed choices, positive sizes, dropout in [0, 1), ...). A relative ``include``
in a gin file is looked up next to the including file first, then in the working directory.

The field names of NVIDIA's recsys-examples HSTU example are accepted next to ours, with the example's meanings and
defaults (EXAMPLE_FIELDS, at the end of this module; docs/migrating.md). A value whose meaning this stack cannot
reproduce yet raises :class:`NotSupportedYetError` (a ValueError) naming the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import tokenize
import typing
import warnings
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import gin
import gin.config

RANKING_METRICS = ("AUC", "ACC")  # RankingArgs.eval_metrics

# Tasks of the KuaiRand bitmask, in bit order (bit t = task t).
KUAIRAND_TASKS = ("click", "like", "follow", "comment", "forward", "hate", "long_view", "profile_enter")


@dataclass
class TrainerArgs:
    run_dir: str = "runs/default"
    seed: int = 1234
    max_epochs: int = 1
    max_steps: Optional[int] = None  # total optimizer steps (caps max_epochs; sets the LR schedule length)
    stop_after_steps: Optional[int] = None  # exit (checkpointing) after this global step: simulates an interruption
    # Start from the model and optimizer state of another run: its run directory (the newest checkpoint that
    # verifies) or one of its checkpoints/step_N directories. Only read; --resume with a checkpoint of run_dir wins.
    init_from: Optional[str] = None
    eval_interval_steps: Optional[int] = None  # evaluate every N steps (None: only at epoch ends)
    eval_every_epochs: int = 1  # evaluate every N epochs (0: only at the end)
    eval_split: str = "test"  # "valid" or "test"
    eval_max_batches: Optional[int] = None  # cap evaluation batches (smoke tests)
    log_interval_steps: int = 10
    # None: after every periodic evaluation; N: every N steps; -1: never (the final checkpoint follows
    # save_final_checkpoint either way)
    checkpoint_interval_steps: Optional[int] = None
    keep_last_checkpoints: int = 2
    save_final_checkpoint: bool = True
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    bf16: bool = True  # autocast to bfloat16 on GPU (ignored on CPU)
    # fp16 autocast on GPU with dynamic loss scaling (torch.amp.GradScaler: steps with inf/nan gradients are
    # skipped and halve the scale, loss_scale_growth_interval finite steps in a row double it); needs bf16 = False
    fp16: bool = False
    loss_scale_init: float = 65536.0
    loss_scale_growth_interval: int = 2000
    deterministic: bool = False  # torch.use_deterministic_algorithms + deterministic attention backward
    grad_clip_norm: Optional[float] = None
    progress_bar: bool = True
    tensorboard: bool = True
    plot: bool = True
    compute_baseline: bool = True  # popularity baseline (retrieval) printed next to the final metrics
    num_threads: Optional[int] = None  # torch intra-op threads on CPU (None: torch's default)
    # torch.profiler over this many training steps after 10 warm-up steps: top ops by device and host time go to
    # <run_dir>/profile.txt, the Chrome trace to profile_trace.json (rank 0). 0: off.
    profile_steps: int = 0
    # torch.profiler over the steps with 0-based indices start .. end - 1 of (start, end), written to
    # <run_dir>/profile.txt and profile_trace.json (rank 0); on CUDA also a cudaProfilerStart/Stop range for nsys
    # (the NVIDIA example's profile = True over [profile_step_start, profile_step_end)). None: off.
    profile_range: Optional[Sequence[int]] = None
    # Dense bf16 peak of one GPU in TFLOP/s, for the MFU in the logs. None: from the card's name
    # (hstu/training/flops.py's table; an unknown card logs TFLOP/s without MFU).
    peak_tflops: Optional[float] = None
    # The run's mean throughput (the summary's train_* numbers) leaves out this many first steps of the run
    # (allocator growth, autotuning, lazy initialisation); a log window ends after the last of them.
    throughput_warmup_steps: int = 0
    # The step loop (docs/training.md, "Train pipelines"): "none", our step; "sparse_dist", TorchRec's
    # TrainPipelineSparseDist (the copy of the next batches and the sharded tables' input distribution overlap the
    # step); "prefetch_sparse_dist", TorchRec's PrefetchTrainPipelineSparseDist (also prefetches the next batch's rows
    # into the tables' cache). Same losses in every mode.
    pipeline: str = "none"


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
    causal: bool = True  # False: full attention inside each sequence (ranking only; context/target masks unused)
    # True: the contextual tokens see the whole history and every token sees them; False: plain causal tokens
    contextual_mask: bool = True
    # fused: our CUDA kernels where they apply, else the PyTorch reference; reference: the PyTorch reference;
    # triton: Meta's generative-recommenders Triton kernel (that package installed, CUDA)
    attention_backend: str = "fused"
    # Widths of the item/action tables and of the contextual tables (ranking), each projected to hidden_dim by
    # Linear -> ReLU -> Linear as in the NVIDIA example. None: tables as wide as hidden_dim, no projection.
    item_embedding_width: Optional[int] = None
    contextual_embedding_width: Optional[int] = None
    recompute_layers: Sequence[int] = ()  # layers checkpointed whole: they keep only their input, and run twice
    # Activation memory for time in every layer, with bit-identical results (hstu/modules/hstu_layer.py): the backward
    # keeps the layer input instead of its LayerNorm, uvqk_proj's input (hidden_dim values per token fewer; one
    # LayerNorm more per layer), ...
    recompute_input_norm: bool = False
    # ... and uvqk_proj's pre-activation instead of SiLU's output u, v, q, k (num_heads x (2 v_dim + 2 qk_dim) values
    # per token fewer; one SiLU more per layer). Both are single-device layers only (tensor_model_parallel_size 1).
    recompute_silu: bool = False
    contextual_features: Sequence[str] = ()  # contextual feature names to prepend as tokens; ["*"]: all the dataset has


@dataclass
class EmbeddingArgs:
    init_std: float = 0.02
    item_vocab_size: Optional[int] = None  # None: from the dataset metadata
    item_id_low: Optional[int] = None  # first real item id (None: 1 when metadata says id 0 is unused, else 0)
    # Upper bound on the bytes of all embedding tables of one process (fp32 weights), checked before they are
    # allocated. None: this host's memory (the smaller of physical memory and the cgroup limit) divided by the
    # processes per host (LOCAL_WORLD_SIZE).
    max_embedding_bytes: Optional[int] = None
    # Dynamic tables: {table: "lru" | "lfu"}. Their ids (any int64) are remapped into the table's rows by TorchRec's
    # managed-collision modules, evicting by that policy once the rows are full (the NVIDIA example's
    # DynamicEmbeddingArgs). One process only; not the retrieval item table (it scores every row as an item).
    dynamic_tables: dict = field(default_factory=dict)


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


@dataclass
class RankingArgs:
    task_type: Optional[str] = None  # bitmask | rating (None: from the dataset's action kind)
    task_names: Optional[Sequence[str]] = None  # bitmask tasks in bit order (None: from metadata)
    task_weights: Optional[Sequence[float]] = None
    num_classes: Optional[int] = None  # rating classes (None: from metadata)
    positive_rating_threshold: Optional[int] = None  # rating class >= this counts as positive for AUC (None: top 40%)
    head_hidden_dims: Sequence[int] = (512,)
    head_dropout: float = 0.0
    head_activation: str = "silu"  # silu | relu | gelu, after every hidden layer of the head
    head_bias: bool = True  # biases in the head's Linear layers
    # Per-task evaluation metrics: "AUC" (with GAUC; always reported), "ACC" (bitmask tasks: probability > 0.5 against
    # the bit; rating labels: the most probable class against the rating)
    eval_metrics: Sequence[str] = ("AUC",)


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
    a syntax error, an unknown configurable or field, a value of the wrong type or out of range. A single path or
    binding may be passed as a string.
    """
    if isinstance(config_files, (str, os.PathLike)):
        config_files = [os.fspath(config_files)]
    if isinstance(bindings, str):
        bindings = [bindings]
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
    args = _args_from_bindings(_bound_fields(), config_files)
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
        "TrainerArgs.pipeline": _one_of("none", "sparse_dist", "prefetch_sparse_dist"),
        "DatasetArgs.split_strategy": _one_of("leave_one_out", "user_ratio", "time"),
        "DatasetArgs.truncate": _one_of("recent", "oldest"),
        "NetworkArgs.position_encoding": _one_of("absolute", "reverse", "none"),
        "NetworkArgs.rab_time_reference": _one_of("query", "next"),
        "NetworkArgs.attention_backend": _one_of("fused", "reference", "triton"),
        "OptimizerArgs.optimizer": _one_of("adam", "adamw", "sgd"),
        "OptimizerArgs.decay": _one_of("constant", "linear", "cosine"),
        "RankingArgs.task_type": _one_of("bitmask", "rating"),
        "RankingArgs.head_activation": _one_of("silu", "relu", "gelu"),
    }


# Value rules by field; None values (optional fields left unset) are not checked.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_choice_rules(),
    "TrainerArgs.max_epochs": _at_least(0),
    "TrainerArgs.max_steps": _at_least(1),
    "TrainerArgs.stop_after_steps": _at_least(1),
    "TrainerArgs.init_from": ((lambda v: bool(v)), "a non-empty path"),
    "TrainerArgs.eval_interval_steps": _at_least(0),
    "TrainerArgs.eval_every_epochs": _at_least(0),
    "TrainerArgs.eval_max_batches": _at_least(1),
    "TrainerArgs.log_interval_steps": _at_least(1),
    "TrainerArgs.checkpoint_interval_steps": ((lambda v: v == -1 or v >= 1), "-1 (never) or >= 1"),
    "TrainerArgs.keep_last_checkpoints": _at_least(1),
    "TrainerArgs.grad_clip_norm": _positive(),
    "TrainerArgs.num_threads": _at_least(0),
    "TrainerArgs.profile_steps": _at_least(0),
    "TrainerArgs.profile_range": ((lambda v: len(v) == 2 and 0 <= v[0] < v[1]), "two steps (start, end) with "
                                  "0 <= start < end"),
    "TrainerArgs.peak_tflops": _positive(),
    "TrainerArgs.throughput_warmup_steps": _at_least(0),
    "TrainerArgs.loss_scale_init": _positive(),
    "TrainerArgs.loss_scale_growth_interval": _at_least(1),
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
    "NetworkArgs.item_embedding_width": _at_least(1),
    "NetworkArgs.contextual_embedding_width": _at_least(1),
    "EmbeddingArgs.init_std": _positive(),
    "EmbeddingArgs.item_vocab_size": _at_least(1),
    "EmbeddingArgs.item_id_low": _at_least(0),
    "EmbeddingArgs.max_embedding_bytes": _at_least(1),
    "EmbeddingArgs.dynamic_tables": ((lambda v: all(isinstance(k, str) and k and p in ("lru", "lfu")
                                                    for k, p in v.items())),
                                     "a dict of table name -> 'lru' or 'lfu'"),
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
    "RankingArgs.eval_metrics": ((lambda v: len(v) > 0 and all(m in RANKING_METRICS for m in v)),
                                 "a non-empty list of " + ", ".join(repr(m) for m in ("AUC", "ACC"))),
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
    tp = args.parallelism.tensor_model_parallel_size
    for name in ("recompute_input_norm", "recompute_silu"):
        if getattr(n, name) and tp > 1:
            raise ValueError(f"NetworkArgs.{name}=True needs ParallelismArgs.tensor_model_parallel_size=1, got {tp}: "
                             "the tensor-parallel layers recompute whole layers only (NetworkArgs.recompute_layers)")
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
    t = args.trainer
    if t.fp16 and t.bf16:
        raise ValueError("TrainerArgs.fp16=True and TrainerArgs.bf16=True (its default) exclude each other: set "
                         "TrainerArgs.bf16=False for fp16 training")
    if t.profile_range is not None and t.profile_steps > 0:
        raise ValueError(f"TrainerArgs.profile_range={tuple(t.profile_range)} (the example's profile / "
                         f"profile_step_start / profile_step_end) and TrainerArgs.profile_steps={t.profile_steps} "
                         "both choose the profiled steps: set only one of them")
    if t.init_from:
        source, target = os.path.realpath(t.init_from), os.path.realpath(t.run_dir)
        if source == target or source.startswith(target + os.sep) or target.startswith(source + os.sep):
            raise ValueError(f"TrainerArgs.init_from={t.init_from!r} (the example's ckpt_load_dir) and TrainerArgs."
                             f"run_dir={t.run_dir!r} (ckpt_save_dir) overlap: the run would write where it loads from; "
                             "continue a run with --resume instead, or save into another directory")
    from hstu.modules.attention_backends import check_backend_settings

    check_backend_settings(n.attention_backend, causal=n.causal, relative_attention_bias=n.relative_attention_bias,
                           attention_dropout=n.attention_dropout, target_group_size=n.target_group_size)
    try:  # sharding types, sparse optimizer, backend: the distributed layer's own checks, before any process group
        from hstu.training.distributed import parallelism_settings

        parallelism_settings(args.parallelism, args.optimizer)
    except ValueError as e:
        raise ValueError(f"ParallelismArgs: {e}") from None


# ---- the gin surface: our fields and the NVIDIA recsys-examples HSTU example's fields --------------------------------
# Users arrive with gin files written for NVIDIA's recsys-examples HSTU example (``examples/hstu``), whose argument
# classes share our class names (TrainerArgs, DatasetArgs, ...) but use other field names, and add classes of their
# own (TensorModelParallelArgs, DynamicEmbeddingArgs, BenchmarkDatasetArgs, FeatureArgs, RandomDistribution). gin
# sees one configurable per class name whose parameters are our fields plus the example's; every parameter defaults
# to _UNSET, so calling the configurable tells which fields a config bound. EXAMPLE_FIELDS maps each example field
# onto ours; it is the only place that knows the example's names (docs/migrating.md's table is generated from it).
#
# A config that binds any field that only the example has is read in the example's style: every example field then
# has the example's meaning and default (an unbound one too), names both styles share take the example's meaning
# (RetrievalArgs.num_negatives: negatives drawn from the batch; DatasetArgs.shuffle: default False), and our fields
# that the example has no name for take the example model's values (EXAMPLE_STYLE_DEFAULTS) unless bound.


class NotSupportedYetError(ValueError):
    """A field of the example's argument classes holds a value whose meaning this stack cannot reproduce yet."""


class ExampleDefaultWarning(UserWarning):
    """An unbound example field's default means something this stack does not reproduce; the run uses ours."""


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()
REQUIRED = "required"  # ExampleField.default of a field the example's class has no default for


@dataclass(frozen=True)
class ExampleField:
    """One field of the example's argument classes and the fields of ours it sets."""

    cls: str
    name: str
    hint: Any
    default: Any  # the example's default, or REQUIRED
    ours: tuple[str, ...]  # our fields ("DatasetArgs.batch_size") this field sets; () when it sets none
    differs: str = ""  # what differs from our field(s), for the migration table; "" when the meaning is the same
    # value, example values by "Class.field" -> {our field: value}; None: the value itself for each of ``ours``
    convert: Optional[Callable[[Any, dict], dict]] = None
    # value, example values -> why this stack cannot reproduce the value yet (None: it can)
    unsupported: Optional[Callable[[Any, dict], Optional[str]]] = None
    rule: Optional[tuple[Callable[[Any], bool], str]] = None  # value rule as in _RULES (None values skip it)
    # An unbound field whose default ``unsupported`` rejects warns (ExampleDefaultWarning) unless this is False
    # (for defaults whose difference changes no number).
    warn_default: bool = True

    @property
    def key(self) -> str:
        return f"{self.cls}.{self.name}"


def _when(condition: Callable[[Any], bool], reason: str) -> Callable[[Any, dict], Optional[str]]:
    return lambda value, ex: reason if condition(value) else None


def _tp(ex: dict) -> int:
    return ex.get("TensorModelParallelArgs.tensor_model_parallel_size") or 1


def _example_dataset_dir(path: Optional[str], ex: dict) -> dict:
    """The example's dataset_path is a root with one folder per dataset; None means its default root."""
    name = ex.get("DatasetArgs.dataset_name")
    if not isinstance(name, str):
        return {}
    root = path if path else "data"
    if path and os.path.isfile(os.path.join(path, "metadata.json")):
        return {"DatasetArgs.dataset_dir": path}  # prepared straight into dataset_path
    return {"DatasetArgs.dataset_dir": os.path.join(root, name)}


def _max_train_iters(value: Optional[int], ex: dict) -> dict:
    if value is None:  # the example trains one pass over the data
        return {"TrainerArgs.max_epochs": 1}
    # The example cycles the data until max_train_iters; every epoch has at least one step, so this many epochs
    # always reach max_steps.
    return {"TrainerArgs.max_steps": value, "TrainerArgs.max_epochs": value}


def _checkpoint_interval(value: int, ex: dict) -> dict:
    # The example saves before step N when N * interval > 0 and N % interval == 0: nothing for interval <= 0, and
    # never at the end unless the last step is a multiple of the interval.
    return {"TrainerArgs.checkpoint_interval_steps": value if value > 0 else -1,
            "TrainerArgs.save_final_checkpoint": False}


def _betas(value: float, ex: dict) -> dict:
    return {"OptimizerArgs.betas": (ex["OptimizerArgs.adam_beta1"], ex["OptimizerArgs.adam_beta2"])}


def _dtype(value: str, ex: dict) -> dict:
    return {"TrainerArgs.bf16": value == "bfloat16", "TrainerArgs.fp16": value == "float16"}


_PIPELINE_TYPES = {"none": "none", "native": "sparse_dist", "prefetch": "prefetch_sparse_dist"}  # example -> ours

_KERNEL_BACKENDS = {"cutlass": "fused", "pytorch": "reference", "triton": "triton"}  # example -> ours


def _prediction_head(arch: Optional[Sequence[int]], ex: dict) -> dict:
    """The example's head is arch[:-1] hidden layers and arch[-1] outputs: one per task, or rating classes."""
    if not arch:
        return {}
    tasks = ex.get("RankingArgs.num_tasks", 1)
    out = {"RankingArgs.head_hidden_dims": tuple(arch[:-1])}
    if tasks == 1 and arch[-1] > 1:
        out.update({"RankingArgs.task_type": "rating", "RankingArgs.num_classes": arch[-1]})
    else:
        out["RankingArgs.task_type"] = "bitmask"
        name = ex.get("DatasetArgs.dataset_name")
        if isinstance(name, str) and name.startswith("kuairand"):
            out["RankingArgs.task_names"] = KUAIRAND_TASKS[:tasks]
    return out


def _retrieval_top_k(names: Sequence[str], ex: dict) -> dict:
    ks = sorted({int(n.split("@", 1)[1]) for n in names if "@" in n})
    return {"RetrievalArgs.eval_top_k": tuple(ks)} if ks else {}


def _is_retrieval_metric(name: Any) -> bool:
    """'HR@k', 'NDCG@k' (k >= 1) or 'MRR' / 'MRR@k', as the example's retrieval metric module accepts them."""
    if not isinstance(name, str):
        return False
    kind, at, k = name.upper().partition("@")
    if not at:
        return kind == "MRR"
    return kind in ("HR", "NDCG", "MRR") and k.isdigit() and int(k) >= 1


# The example's ranking metric names (upper-cased), and the ones this stack reports (RANKING_METRICS).
_EXAMPLE_RANKING_METRICS = ("AUC", "ACC", "RECALL", "PRECISION", "F1SCORE", "AVERAGE PRECISION", "NDCG", "HR")


def _ranking_metrics_not_yet(names: Sequence[str], ex: dict) -> Optional[str]:
    missing = [m for m in names if m.upper() not in RANKING_METRICS]
    if not missing:
        return None
    return (f"RankingArgs.eval_metrics {missing}" + _NOT_YET + " (ranking reports 'AUC' with GAUC and 'ACC'; 'NDCG' / "
            "'HR' are retrieval metrics: RetrievalArgs.eval_metrics)")


_SHARED_WITH_OURS = "same field and meaning"
_NOT_YET = " is not supported yet"

EXAMPLE_FIELDS: tuple[ExampleField, ...] = (
    # TrainerArgs
    ExampleField("TrainerArgs", "train_batch_size", int, REQUIRED, ("DatasetArgs.batch_size",),
                 "per GPU; with tensor parallelism a TP group trains on train_batch_size x TP samples (ours: the "
                 "ranks of a TP group share one batch), so batch_size = train_batch_size x tensor_model_parallel_size",
                 lambda v, ex: {"DatasetArgs.batch_size": v * _tp(ex)}, rule=_at_least(1)),
    ExampleField("TrainerArgs", "eval_batch_size", int, REQUIRED, ("DatasetArgs.eval_batch_size",),
                 "per GPU, times tensor_model_parallel_size as train_batch_size",
                 lambda v, ex: {"DatasetArgs.eval_batch_size": v * _tp(ex)}, rule=_at_least(1)),
    ExampleField("TrainerArgs", "eval_interval", int, 100, ("TrainerArgs.eval_interval_steps",),
                 "evaluation only every eval_interval steps (eval_every_epochs = 0); 0: no periodic evaluation (the "
                 "example then divides by zero after training); ours also evaluates at the end",
                 lambda v, ex: {"TrainerArgs.eval_interval_steps": v if v > 0 else None}, rule=_at_least(0)),
    ExampleField("TrainerArgs", "log_interval", int, 100, ("TrainerArgs.log_interval_steps",),
                 "same meaning; >= 1 (the example divides by it)", rule=_at_least(1)),
    ExampleField("TrainerArgs", "max_train_iters", Optional[int], None,
                 ("TrainerArgs.max_steps", "TrainerArgs.max_epochs"),
                 "None: one pass over the training data (max_epochs = 1); a number: that many steps, cycling the data",
                 _max_train_iters, rule=_at_least(1)),
    ExampleField("TrainerArgs", "max_eval_iters", Optional[int], None, ("TrainerArgs.eval_max_batches",),
                 rule=_at_least(1)),
    ExampleField("TrainerArgs", "seed", int, 1234, ("TrainerArgs.seed",), _SHARED_WITH_OURS),
    ExampleField("TrainerArgs", "profile", bool, False, ("TrainerArgs.profile_range",),
                 "True: torch.profiler over the steps with 0-based indices profile_step_start .. profile_step_end - 1 "
                 "(profile.txt and profile_trace.json in the run directory, rank 0), on CUDA also the example's "
                 "cudaProfilerStart/Stop range (nsys --capture-range=cudaProfilerApi); ours without it: "
                 "TrainerArgs.profile_steps", lambda v, ex: {"TrainerArgs.profile_range": (
                     ex["TrainerArgs.profile_step_start"], ex["TrainerArgs.profile_step_end"])} if v else {}),
    ExampleField("TrainerArgs", "profile_step_start", int, 100, ("TrainerArgs.profile_range",),
                 "profile_range[0]; used only with profile=True", lambda v, ex: {}, rule=_at_least(0)),
    ExampleField("TrainerArgs", "profile_step_end", int, 200, ("TrainerArgs.profile_range",),
                 "profile_range[1]; used only with profile=True", lambda v, ex: {}, rule=_at_least(0)),
    ExampleField("TrainerArgs", "ckpt_save_interval", int, -1,
                 ("TrainerArgs.checkpoint_interval_steps", "TrainerArgs.save_final_checkpoint"),
                 "-1 (any value <= 0): no checkpoint at all (checkpoint_interval_steps = -1); N: every N steps and "
                 "none at the end (as the example)", _checkpoint_interval),
    ExampleField("TrainerArgs", "ckpt_save_dir", Optional[str], None, ("TrainerArgs.run_dir",),
                 "becomes the run directory: checkpoints go to <ckpt_save_dir>/checkpoints/step_N in our format "
                 "(logs and config.json beside them); unbound (the example: ./checkpoints): runs/<config name>",
                 lambda v, ex: {"TrainerArgs.run_dir": v} if v is not None else {}, rule=((lambda v: bool(v)), "a non-empty path")),
    ExampleField("TrainerArgs", "ckpt_load_dir", str, "", ("TrainerArgs.init_from",),
                 "a run directory (its newest checkpoint that verifies) or one of its checkpoints/step_N: model and "
                 "optimizer state from there, step, data order and random streams afresh (as the example); only "
                 "read, never inside ckpt_save_dir (continue a run there with --resume)",
                 lambda v, ex: {"TrainerArgs.init_from": v} if v else {}),
    ExampleField("TrainerArgs", "pipeline_type", str, "native", ("TrainerArgs.pipeline",),
                 "TorchRec's own train pipelines: 'none' -> 'none' (our step), 'native' -> 'sparse_dist' "
                 "(TrainPipelineSparseDist), 'prefetch' -> 'prefetch_sparse_dist' (PrefetchTrainPipelineSparseDist; "
                 "the example also switches its model-parallel tables to FBGEMM's UVM cache, ours keeps the tables' "
                 "kernel); same losses in every mode",
                 lambda v, ex: {"TrainerArgs.pipeline": _PIPELINE_TYPES[v]},
                 rule=_one_of(*_PIPELINE_TYPES)),
    ExampleField("TrainerArgs", "enable_balanced_shuffler", bool, False, ("DatasetArgs.balance_workload",),
                 "ours balances sum(L^2) per rank (longest processing time first) over the whole shard"),
    # DatasetArgs
    ExampleField("DatasetArgs", "dataset_name", str, REQUIRED, ("DatasetArgs.dataset_name",), _SHARED_WITH_OURS,
                 rule=_one_of("ml-1m", "ml-20m", "kuairand-pure", "kuairand-1k", "kuairand-27k", "synthetic")),
    ExampleField("DatasetArgs", "max_history_seqlen", int, REQUIRED, ("DatasetArgs.max_seqlen",), rule=_at_least(1)),
    ExampleField("DatasetArgs", "dataset_path", Optional[str], None, ("DatasetArgs.dataset_dir",),
                 "a root holding one folder per dataset: dataset_dir = <dataset_path>/<dataset_name> (or "
                 "dataset_path itself when it holds metadata.json); None: data/<dataset_name>, where the "
                 "`python -m hstu.data prepare <dataset_name> --out-dir data/<dataset_name>` of our docs writes",
                 _example_dataset_dir),
    ExampleField("DatasetArgs", "max_num_candidates", int, 0, ("DatasetArgs.num_candidates",), rule=_at_least(0)),
    ExampleField("DatasetArgs", "shuffle", bool, False, ("DatasetArgs.shuffle",),
                 "same meaning; the example's default is False (ours: True)"),
    # NetworkArgs
    ExampleField("NetworkArgs", "num_layers", int, REQUIRED, ("NetworkArgs.num_layers",), _SHARED_WITH_OURS,
                 rule=_at_least(1)),
    ExampleField("NetworkArgs", "hidden_size", int, REQUIRED, ("NetworkArgs.hidden_dim",), rule=_at_least(1)),
    ExampleField("NetworkArgs", "num_attention_heads", int, REQUIRED, ("NetworkArgs.num_heads",), rule=_at_least(1)),
    ExampleField("NetworkArgs", "kv_channels", int, REQUIRED, ("NetworkArgs.qk_dim", "NetworkArgs.v_dim"),
                 "one per-head width for queries/keys and values", rule=_at_least(1)),
    ExampleField("NetworkArgs", "hidden_dropout", float, 0.2, ("NetworkArgs.dropout", "NetworkArgs.input_dropout"),
                 "the example applies it in the layers and to the input embeddings", rule=_fraction()),
    ExampleField("NetworkArgs", "norm_epsilon", float, 1e-5, ("NetworkArgs.layer_norm_eps",),
                 "default 1e-5 (ours: 1e-6)", rule=_positive()),
    ExampleField("NetworkArgs", "is_causal", bool, True, ("NetworkArgs.causal",),
                 "False: full attention inside each sequence (the contextual and candidate masks play no part); "
                 "ranking only (a retrieval position would see the item it predicts)"),
    ExampleField("NetworkArgs", "dtype_str", str, "bfloat16", ("TrainerArgs.bf16", "TrainerArgs.fp16"),
                 "'bfloat16': bf16 autocast on GPU; 'float16': fp16 autocast with dynamic loss scaling (torch.amp."
                 "GradScaler; the example uses Megatron's scaler, initial scale 2^32, window 1000); GPU only, one "
                 "process with unsharded tables (the scaler must be able to skip every update)",
                 _dtype, rule=_one_of("bfloat16", "float16")),
    ExampleField("NetworkArgs", "kernel_backend", str, "cutlass", ("NetworkArgs.attention_backend",),
                 "'cutlass': our fused CUDA kernels ('fused'; the PyTorch reference where they do not apply, e.g. on "
                 "CPU); 'pytorch': the PyTorch reference ('reference'); 'triton': Meta's generative-recommenders "
                 "Triton kernel when that package is installed (CUDA; causal, no relative bias / attention dropout / "
                 "target groups; the example falls back to PyTorch for non-causal, ours refuses)",
                 lambda v, ex: {"NetworkArgs.attention_backend": _KERNEL_BACKENDS[v.lower()]},
                 rule=((lambda v: v.lower() in ("cutlass", "triton", "pytorch")), "one of 'cutlass', 'triton', "
                                                                                 "'pytorch'")),
    ExampleField("NetworkArgs", "target_group_size", int, 1, ("NetworkArgs.target_group_size",), _SHARED_WITH_OURS,
                 rule=_at_least(1)),
    ExampleField("NetworkArgs", "num_position_buckets", int, 8192, (),
                 "ours sizes the position table to the longest sequence (reverse positions, as the example); the "
                 "same while 2 x (max_history_seqlen + max_num_candidates) <= num_position_buckets",
                 unsupported=lambda v, ex: (
                     f"NetworkArgs.num_position_buckets={v} below the 2 x (DatasetArgs.max_history_seqlen + "
                     f"DatasetArgs.max_num_candidates) = {2 * (ex['DatasetArgs.max_history_seqlen'] + ex['DatasetArgs.max_num_candidates'])} "
                     "tokens (positions clamped to the table)" + _NOT_YET)
                 if isinstance(ex.get("DatasetArgs.max_history_seqlen"), int)
                 and 2 * (ex["DatasetArgs.max_history_seqlen"] + ex["DatasetArgs.max_num_candidates"]) > v else None,
                 rule=_at_least(1)),
    *(ExampleField("NetworkArgs", name, bool, False, (f"NetworkArgs.{ours}",),
                   f"same meaning: the backward recomputes {what} instead of keeping it (bit-identical results); "
                   "tensor_model_parallel_size 1 only (the example's also under tensor parallelism)",
                   unsupported=lambda v, ex, name=name: f"NetworkArgs.{name}=True with TensorModelParallelArgs."
                   f"tensor_model_parallel_size={_tp(ex)}" + _NOT_YET if v and _tp(ex) > 1 else None)
      for name, ours, what in (("recompute_input_layernorm", "recompute_input_norm", "the input LayerNorm's output"),
                               ("recompute_input_silu", "recompute_silu", "the SiLU's output u, v, q, k"))),
    ExampleField("NetworkArgs", "item_embedding_dim", int, -1, ("NetworkArgs.item_embedding_width",),
                 "-1 (<= 0): item and action tables as wide as hidden_size (ours: None); > 0: tables of that width "
                 "projected to hidden_size by Linear -> ReLU -> Linear; ranking only (retrieval refuses it, as the "
                 "example)", lambda v, ex: {"NetworkArgs.item_embedding_width": v} if v > 0 else {}),
    ExampleField("NetworkArgs", "contextual_embedding_dim", int, -1, ("NetworkArgs.contextual_embedding_width",),
                 "as item_embedding_dim, for the contextual tables",
                 lambda v, ex: {"NetworkArgs.contextual_embedding_width": v} if v > 0 else {}),
    ExampleField("NetworkArgs", "scaling_seqlen", int, -1, ("NetworkArgs.scaling_seqlen",),
                 "-1: the longest sequence of each batch; ours: the static maximum token count (a number: the same)",
                 lambda v, ex: {"NetworkArgs.scaling_seqlen": v if v > 0 else None},
                 _when(lambda v: v <= 0, "NetworkArgs.scaling_seqlen=-1 (scaling by the longest sequence of each "
                                         "batch)" + _NOT_YET + "; the static maximum token count is used")),
    ExampleField("NetworkArgs", "embedding_backend", Optional[str], None, (),
                 unsupported=_when(lambda v: v is not None, "NetworkArgs.embedding_backend" + _NOT_YET)),
    ExampleField("NetworkArgs", "disable_contextual_mask", bool, False, ("NetworkArgs.contextual_mask",),
                 "True: the contextual tokens are plain causal tokens (our contextual_mask = False)",
                 lambda v, ex: {"NetworkArgs.contextual_mask": not v}),
    # OptimizerArgs
    ExampleField("OptimizerArgs", "optimizer_str", str, REQUIRED, ("OptimizerArgs.optimizer",),
                 "the example's optimizer for the dense and the embedding parameters",
                 rule=_one_of("adam", "sgd")),
    ExampleField("OptimizerArgs", "learning_rate", float, REQUIRED, ("OptimizerArgs.learning_rate",),
                 _SHARED_WITH_OURS, rule=_positive()),
    ExampleField("OptimizerArgs", "adam_beta1", float, 0.9, ("OptimizerArgs.betas",), "betas[0]", _betas,
                 rule=_fraction()),
    ExampleField("OptimizerArgs", "adam_beta2", float, 0.999, ("OptimizerArgs.betas",),
                 "betas[1]; the example's default is 0.999 (ours: 0.98)", _betas, rule=_fraction()),
    ExampleField("OptimizerArgs", "adam_eps", float, 1e-8, ("OptimizerArgs.eps",), rule=_positive()),
    # TensorModelParallelArgs
    ExampleField("TensorModelParallelArgs", "tensor_model_parallel_size", int, 1,
                 ("ParallelismArgs.tensor_model_parallel_size",), "also multiplies the batch sizes (see "
                 "train_batch_size)", rule=_at_least(1)),
    # RankingArgs
    ExampleField("RankingArgs", "prediction_head_arch", Optional[Sequence[int]], REQUIRED,
                 ("RankingArgs.head_hidden_dims", "RankingArgs.task_type", "RankingArgs.num_classes",
                  "RankingArgs.task_names"),
                 "hidden widths then the output count: num_tasks binary tasks (KuaiRand bits in order), or with "
                 "num_tasks = 1 and a last entry > 1 that many rating classes (cross-entropy); ours puts a "
                 "LayerNorm before the head", _prediction_head,
                 rule=((lambda v: len(v) >= 1 and all(w >= 1 for w in v)), "a non-empty list of widths >= 1")),
    ExampleField("RankingArgs", "prediction_head_act_type", str, "relu", ("RankingArgs.head_activation",),
                 "same meaning (our default: 'silu')", lambda v, ex: {"RankingArgs.head_activation": v.lower()},
                 rule=((lambda v: v.lower() in ("relu", "gelu")), "one of 'relu', 'gelu'")),
    ExampleField("RankingArgs", "prediction_head_bias", bool, True, ("RankingArgs.head_bias",),
                 "same meaning (ours keeps the LayerNorm's bias)"),
    ExampleField("RankingArgs", "num_tasks", int, 1, (), "see prediction_head_arch", rule=_at_least(1)),
    ExampleField("RankingArgs", "eval_metrics", Sequence[str], ("AUC",), ("RankingArgs.eval_metrics",),
                 "'AUC' (with GAUC) and 'ACC', per task (AUC/GAUC always); 'RECALL', 'PRECISION', 'F1Score', "
                 "'AVERAGE PRECISION' are not supported yet, nor 'NDCG' / 'HR' (retrieval metrics)",
                 lambda v, ex: {"RankingArgs.eval_metrics": tuple(dict.fromkeys(m.upper() for m in v))},
                 _ranking_metrics_not_yet,
                 rule=((lambda v: len(v) > 0 and all(m.upper() in _EXAMPLE_RANKING_METRICS for m in v)),
                       "a non-empty list of " + ", ".join(repr(m) for m in _EXAMPLE_RANKING_METRICS))),
    # RetrievalArgs
    ExampleField("RetrievalArgs", "num_negatives", int, -1,
                 ("RetrievalArgs.num_in_batch_negatives", "RetrievalArgs.num_negatives"),
                 "negatives drawn from the batch's deduplicated positive items (our num_in_batch_negatives; ours "
                 "draws one set per batch, the example one per position); in a config in our style the same name "
                 "means negatives drawn uniformly from the catalogue; -1 (unset) keeps our default",
                 lambda v, ex: {"RetrievalArgs.num_in_batch_negatives": v, "RetrievalArgs.num_negatives": 0}
                 if v > 0 else {},
                 rule=((lambda v: v == -1 or v >= 1), "-1 (unset) or >= 1")),
    ExampleField("RetrievalArgs", "eval_metrics", Sequence[str], ("HR@10", "NDCG@10"), ("RetrievalArgs.eval_top_k",),
                 "the cut-offs k of the HR@k / NDCG@k names; ours reports MRR, HR@k and NDCG@k for each k",
                 _retrieval_top_k,
                 rule=((lambda v: len(v) > 0 and all(_is_retrieval_metric(m) for m in v)),
                       "a non-empty list of 'HR@k', 'NDCG@k' or 'MRR'")),
    # EmbeddingArgs / DynamicEmbeddingArgs: per-table, used by the example only through BenchmarkDatasetArgs
    *(ExampleField(cls, name, hint, default, ours, note, rule=rule)
      for cls in ("EmbeddingArgs", "DynamicEmbeddingArgs")
      for name, hint, default, ours, note, rule in (
          ("feature_names", Sequence[str], REQUIRED, (),
           "the feature this table of BenchmarkDatasetArgs.embedding_args serves (one per table; a table shared by "
           "several features is not supported yet)", ((lambda v: len(v) > 0), "a non-empty list of names")),
          ("table_name", str, REQUIRED, (), "names the table in errors (ours names each table by its feature)", None),
          ("item_vocab_size_or_capacity", int, REQUIRED,
           ("DatasetArgs.synthetic_options", "EmbeddingArgs.item_vocab_size"),
           "rows of the table: the item table sets the generated catalogue (items 1..rows - 1), a contextual "
           "table its feature's vocabulary; the action table's rows come from the generated labels (ranking: 256, "
           "retrieval: 5)", _at_least(1)),
          ("sharding_type", str, REQUIRED if cls == "EmbeddingArgs" else "model_parallel",
           ("ParallelismArgs.embedding_sharding",),
           "'data_parallel': that table replicated (embedding_sharding[feature]); 'model_parallel': the TorchRec "
           "planner's choice", _one_of("data_parallel", "model_parallel")))),
    *(ExampleField("DynamicEmbeddingArgs", name, hint, default, ours, note, rule=rule)
      for name, hint, default, ours, note, rule in (
          ("global_hbm_for_values", Optional[int], None, (),
           "GPU memory of the example's dynamic table (the rest on the host); ours keeps the whole table (capacity "
           "rows) in device memory, so this, item_vocab_gpu_capacity(_ratio), caching and dist_type change nothing "
           "here", _at_least(0)),
          ("item_vocab_gpu_capacity", Optional[float], None, (), "as global_hbm_for_values", _finite(0.0)),
          ("item_vocab_gpu_capacity_ratio", Optional[float], None, (), "as global_hbm_for_values", _finite(0.0)),
          ("evict_strategy", str, "lru", ("EmbeddingArgs.dynamic_tables",),
           "the table's ids, any int64, are remapped into its capacity rows by TorchRec's managed-collision module "
           "(MCHManagedCollisionModule), evicting least recently / least frequently used ids once the rows are full "
           "(dynamic_tables[feature]); one process only, ranking only for the item table; the generated data draws "
           "the table's ids from 1..capacity - 1 (the example: any int64)",
           ((lambda v: v.lower() in ("lru", "lfu")), "one of 'lru', 'lfu'")),
          ("caching", bool, False, (), "as global_hbm_for_values", None),
          ("dist_type", str, "roundrobin", (), "as global_hbm_for_values",
           _one_of("continuous", "roundrobin", "hash_roundrobin")))),
    # BenchmarkDatasetArgs / FeatureArgs / RandomDistribution: the example's random benchmark data, generated by our
    # synthetic generator in the same layout (hstu/training/example_benchmark.py)
    *(ExampleField("BenchmarkDatasetArgs", name, hint, default, ours, note, rule=rule)
      for name, hint, default, ours, note, rule in (
          ("feature_args", Sequence[Any], REQUIRED,
           ("DatasetArgs.dataset_name", "DatasetArgs.dataset_dir", "DatasetArgs.prepare_if_missing",
            "DatasetArgs.synthetic_options", "DatasetArgs.max_seqlen"),
           "the layout of a synthetic dataset generated on first use into data/benchmark-<hash of its options> "
           "(dataset_name 'synthetic', prepare_if_missing); excludes DatasetArgs' dataset_name / "
           "max_history_seqlen / dataset_path / max_num_candidates", None),
          ("embedding_args", Sequence[Any], REQUIRED, ("DatasetArgs.synthetic_options",
                                                       "ParallelismArgs.embedding_sharding"),
           "one EmbeddingArgs / DynamicEmbeddingArgs per feature used", None),
          ("item_feature_name", str, REQUIRED, ("DatasetArgs.synthetic_options",),
           "the item sequence: its FeatureArgs gives the lengths, its table the catalogue", None),
          ("contextual_feature_names", Sequence[str], REQUIRED,
           ("DatasetArgs.synthetic_options", "NetworkArgs.contextual_features"),
           "one generated contextual feature per name (one value per sample, ids uniform over its table)", None),
          ("action_feature_name", Optional[str], None, (),
           "must share the item's FeatureArgs; ranking labels are the generated 8-task action bits "
           "(RankingArgs.task_names: the first num_tasks), retrieval's actions are ratings", None),
          ("max_num_candidates", int, 0, ("DatasetArgs.num_candidates", "DatasetArgs.max_seqlen"),
           "the last candidates of each sequence; 0 with ranking (the example labels every item): the last item is "
           "the one candidate, so a sample has one token fewer", _at_least(0)),
          ("num_generated_batches", int, 100,
           ("DatasetArgs.synthetic_options", "DatasetArgs.split_strategy", "DatasetArgs.train_ratio"),
           "train_batch_size x num_generated_batches training users then eval_batch_size x num_generated_batches "
           "evaluation users (user_ratio split), shared by the data-parallel ranks; needs max_train_iters and "
           "max_eval_iters, as the example", _at_least(1)))),
    *(ExampleField("FeatureArgs", name, hint, default, (), note, rule=rule)
      for name, hint, default, note, rule in (
          ("feature_names", Sequence[str], REQUIRED, "features sharing one sequence length (item and action)",
           ((lambda v: len(v) > 0), "a non-empty list of names")),
          ("max_sequence_length", int, REQUIRED, "item feature: the sequence length (history + candidates); "
           "contextual features: 1", _at_least(1)),
          ("is_jagged", bool, False, "False: every sequence max_sequence_length long; True: lengths from seqlen_dist "
           "(unset: uniform over 1..max_sequence_length - 1; the example also draws empty ones)", None),
          ("seqlen_dist", Any, None, "the item sequence's length distribution (SyntheticConfig.length_distribution "
           "of the same name)", None),
          ("value_dists", Optional[dict], None, "the item feature's only: 'zipf' sets the generator's popularity "
           "exponent, 'uniform' (the default) none; item ids keep the generator's topic structure", None))),
    *(ExampleField("RandomDistribution", name, hint, default, (), note, rule=rule)
      for name, hint, default, note, rule in (
          ("dist_type", str, REQUIRED, "sequence lengths: all four; item values: 'zipf' or 'uniform'",
           _one_of("uniform", "normal", "zipf", "lognormal")),
          ("low", int, 0, "lower bound (lengths at least 1)", _at_least(0)),
          ("high", Optional[int], None, "upper bound (uniform: exclusive); lengths: at most max_sequence_length",
           _at_least(0)),
          ("mean", Optional[float], None, "normal / lognormal: the mean length", _finite()),
          ("std", Optional[float], None, "normal / lognormal: the standard deviation of the lengths (lognormal "
           "default: mean / 2)", _finite(0.0)),
          ("alpha", Optional[float], None, "zipf exponent (default 1.5)",
           ((lambda v: math.isfinite(v) and v > 1.0), "a finite number > 1")))),
)

# Example classes that hold per-table / benchmark settings, reached only through BenchmarkDatasetArgs references.
_SCOPED_EXAMPLE_CLASSES = ("DynamicEmbeddingArgs", "FeatureArgs", "RandomDistribution")

# Our fields that the example has no name for, set to what the example's model does when a config is in its style.
EXAMPLE_STYLE_DEFAULTS: dict[str, Any] = {
    "NetworkArgs.position_encoding": "reverse",  # the example's position embedding counts back from the last item
    "NetworkArgs.relative_attention_bias": False,  # the example's layers have no relative attention bias
    "NetworkArgs.num_time_buckets": 0,  # no time encoding
    "NetworkArgs.attention_dropout": 0.0,
    "TrainerArgs.eval_every_epochs": 0,  # evaluation only every eval_interval steps
    "DatasetArgs.split_strategy": "user_ratio",  # the first 70% of the users train, the others are evaluated
    "DatasetArgs.train_ratio": 0.7,
    "NetworkArgs.contextual_features": ("*",),  # the example feeds every contextual feature its dataset has
}

_EXAMPLE_BY_KEY = {f.key: f for f in EXAMPLE_FIELDS}
_OUR_CLASSES = {cls.__name__: cls for cls in ARG_CLASSES}


def _surface_classes() -> dict[str, type]:
    """One gin configurable per class name: our fields plus the example's, every one defaulting to _UNSET."""
    names: dict[str, list[str]] = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _OUR_CLASSES.items()}
    for f in EXAMPLE_FIELDS:
        fields_of = names.setdefault(f.cls, [])
        if f.name not in fields_of:
            fields_of.append(f.name)
    surfaces = {}
    for name, field_names in names.items():
        surface = dataclasses.make_dataclass(
            name, [(n, Any, field(default=_UNSET)) for n in field_names], namespace={"__module__": __name__})
        surfaces[name] = gin.configurable(name, module="hstu")(surface)
    return surfaces


_SURFACES = _surface_classes()


def _explicit(instance: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(instance).items() if v is not _UNSET}


def _bound_fields() -> dict[str, dict[str, Any]]:
    """The fields each (unscoped) configurable was bound, by class name; nested example objects as dicts."""
    return {name: _explicit(surface()) for name, surface in _SURFACES.items()}


def _is_example_only(cls: str, name: str) -> bool:
    ours = _OUR_CLASSES.get(cls)
    return ours is None or name not in {f.name for f in dataclasses.fields(ours)}


def _args_from_bindings(bound: dict[str, dict[str, Any]], config_files: Sequence[str] = ()) -> AllArgs:
    example_style = any(_is_example_only(cls, name) for cls, fields_ in bound.items() for name in fields_
                        if not (cls == "EmbeddingArgs" and name in _PER_TABLE_FIELDS))
    # Per-table example fields bound without a scope are defaults for the scoped tables, not settings of ours.
    ours_bound = {f"{cls}.{name}": value for cls, fields_ in bound.items() if cls in _OUR_CLASSES
                  for name, value in fields_.items() if not _is_example_only(cls, name)
                  and not (example_style and f"{cls}.{name}" in _EXAMPLE_BY_KEY)}
    if example_style:
        values = _example_values(bound)
        ours_bound = _apply_example_fields(bound, values, ours_bound)
        if values["TrainerArgs.ckpt_save_dir"] is None and "TrainerArgs.run_dir" not in ours_bound and config_files:
            # One run directory per example config, so that two of them do not meet in our default one.
            stem = os.path.splitext(os.path.basename(config_files[-1]))[0]
            ours_bound["TrainerArgs.run_dir"] = os.path.join("runs", stem)
    args = AllArgs(TrainerArgs(), DatasetArgs(), NetworkArgs(), EmbeddingArgs(), OptimizerArgs(), RetrievalArgs(),
                   RankingArgs(), ParallelismArgs())
    groups = {type(getattr(args, f.name)).__name__: getattr(args, f.name) for f in dataclasses.fields(args)}
    for key, value in ours_bound.items():
        cls, name = key.split(".", 1)
        setattr(groups[cls], name, value)
    return args


_PER_TABLE_FIELDS = ("feature_names", "table_name", "item_vocab_size_or_capacity", "sharding_type")


def _example_values(bound: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every example field's value (bound or the example's default), type- and value-checked."""
    values: dict[str, Any] = {}
    for f in EXAMPLE_FIELDS:
        if f.cls in _SCOPED_EXAMPLE_CLASSES or f.cls == "BenchmarkDatasetArgs" or \
                (f.cls == "EmbeddingArgs" and f.name in _PER_TABLE_FIELDS):
            continue
        if f.name in bound.get(f.cls, {}):
            values[f.key] = _checked_example_value(f, bound[f.cls][f.name])
        elif f.default is not REQUIRED:
            values[f.key] = f.default
    return values


def _checked_example_value(f: ExampleField, value: Any) -> Any:
    if f.key == "TrainerArgs.max_train_iters" and isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # the example accepts the count as a string too
    value = _checked_type(value, f.hint, f.key)
    if f.rule is not None and value is not None:
        check, requirement = f.rule
        if not check(value):
            raise ValueError(f"{f.key} must be {requirement}, got {value!r}")
    return value


def _apply_example_fields(bound: dict[str, dict[str, Any]], values: dict[str, Any],
                          ours_bound: dict[str, Any]) -> dict[str, Any]:
    """Our field values for a config in the example's style: our bindings over the example's, over its defaults."""
    benchmark = _benchmark_data(bound, values)
    explicit_example = {f"{cls}.{name}" for cls, fields_ in bound.items() for name in fields_
                        if f"{cls}.{name}" in _EXAMPLE_BY_KEY}
    # An example field and one of ours that set the same setting cannot both be bound (a shared name is one field).
    for key in sorted(explicit_example):
        for target in _EXAMPLE_BY_KEY[key].ours:
            if target != key and target in ours_bound:
                raise ValueError(f"{key} (the NVIDIA example's name) and {target} (ours) both set {target}: bind "
                                 "only one of them")
    profile_start, profile_end = values["TrainerArgs.profile_step_start"], values["TrainerArgs.profile_step_end"]
    if values["TrainerArgs.profile"] and profile_start >= profile_end:
        raise ValueError(f"TrainerArgs.profile_step_start={profile_start} must be < "
                         f"TrainerArgs.profile_step_end={profile_end}")
    tasks, arch = values["RankingArgs.num_tasks"], values.get("RankingArgs.prediction_head_arch")
    if arch and tasks > 1 and arch[-1] != tasks:
        raise ValueError(f"RankingArgs.prediction_head_arch ends in {arch[-1]} outputs but RankingArgs.num_tasks="
                         f"{tasks}: the last entry is the number of tasks")
    out = dict(EXAMPLE_STYLE_DEFAULTS)
    for f in EXAMPLE_FIELDS:
        if f.key not in values:
            continue
        value = values[f.key]
        reason = f.unsupported(value, values) if f.unsupported is not None else None
        if reason is not None:
            if f.key in explicit_example:
                raise NotSupportedYetError(reason)
            if f.warn_default and _class_in_use(f.cls, explicit_example):
                warnings.warn(f"{f.key} is unbound; the NVIDIA example's default {f.default!r} means: {reason}. "
                              "This run uses our behaviour", ExampleDefaultWarning, stacklevel=4)
            continue
        if f.convert is not None:
            out.update(f.convert(value, values))
        else:
            out.update({target: value for target in f.ours})
    for key in sorted(benchmark):
        if key in ours_bound:
            raise ValueError(f"BenchmarkDatasetArgs (the NVIDIA example's random benchmark data) and {key} (ours) both "
                             f"set {key}: bind only one of them")
    out.update(benchmark)
    out.update(ours_bound)
    return out


def _class_in_use(cls: str, explicit_example: set[str]) -> bool:
    return any(key.startswith(cls + ".") for key in explicit_example)


def _benchmark_data(bound: dict[str, dict[str, Any]], values: dict[str, Any]) -> dict[str, Any]:
    """BenchmarkDatasetArgs and the objects it references, checked, as our fields (hstu/training/example_benchmark.py);
    {} when it is not bound."""
    benchmark = bound.get("BenchmarkDatasetArgs", {})
    if not benchmark:
        return {}
    benchmark = _with_example_defaults("BenchmarkDatasetArgs", _check_example_object("BenchmarkDatasetArgs", benchmark))
    features = []
    for item in benchmark["feature_args"]:
        feature = _with_example_defaults("FeatureArgs", _check_example_object("FeatureArgs", item))
        if feature["seqlen_dist"] is not None:
            feature["seqlen_dist"] = _example_distribution(feature["seqlen_dist"])
        feature["value_dists"] = {name: _example_distribution(dist)
                                  for name, dist in dict(feature["value_dists"] or {}).items()}
        features.append(feature)
    tables = []
    for item in benchmark["embedding_args"]:
        cls = type(item).__name__
        if cls not in ("EmbeddingArgs", "DynamicEmbeddingArgs"):
            raise TypeError(f"BenchmarkDatasetArgs.embedding_args entries must be @EmbeddingArgs() or "
                            f"@DynamicEmbeddingArgs() references, got {cls} {item!r}")
        tables.append((cls, _with_example_defaults(cls, _check_example_object(cls, item))))
    source = sorted(f"DatasetArgs.{name}" for name in bound.get("DatasetArgs", {})
                    if name in ("dataset_name", "max_history_seqlen", "dataset_path", "max_num_candidates"))
    if source:
        raise ValueError(f"BenchmarkDatasetArgs (random benchmark data) and {source[0]} (a prepared dataset) both "
                         "choose the training data: bind only one of them")
    from hstu.training.example_benchmark import benchmark_dataset_fields

    return benchmark_dataset_fields(benchmark, features, tables, values,
                                    ranking="RankingArgs.prediction_head_arch" in values)


def _with_example_defaults(cls: str, fields_: dict[str, Any]) -> dict[str, Any]:
    out = {f.name: f.default for f in EXAMPLE_FIELDS if f.cls == cls and f.default is not REQUIRED}
    out.update(fields_)
    return out


def _example_distribution(dist: Any) -> dict[str, Any]:
    return _with_example_defaults("RandomDistribution", _check_example_object("RandomDistribution", dist))


def _check_example_object(cls: str, obj: Any) -> dict[str, Any]:
    """A referenced example object (``@scope/FeatureArgs()``): the fields it was bound, checked; REQUIRED ones present."""
    if not (dataclasses.is_dataclass(obj) and type(obj).__name__ in _SURFACES) and not isinstance(obj, dict):
        raise TypeError(f"{cls} entries must be @{cls}() references, got {type(obj).__name__} {obj!r}")
    fields_ = obj if isinstance(obj, dict) else _explicit(obj)
    cls = cls if isinstance(obj, dict) else type(obj).__name__
    for f in EXAMPLE_FIELDS:
        if f.cls != cls:
            continue
        if f.name in fields_:
            _checked_example_value(f, fields_[f.name])
        elif f.default is REQUIRED:
            raise ValueError(f"{cls}.{f.name} is required (a field without default in the NVIDIA example)")
    ours = {f.name for f in EXAMPLE_FIELDS if f.cls == cls}
    unknown = sorted(set(fields_) - ours)
    if unknown:
        raise ValueError(f"{cls}.{unknown[0]} is not a field of the NVIDIA example's per-table {cls}")
    return fields_


def example_field_table() -> str:
    """The markdown table of every example field -> our field(s) and what differs (docs/migrating.md)."""
    rows = ["| example field | example default | our field(s) | what differs |", "|---|---|---|---|"]
    for f in EXAMPLE_FIELDS:
        default = "required" if f.default is REQUIRED else f"`{f.default!r}`"
        ours = ", ".join(f"`{o}`" for o in f.ours) or "—"
        rows.append(f"| `{f.key}` | {default} | {ours} | {f.differs or 'same meaning'} |")
    return "\n".join(rows) + "\n"
