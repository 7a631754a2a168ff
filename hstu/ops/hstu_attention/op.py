"""``hstu_attention``: argument checks, the ``hstu::`` custom ops with autograd, and the dispatcher.

Dispatch: the fused CUDA kernel when the extension is built, the tensors are on CUDA and the kernel supports the
configuration; otherwise the pure-PyTorch reference (with one warning per reason on GPU). Backward through the
reference recomputes the forward under autograd, so both paths share the same custom-op boundary and work under
``torch.compile`` and with fake tensors. Plain eager calls run the same implementations without going through the
custom ops' dispatch (``_runs_eagerly``), which costs as much host time as the rest of a short-sequence call.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from hstu.ops._extension import load_extension, warn_once
from hstu.ops._validation import (
    check_attention_extras,
    check_tensor,
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_offsets_values,
    check_same_device,
    lengths_of,
    to_host,
    values_are_concrete,
)
from hstu.ops.hstu_attention import cuda, reference
from hstu.ops.hstu_attention.args import AttentionArgs
from hstu.ops.hstu_attention.rab_tables import (
    DEFAULT_TIME_DIVISOR,
    TIME_REFERENCES,
    RelativeBiasTables,
    dense_bias,
    dense_bias_grads,
)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _padded_head_dim(q: torch.Tensor, v: torch.Tensor) -> int:
    """The compiled kernel head dim to zero-pad q, k and v to when their own dims are not one (0: no padding).

    Zero columns leave q.k and the kept output columns unchanged and receive zero gradient, so padding is exact;
    it costs the padded FLOPs (e.g. the paper's ML-1M d=50 runs the d=64 kernel instead of the PyTorch reference).
    """
    if not q.is_cuda or load_extension() is None:
        return 0
    info = cuda.build_info()
    if str(q.dtype).removeprefix("torch.") not in info.get("dtypes", []):
        return 0  # the reference runs anyway (e.g. float32): padding would only add work
    compiled = info.get("head_dims", [])
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk == dv and dqk in compiled:
        return 0
    return min((d for d in compiled if d >= max(dqk, dv)), default=0)


def _use_kernel(args: AttentionArgs) -> bool:
    if args.q.device.type != "cuda":
        return False
    # A table call runs the kernel with a bias (the tables, or the dense rab written out from them: _kernel_args), so
    # it needs what a dense-rab call needs; the table stands in for the rab in the check.
    bias = args.rab
    if bias is None and args.has_tables():
        bias = args.rab_position_weights if args.rab_position_weights is not None else args.rab_time_weights
    reason = cuda.unsupported_reason(args.q, args.k, args.v, bias, args.dropout_p)
    if reason is None:
        return True
    warn_once(f"hstu_attention:{reason}", f"hstu_attention runs the PyTorch reference on GPU: {reason}")
    return False


def _expands_tables(args: AttentionArgs) -> bool:
    """Whether a kernel call writes the bias tables out as a dense rab: the call has tables and the table kernels
    are not taken (``cuda.reads_rab_tables()``). The table kernels serve both backward paths (deterministic=True:
    their table gradients are summed in a fixed order, bitwise reproducible)."""
    return args.has_tables() and not cuda.reads_rab_tables()


def _kernel_args(args: AttentionArgs) -> AttentionArgs:
    """What the binding gets for a kernel call: ``args``, or for a call whose tables the kernels do not read, the
    dense (B, 1 or H, max_seqlen, max_seqlen) rab in q's dtype gathered from them on the device and no tables."""
    if not _expands_tables(args):
        return args
    rab = dense_bias(args.tables(), args.seq_offsets, args.q.shape[0], args.max_seqlen, args.q.shape[1],
                     args.q.dtype)  # fmt: skip
    return args._replace(rab=rab, **_NO_TABLE_FIELDS)


# The custom ops take the flat argument list (their schema); everything below them takes one AttentionArgs, whose
# fields are in the forward op's schema order. The forward's bias-table arguments have defaults (no tables), so a
# call without them keeps the 16-argument form.
@torch.library.custom_op("hstu::hstu_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    window_size: int,
    num_contexts: Optional[torch.Tensor],
    num_targets: Optional[torch.Tensor],
    target_group_size: int,
    rab: Optional[torch.Tensor],
    dropout_p: float,
    dropout_seed: int,
    deterministic: bool,
    rab_position_weights: Optional[torch.Tensor] = None,
    rab_time_weights: Optional[torch.Tensor] = None,
    rab_timestamps: Optional[torch.Tensor] = None,
    rab_next_timestamps: Optional[torch.Tensor] = None,
    rab_shared_positions: Optional[torch.Tensor] = None,
    rab_time_reference: str = "query",
    rab_time_divisor: float = DEFAULT_TIME_DIVISOR,
) -> torch.Tensor:
    return _forward_impl(AttentionArgs(q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window_size,
                                       num_contexts, num_targets, target_group_size, rab, dropout_p, dropout_seed,
                                       deterministic, rab_position_weights, rab_time_weights, rab_timestamps,
                                       rab_next_timestamps, rab_shared_positions, rab_time_reference,
                                       rab_time_divisor))  # fmt: skip


def _forward_impl(args: AttentionArgs) -> torch.Tensor:
    if _use_kernel(args):
        return cuda.forward(_kernel_args(args))
    return reference.forward(args)


@_forward_op.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


@torch.library.custom_op("hstu::hstu_attention_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    window_size: int,
    num_contexts: Optional[torch.Tensor],
    num_targets: Optional[torch.Tensor],
    target_group_size: int,
    rab: Optional[torch.Tensor],
    dropout_p: float,
    dropout_seed: int,
    deterministic: bool,
    rab_position_weights: Optional[torch.Tensor],
    rab_time_weights: Optional[torch.Tensor],
    rab_timestamps: Optional[torch.Tensor],
    rab_next_timestamps: Optional[torch.Tensor],
    rab_shared_positions: Optional[torch.Tensor],
    rab_time_reference: str,
    rab_time_divisor: float,
    rab_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out, the forward's arguments, rab_needs_grad (the dense rab's or the tables' gradients). Returns dq, dk,
    dv, drab, d rab_position_weights, d rab_time_weights; a bias gradient is an empty tensor when rab_needs_grad is
    False or its tensor is None."""
    args = AttentionArgs(q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window_size, num_contexts,
                         num_targets, target_group_size, rab, dropout_p, dropout_seed, deterministic,
                         rab_position_weights, rab_time_weights, rab_timestamps, rab_next_timestamps,
                         rab_shared_positions, rab_time_reference, rab_time_divisor)  # fmt: skip
    return _backward_impl(grad_out, args, rab_needs_grad)


def _backward_impl(grad_out: torch.Tensor, args: AttentionArgs, rab_needs_grad: bool):
    kernel = _use_kernel(args)
    if kernel and torch.is_grad_enabled():
        # backward(create_graph=True): the kernels' gradients are not differentiable; the reference's are.
        if args.dropout_p > 0.0:
            raise ValueError(
                "double backward (create_graph=True) through hstu_attention with dropout_p > 0 is not supported on "
                "the fused kernel (the PyTorch reference draws a different dropout mask); use dropout_p=0"
            )
        warn_once("hstu_attention:create_graph", "hstu_attention's backward with create_graph=True runs the PyTorch "
                  "reference (the fused kernel's gradients are not differentiable); its memory grows with B * H * "
                  "max_seqlen^2")  # fmt: skip
        kernel = False
    if kernel and _expands_tables(args):
        # The dense rab's gradient, reduced to the tables' (the dense rab is written out again, not kept from the
        # forward: it is as large as the forward's scores).
        dq, dk, dv, drab, _, _ = cuda.backward(grad_out.contiguous(), _kernel_args(args), rab_needs_grad)
        table_grads = (None, None) if drab is None else dense_bias_grads(
            args.tables(), args.seq_offsets, args.q.shape[0], drab, args.deterministic)  # fmt: skip
        grads = (dq, dk, dv, None, *table_grads)
    elif kernel:
        grads = cuda.backward(grad_out.contiguous(), args, rab_needs_grad)
    else:
        grads = reference.backward(grad_out, args, rab_needs_grad)
    return tuple(g if g is not None else args.q.new_empty(0) for g in grads)  # (outputs must not alias)


@_backward_op.register_fake
def _(grad_out, *inputs):
    args, rab_needs_grad = AttentionArgs._make(inputs[:-1]), inputs[-1]
    q = args.q
    bias = [t if t is None or not rab_needs_grad else torch.empty_like(t)
            for t in (args.rab, args.rab_position_weights, args.rab_time_weights)]  # fmt: skip
    return (torch.empty_like(q), torch.empty_like(args.k), torch.empty_like(args.v),
            *(q.new_empty(0) if t is None else t for t in bias))  # fmt: skip


def _runs_eagerly(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call can skip the custom ops' dispatch and run their implementations directly: not compiling or
    tracing (no torch-dispatch mode such as FakeTensorMode, no functorch transform, no torch.jit tracer, which cannot
    see the extension's calls) and every tensor a plain tensor (a subclass keeps its own dispatch).

    The dispatch of a Python custom op costs tens of µs of host time per call (H200 machine, torch 2.11: a forward
    through the custom op 37-78 µs, its implementation called directly 17-30), as much as the rest of a forward at
    short sequences; the custom ops remain what torch.compile, fake tensors and torch.library see."""
    return (all(t is None or type(t) is torch.Tensor for t in tensors) and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()
            and not torch.jit.is_tracing())  # fmt: skip


def _forward(args: AttentionArgs) -> torch.Tensor:
    eager = _runs_eagerly(*args.tensors())
    return _forward_impl(args) if eager else _forward_op(*args)


def _setup_context(ctx, inputs, output):
    """inputs: the forward op's arguments, in AttentionArgs' field order."""
    _save_for_backward(ctx, AttentionArgs._make(inputs))


def _save_for_backward(ctx, args: AttentionArgs) -> None:
    ctx.save_for_backward(*args.tensors())
    ctx.args = args.settings()


# Where the forward op's inputs that have gradients stand in its argument list (and in needs_input_grad): q, k, v,
# then the bias inputs (the dense rab and the two tables).
_GRAD_SLOTS = tuple(AttentionArgs._fields.index(name)
                    for name in ("q", "k", "v", "rab", "rab_position_weights", "rab_time_weights"))  # fmt: skip
_BIAS_SLOTS = _GRAD_SLOTS[3:]


def _input_grads(grads_in_slot_order) -> tuple:
    """The backward's result: one entry per forward op input, None but for q, k, v and the bias inputs (a plain
    tuple: torch.library checks that it has the structure of the op's inputs)."""
    grads = [None] * len(AttentionArgs._fields)
    for slot, grad in zip(_GRAD_SLOTS, grads_in_slot_order):
        grads[slot] = grad
    return tuple(grads)


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    args = ctx.args.with_tensors(saved)
    bias_needs_grad = [args[slot] is not None and ctx.needs_input_grad[slot] for slot in _BIAS_SLOTS]
    rab_needs_grad = any(bias_needs_grad)
    if _runs_eagerly(grad_out, *saved):
        grads = _backward_impl(grad_out, args, rab_needs_grad)
    else:
        grads = _backward_op(grad_out, *args, rab_needs_grad)
    wanted = (True, True, True, *bias_needs_grad)
    return _input_grads([g if want else None for g, want in zip(grads, wanted)])


torch.library.register_autograd("hstu::hstu_attention_forward", _backward, setup_context=_setup_context)


class _HstuAttention(torch.autograd.Function):
    """The public function's autograd: the forward op's own formula (_setup_context, _backward), applied directly.

    Host time per call, measured: calling the custom op with inputs that need grad makes torch.library rebuild the
    op's 16-argument schema (utils.fill_defaults, ~60 us per forward) before _setup_context; a Function with a
    separate setup_context staticmethod costs an inspect.signature bind per call (~30 us). This one runs the op
    under no-grad and sets up ctx in forward. torch.compile traces it as a Function around the custom op."""

    @staticmethod
    def forward(ctx, *inputs):
        args = AttentionArgs._make(inputs)
        out = _forward(args)
        _save_for_backward(ctx, args)
        return out

    backward = staticmethod(_backward)


# Value checks of index tensors that passed, per seq_offsets tensor. A model calls the op once per layer with the
# same offsets, contexts and targets; the check needs their values on the host, a device-to-host copy that waits for
# the device and leaves the launch queue empty. So only the first call per batch pays it, or none when the caller
# checked them from its host copies (check_attention_indices). An entry records the
# version counters of the tensors it checked (in-place writes, also through views, bump them) and holds no
# reference: it goes with the offsets tensor. Inference tensors have no version counter and are checked every time.
class _CheckedIndices(NamedTuple):
    offsets_version: int
    rows: int
    longest: int
    contexts: Optional[tuple]  # _version_key of num_contexts
    targets: Optional[tuple]  # _version_key of num_targets


_checked_offsets = WeakIdKeyDictionary()


def _version_key(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (weakref.ref(t), t._version)


def _same_version(key: Optional[tuple], t: Optional[torch.Tensor]) -> bool:
    if key is None or t is None:
        return key is None and t is None
    return key[0]() is t and key[1] == t._version


def _checked_longest(seq_offsets: torch.Tensor, rows: int, num_contexts: Optional[torch.Tensor],
                     num_targets: Optional[torch.Tensor]) -> int:
    """The longest sequence of seq_offsets after checking the offsets (start at 0, non-decreasing, end at `rows`),
    the targets (0 <= num_targets <= length) and the contexts (0 <= num_contexts <= length - num_targets); raises
    ValueError naming the argument. Cached: see _checked_offsets."""
    cacheable = not any(t is not None and t.is_inference() for t in (seq_offsets, num_contexts, num_targets))
    entry = _checked_offsets.get(seq_offsets) if cacheable else None
    if (entry is not None and entry.offsets_version == seq_offsets._version and entry.rows == rows
            and _same_version(entry.contexts, num_contexts) and _same_version(entry.targets, num_targets)):  # fmt: skip
        return entry.longest
    # One device-to-host copy for every value check.
    offsets_host, contexts, targets = to_host(seq_offsets, num_contexts, num_targets)
    longest = _check_index_values(offsets_host, rows, contexts, targets)
    if cacheable:
        _checked_offsets[seq_offsets] = _CheckedIndices(seq_offsets._version, rows, longest,
                                                        _version_key(num_contexts), _version_key(num_targets))
    return longest


def _check_index_values(offsets_host: torch.Tensor, rows: int, contexts: Optional[torch.Tensor],
                        targets: Optional[torch.Tensor]) -> int:  # fmt: skip
    """_checked_longest's checks on host values; returns the longest sequence."""
    check_offsets_values("seq_offsets", offsets_host, total=rows)
    lengths = lengths_of(offsets_host)
    longest = int(lengths.max()) if lengths.numel() > 0 else 0
    if targets is None:
        targets = torch.zeros_like(lengths)
    if bool((targets < 0).any()):
        raise ValueError("num_targets must be non-negative")
    if bool((targets > lengths).any()):
        b = int(torch.nonzero(targets > lengths)[0])
        raise ValueError(f"num_targets[{b}]={int(targets[b])} exceeds the sequence length {int(lengths[b])}")
    if contexts is not None:
        if bool((contexts < 0).any()):
            raise ValueError("num_contexts must be non-negative")
        history = lengths - targets
        if bool((contexts > history).any()):
            b = int(torch.nonzero(contexts > history)[0])
            raise ValueError(
                f"num_contexts[{b}]={int(contexts[b])} exceeds the non-target length {int(history[b])} "
                "(contexts must come before the targets)"
            )
    return longest


def check_attention_indices(
    seq_offsets: torch.Tensor,
    host_lengths: torch.Tensor,
    *,
    num_contexts: Optional[torch.Tensor] = None,
    host_num_contexts: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
    host_num_targets: Optional[torch.Tensor] = None,
    shared_positions: Optional[torch.Tensor] = None,
    host_shared_positions: Optional[torch.Tensor] = None,
) -> None:
    """Checks the index tensors that a batch's ``hstu_attention`` calls share (seq_offsets, num_contexts,
    num_targets, rab_tables.shared_positions) on host copies of their values the caller already holds, and records
    them as checked: the calls that pass these same tensors, unchanged, then make no device-to-host copy for their
    checks (a model's layer stack calls the op once per layer with them).

    host_lengths: the (B,) sequence lengths of seq_offsets on the CPU; host_num_contexts / host_num_targets /
    host_shared_positions: CPU copies of the tensors given beside them (each needed with its tensor). The copies must
    hold the device tensors' values: that is the caller's promise, not checked against the device. Raises the
    op's ValueError naming the argument for bad values, TypeError / ValueError naming a bad host copy. Tensors whose
    values cannot be read (fake tensors) or inference tensors (no version counter) are left to the op's own checks.
    """
    seq_offsets = check_index_tensor("seq_offsets", seq_offsets)
    batch = seq_offsets.numel() - 1
    host = {}
    for name, t, copy in (("lengths", seq_offsets, host_lengths), ("num_contexts", num_contexts, host_num_contexts),
                          ("num_targets", num_targets, host_num_targets),
                          ("shared_positions", shared_positions, host_shared_positions)):  # fmt: skip
        if t is None:
            if copy is not None:
                raise ValueError(f"host_{name} is given but {name} is None")
            continue
        if name != "lengths":
            check_index_tensor(name, t, length=batch)
        if copy is None:
            raise ValueError(f"{name} needs its host copy host_{name}")
        copy = check_index_tensor(f"host_{name}", copy, length=batch)
        if copy.device.type != "cpu":
            raise ValueError(f"host_{name} must be a CPU tensor, got one on {copy.device}")
        host[name] = copy.to(torch.int64)
    tensors = (seq_offsets, num_contexts, num_targets, shared_positions)
    if not values_are_concrete(*tensors) or any(t is not None and t.is_inference() for t in tensors):
        return
    offsets_host = torch.cat([host["lengths"].new_zeros(1), host["lengths"].cumsum(0)])
    rows = int(offsets_host[-1])
    longest = _check_index_values(offsets_host, rows, host.get("num_contexts"), host.get("num_targets"))
    _checked_offsets[seq_offsets] = _CheckedIndices(seq_offsets._version, rows, longest, _version_key(num_contexts),
                                                    _version_key(num_targets))  # fmt: skip
    if shared_positions is not None:
        _check_shared_values(offsets_host, host["shared_positions"])
        _checked_shared[shared_positions] = (shared_positions._version, _version_key(seq_offsets))


# The rab_* fields of AttentionArgs (the bias tables), which end it.
_TABLE_FIELDS = slice(AttentionArgs._fields.index("rab_position_weights"), None)


def _validate(args: AttentionArgs) -> AttentionArgs:
    """Checks a call's arguments as given (raises TypeError / ValueError naming the argument) and returns them with
    the tensors and integers the checks normalised; alpha, dropout_p and deterministic are returned as given."""
    q = check_float_tensor("q", args.q, 3, SUPPORTED_DTYPES)
    k = check_float_tensor("k", args.k, 3, SUPPORTED_DTYPES)
    v = check_float_tensor("v", args.v, 3, SUPPORTED_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be (T, H, Dv) with T, H = {tuple(q.shape[:2])}, got {tuple(v.shape)}")
    if q.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError(f"head dims must be positive, got Dqk={q.shape[2]}, Dv={v.shape[2]}")
    seq_offsets = check_index_tensor("seq_offsets", args.seq_offsets)
    if seq_offsets.numel() < 1:
        raise ValueError("seq_offsets must have at least one element (B+1 entries, starting with 0)")
    batch = seq_offsets.numel() - 1
    max_seqlen = check_int("max_seqlen", args.max_seqlen, minimum=0)
    scaling_seqlen = args.scaling_seqlen
    if scaling_seqlen is not None:
        scaling_seqlen = check_int("scaling_seqlen", scaling_seqlen, minimum=1)
    alpha, causal, dropout_p = args.alpha, args.causal, args.dropout_p
    num_contexts, num_targets, rab = args.num_contexts, args.num_targets, args.rab
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    window_size = check_int("window_size", args.window_size)
    target_group_size = check_int("target_group_size", args.target_group_size)
    if target_group_size < 1:
        raise ValueError(f"target_group_size must be >= 1, got {target_group_size}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not causal and (num_contexts is not None or num_targets is not None):
        raise ValueError("num_contexts and num_targets need causal=True (they define causal masks)")
    if num_contexts is not None:
        num_contexts = check_index_tensor("num_contexts", num_contexts, length=batch)
    if num_targets is not None:
        num_targets = check_index_tensor("num_targets", num_targets, length=batch)
    if rab is not None:
        rab = check_float_tensor("rab", rab, 4, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
        if rab.shape[0] != batch or rab.shape[1] not in (1, q.shape[1]):
            raise ValueError(
                f"rab must be (B={batch}, H={q.shape[1]} or 1, >=max_seqlen, >=max_seqlen), got {tuple(rab.shape)}"
            )
        if rab.shape[2] < max_seqlen or rab.shape[3] < max_seqlen:
            raise ValueError(f"rab's last two dims must be >= max_seqlen={max_seqlen}, got {tuple(rab.shape)}")
    check_same_device("q", q, k=k, v=v, seq_offsets=seq_offsets, num_contexts=num_contexts,
                      num_targets=num_targets, rab=rab)  # fmt: skip
    tables = _validate_tables(args, q, batch) if args.has_tables() else args[_TABLE_FIELDS]

    if values_are_concrete(seq_offsets, num_contexts, num_targets):
        longest = _checked_longest(seq_offsets, q.shape[0], num_contexts, num_targets)
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is less than the longest sequence ({longest})")
        shared = args.rab_shared_positions  # (as given: its checks are cached per tensor, _int32 may copy it)
        if shared is not None and values_are_concrete(shared):
            _check_shared_positions(seq_offsets, shared)
    return AttentionArgs._make((q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window_size,
                                num_contexts, num_targets, target_group_size, rab, dropout_p, args.dropout_seed,
                                args.deterministic, *tables))  # fmt: skip


def _validate_tables(args: AttentionArgs, q: torch.Tensor, batch: int) -> tuple:
    """Checks the rab_tables fields of a call (errors name ``rab_tables.<field>``); returns them in AttentionArgs
    order, the index tensors as int64 (timestamps, next_timestamps) or int32 (shared_positions), contiguous."""
    if args.rab is not None:
        raise ValueError("rab and rab_tables are mutually exclusive: pass the relative bias either as a dense tensor "
                         "(rab) or as weight tables (rab_tables)")
    heads = q.shape[1]
    position, time = args.rab_position_weights, args.rab_time_weights
    for name, table in (("position_weights", position), ("time_weights", time)):
        if table is None:
            continue
        table = check_tensor(f"rab_tables.{name}", table)
        if table.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"rab_tables.{name} must be a float tensor, got {table.dtype}")
        if table.dim() not in (1, 2) or (table.dim() == 2 and table.shape[0] != heads) or table.shape[-1] < 1:
            raise ValueError(f"rab_tables.{name} must be (K,) or (H={heads}, K) with K >= 1, got {tuple(table.shape)}")
    if position is not None and position.shape[-1] % 2 != 1:
        raise ValueError(f"rab_tables.position_weights must have an odd length 2M-1 (distances -(M-1)..M-1), got "
                         f"{position.shape[-1]}")
    if position is not None and time is not None and position.dtype != time.dtype:
        raise TypeError(f"rab_tables.position_weights ({position.dtype}) and rab_tables.time_weights ({time.dtype}) "
                        "must share one dtype")
    reference_name, divisor = args.rab_time_reference, args.rab_time_divisor
    if not isinstance(reference_name, str) or reference_name not in TIME_REFERENCES:
        raise ValueError(f"rab_tables.time_reference must be one of {TIME_REFERENCES}, got {reference_name!r}")
    if isinstance(divisor, bool) or not isinstance(divisor, (int, float)) or not (0.0 < divisor < float("inf")):
        raise ValueError(f"rab_tables.time_divisor must be a positive finite float, got {divisor!r}")
    timestamps, next_timestamps, shared = args.rab_timestamps, args.rab_next_timestamps, args.rab_shared_positions
    if time is None:
        for name, t in (("timestamps", timestamps), ("next_timestamps", next_timestamps)):
            if t is not None:
                raise ValueError(f"rab_tables.{name} is given but rab_tables.time_weights is None (no time bias)")
    elif timestamps is None:
        raise ValueError("rab_tables.time_weights needs rab_tables.timestamps (one per token, int seconds)")
    else:
        timestamps = check_index_tensor("rab_tables.timestamps", timestamps, length=q.shape[0])
    if next_timestamps is not None:
        if reference_name != "next":
            raise ValueError("rab_tables.next_timestamps only applies to time_reference='next'")
        next_timestamps = check_index_tensor("rab_tables.next_timestamps", next_timestamps, length=batch)
    if shared is not None:
        if position is None:
            raise ValueError("rab_tables.shared_positions is given but rab_tables.position_weights is None")
        shared = check_index_tensor("rab_tables.shared_positions", shared, length=batch)
    check_same_device("q", q, **{"rab_tables.position_weights": position, "rab_tables.time_weights": time,
                                 "rab_tables.timestamps": timestamps, "rab_tables.next_timestamps": next_timestamps,
                                 "rab_tables.shared_positions": shared})  # fmt: skip
    return (position, time, _int64(timestamps), _int64(next_timestamps), _int32(shared), reference_name,
            float(divisor))  # fmt: skip


# shared_positions tensors whose values passed the check, with the version counters it saw (as _checked_offsets).
_checked_shared = WeakIdKeyDictionary()


def _check_shared_positions(seq_offsets: torch.Tensor, shared: torch.Tensor) -> None:
    """0 <= shared_positions[b] <= length of sequence b (ValueError naming rab_tables.shared_positions)."""
    cacheable = not (shared.is_inference() or seq_offsets.is_inference())
    entry = _checked_shared.get(shared) if cacheable else None
    if entry is not None and entry[0] == shared._version and _same_version(entry[1], seq_offsets):
        return
    _check_shared_values(*to_host(seq_offsets, shared))
    if cacheable:
        _checked_shared[shared] = (shared._version, _version_key(seq_offsets))


def _check_shared_values(offsets_host: torch.Tensor, shared_host: torch.Tensor) -> None:
    lengths = lengths_of(offsets_host)
    bad = (shared_host < 0) | (shared_host > lengths)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ValueError(f"rab_tables.shared_positions[{b}]={int(shared_host[b])} must be in [0, the sequence length "
                         f"{int(lengths[b])}]")


def _int32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or (t.dtype == torch.int32 and t.is_contiguous()):
        return t  # (a no-op .to() still costs a dispatch)
    return t.to(torch.int32).contiguous()


def _int64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or (t.dtype == torch.int64 and t.is_contiguous()):
        return t
    return t.to(torch.int64).contiguous()


def _table_fields(rab_tables: Optional[RelativeBiasTables]) -> tuple:
    """The AttentionArgs rab_* fields of the public rab_tables argument (TypeError unless a RelativeBiasTables)."""
    if rab_tables is None:
        return _NO_TABLES
    if not isinstance(rab_tables, RelativeBiasTables):
        raise TypeError(f"rab_tables must be a hstu.ops.hstu_attention.RelativeBiasTables, got {type(rab_tables).__name__}")
    t = rab_tables
    if t.position_weights is None and t.time_weights is None:
        raise ValueError("rab_tables needs position_weights or time_weights (pass rab_tables=None for no bias)")
    return (t.position_weights, t.time_weights, t.timestamps, t.next_timestamps, t.shared_positions,
            t.time_reference, t.time_divisor)  # fmt: skip


_NO_TABLES = AttentionArgs(None, None, None, None, 0, 1.0, None)[_TABLE_FIELDS]
_NO_TABLE_FIELDS = dict(zip(AttentionArgs._fields[_TABLE_FIELDS], _NO_TABLES))


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    *,
    alpha: float = 1.0,
    scaling_seqlen: Optional[int] = None,
    causal: bool = True,
    window_size: int = -1,
    num_contexts: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
    target_group_size: int = 1,
    rab: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    deterministic: bool = False,
    rab_tables: Optional[RelativeBiasTables] = None,
) -> torch.Tensor:
    """Jagged HSTU attention: O_i = sum_j visible(i,j) SiLU(alpha (q_i.k_j + rab_ij)) / N v_j.

    Args:
        q, k: (T, H, Dqk); v: (T, H, Dv); one float dtype (float32, bfloat16, float16; float64 for checks).
        seq_offsets: (B+1,) int32/int64 jagged offsets, seq_offsets[0] == 0, non-decreasing, [-1] == T.
        max_seqlen: an upper bound on every sequence length (also the default N).
        alpha: scale of the scores before SiLU (the layers use 1/sqrt(Dqk)).
        scaling_seqlen: N, the divisor of the SiLU weights; defaults to max_seqlen.
        causal: causal masks (contexts, targets, window); False: full/symmetric-window attention.
        window_size: local attention window (< 0: none).
        num_contexts: (B,) contextual prefix lengths: those rows see the whole history, everyone sees them.
        num_targets: (B,) target (candidate) suffix lengths: targets see the history and their own group.
        target_group_size: targets attend to each other inside groups of this size.
        rab: (B, H or 1, >=max_seqlen, >=max_seqlen) relative attention bias, added before alpha.
        dropout_p: attention-weight dropout probability (pass 0 in evaluation).
        deterministic: reproducible backward (no atomics) when the kernel runs; covers the tables' gradients too.
        rab_tables: the relative bias as weight tables (``hstu.ops.hstu_attention.RelativeBiasTables``: position and / or
            time-bucket weights, per-token timestamps, the time reference), instead of rab (exclusive with it).
            Differentiable in both tables. On GPU the fused kernel runs them: it reads the tables where the build's
            kernels do (``cuda.reads_rab_tables()``), else it runs on the dense (B, 1 or H, max_seqlen, max_seqlen)
            rab gathered from them in q's dtype, and the tables' gradients are that rab's gradient summed per weight
            (``deterministic=True``: a reproducible summation order).
    Returns:
        (T, H, Dv) in q's dtype.
    """
    # (AttentionArgs._make here and below: a tuple built in place costs less host time than the constructor)
    args = _validate(AttentionArgs._make((q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window_size,
                                          num_contexts, num_targets, target_group_size, rab, dropout_p, 0,
                                          deterministic, *_table_fields(rab_tables))))  # fmt: skip
    q, k, v, max_seqlen, rab = args.q, args.k, args.v, args.max_seqlen, args.rab
    check_attention_extras(q, args.window_size, alpha, deterministic)
    dropout_seed = 0
    if dropout_p > 0.0:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            # The seed is a launch argument: every replay of the graph would drop the same weights.
            raise ValueError(
                "dropout_p > 0 inside a CUDA graph capture would replay one fixed dropout mask; capture steps with "
                "dropout_p=0 (e.g. the model in eval mode, or attention dropout off) or run them eagerly"
            )
        # A CPU draw needs no device sync and follows torch.manual_seed.
        dropout_seed = int(torch.randint(0, 2**62, (1,)).item())
    head_dim = _padded_head_dim(q, v)
    value_dim = v.shape[-1]
    if head_dim:
        q, k, v = (F.pad(t, (0, head_dim - t.shape[-1])) for t in (q, k, v))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
        q, k, v, rab, args.rab_position_weights, args.rab_time_weights))  # fmt: skip
    args = AttentionArgs._make((
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        _int32(args.seq_offsets),
        max_seqlen,
        float(alpha),
        args.scaling_seqlen if args.scaling_seqlen is not None else max(max_seqlen, 1),
        causal,
        args.window_size,
        _int32(args.num_contexts),
        _int32(args.num_targets),
        args.target_group_size,
        rab,
        float(dropout_p),
        dropout_seed,
        bool(deterministic),
        *args[_TABLE_FIELDS],
    ))  # fmt: skip
    # (the autograd Function takes the fields as its arguments: it tracks only tensors passed directly)
    out = _HstuAttention.apply(*args) if needs_grad else _forward(args)
    return out[..., :value_dim] if head_dim else out
