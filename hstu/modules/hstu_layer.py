"""The HSTU layer (Zhai et al. 2024) on jagged tokens, and a stack of them.

    normed = LayerNorm(x)
    u, v, q, k = split(SiLU(uvqk_proj(normed)))           # per head
    attn = hstu_attention(q, k, v, alpha=1/sqrt(d_qk))    # SiLU-weighted, causal + context/target masks
                                                          # (or full attention when AttentionInputs.causal is False)
    y = output_proj(dropout(LayerNorm(attn) * u))
    return x + y

Activation memory: besides whole-layer recompute (``recompute``: the layer keeps only x and runs twice), two options
each drop one tensor from what the backward keeps and recompute it when the backward needs it, from tensors kept
anyway: ``recompute_input_norm`` drops LayerNorm(x), uvqk_proj's input (T x D; recomputed from x, which the
LayerNorm's backward keeps), ``recompute_silu`` drops u, v, q, k, SiLU's output (T x H(2Dv + 2Dqk); recomputed from
uvqk_proj's output, which SiLU's backward keeps). Outputs and gradients are bit for bit those without the options.

On CUDA, LayerNorm(x), the projection and SiLU run as one op when its kernels apply (``hstu.ops.uvqk``: bf16 /
fp16 GEMM, qk_dim == v_dim, widths multiples of 8; ``hstu.ops.uvqk.op.USE_CUDA_KERNELS``), with the same two
options: the op keeps the projection's output for its own backward (as SiLU's backward does), x_norm unless
``recompute_input_norm``, and ``recompute_silu`` recomputes the consumers' u, v, q, k from that output.

Tensor-parallel friendliness: ``uvqk_proj`` lays its output out head by head ([u_h | v_h | q_h | k_h] for every
head h), so splitting its output features into contiguous chunks (Megatron column parallel) gives every rank whole
heads; ``output_proj`` consumes heads in the same order (row parallel). Both are plain ``nn.Linear`` modules.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hstu.modules.attention_backends import reference_attention, triton_attention
from hstu.ops import hstu_attention
from hstu.ops.norm_mul_dropout import layer_norm_mul_dropout
from hstu.ops.uvqk import cuda as uvqk_cuda
from hstu.ops.uvqk import op as uvqk_op
from hstu.ops.uvqk.reference import split_uvqk


@dataclass
class AttentionInputs:
    """What every layer of one forward shares: jagged layout, masks and the relative bias inputs."""

    seq_offsets: torch.Tensor  # (B+1,)
    max_seqlen: int  # the longest sequence in this batch (tokens)
    num_contexts: Optional[torch.Tensor] = None  # (B,)
    num_targets: Optional[torch.Tensor] = None  # (B,)
    # The relative attention bias's inputs, taken by hstu_attention(rab_tables=...) as they are:
    timestamps: Optional[torch.Tensor] = None  # (T,) int token times (the bias's time weights)
    next_timestamps: Optional[torch.Tensor] = None  # (B,) the time after each sequence (time reference "next")
    shared_positions: Optional[torch.Tensor] = None  # (B,) trailing tokens sharing one position (ranking candidates)
    # ... or as dense matrices, which the layers turn into a dense (B, 1, N, N) bias (either one given: this form)
    time_buckets: Optional[torch.Tensor] = None  # (B, N, N) for the relative attention bias
    relative_positions: Optional[torch.Tensor] = None  # (B, N, N) pos_i - pos_j when not token distances
    causal: bool = True  # False: every token sees its whole sequence (num_contexts / num_targets then play no part)
    attention_backend: str = "fused"  # hstu.modules.attention_backends.ATTENTION_BACKENDS
    num_contextual: int = 0  # contextual tokens at the start of every sequence (the triton backend takes the count)


def _tensor_key(t: torch.Tensor) -> Optional[tuple]:
    """What identifies a strided tensor's elements: two tensors with equal keys alias the same values."""
    if t.layout != torch.strided:
        return None
    return t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride()


def _outer_hooks() -> Optional[tuple[Callable, Callable]]:
    """The saved-tensor hooks active here (torch.autograd.graph.saved_tensors_hooks, save_on_cpu, a checkpoint's), or
    None. The hooks of ``_RecomputedTensors`` hand what they keep to these, so that nesting them changes nothing for
    the outer ones."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(True) if top is not None else None


class _Kept:
    """A tensor as ``_RecomputedTensors`` keeps it: through the outer hooks (autograd then leaves in-place checks to
    them) or, without any, as a detached alias (a saved output must not hold its own grad_fn in a reference cycle)
    with its version for autograd's in-place check."""

    __slots__ = ("value", "version", "unpack")

    def __init__(self, t: torch.Tensor, outer: Optional[tuple[Callable, Callable]]):
        if outer is None:
            self.value, self.version, self.unpack = t.detach(), t._version, None
        else:
            self.value, self.version, self.unpack = outer[0](t), None, outer[1]

    def get(self) -> torch.Tensor:
        if self.unpack is not None:
            return self.unpack(self.value)
        t = self.value
        if t._version != self.version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"{t.dtype} tensor of shape {tuple(t.shape)} is at version {t._version}; expected version "
                f"{self.version} instead (a tensor that an HSTU layer keeps for its backward)")
        return t


class _Slot:
    """A saved tensor that ``_RecomputedTensors`` recomputes: its owner and its index in the owner's outputs."""

    __slots__ = ("owner", "index")

    def __init__(self, owner: "_RecomputedTensors", index: int):
        self.owner, self.index = owner, index


class _RecomputedTensors:
    """Saved-tensor hooks that keep, in place of some tensors of a forward (``outputs``), the tensors they were
    computed from (``inputs``), and recompute them (``compute(*inputs)``: bit for bit the same values, under the
    forward's autocast state) when the backward unpacks them.

    A tensor saved while the hooks are active is recomputed when it aliases one of ``outputs`` and was not modified
    in place since; any other one, and the inputs, are kept as autograd would keep them (``_Kept``). One
    recomputation serves all outputs: each is handed out once and then dropped, so they are freed as the backward
    consumes them.
    """

    def __init__(self, compute: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                 outputs: Sequence[torch.Tensor]):  # fmt: skip
        self._outer = _outer_hooks()
        self._compute = compute
        self._inputs = tuple(_Kept(t, self._outer) for t in inputs)
        self._slots = {}
        for index, t in enumerate(outputs):
            key = _tensor_key(t)
            if key is not None:
                self._slots[key] = (index, t._version)
        device = inputs[0].device.type
        self._autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        self._recomputed: dict[int, torch.Tensor] = {}

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor):
        slot = self._slots.get(_tensor_key(t))
        if slot is not None and slot[1] == t._version:
            return _Slot(self, slot[0])
        return _Kept(t, self._outer)

    def recomputed(self, index: int) -> torch.Tensor:
        if index not in self._recomputed:
            inputs = [kept.get() for kept in self._inputs]
            device, dtype, enabled = self._autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                self._recomputed = dict(enumerate(self._compute(*inputs)))
        return self._recomputed.pop(index)


def _unpack(packed) -> torch.Tensor:
    return packed.owner.recomputed(packed.index) if isinstance(packed, _Slot) else packed.get()


def _in_autocast_dtype(t: torch.Tensor) -> torch.Tensor:
    """t cast as autocast casts a Linear's input (a no-op without autocast or in that dtype already)."""
    device = t.device.type
    if torch.is_autocast_enabled(device) and t.is_floating_point():
        return t.to(torch.get_autocast_dtype(device))
    return t


class HSTULayer(nn.Module):
    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        *,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        alpha: Optional[float] = None,
        scaling_seqlen: Optional[int] = None,
        target_group_size: int = 1,
        layer_norm_eps: float = 1e-6,
        relative_attention_bias: Optional[nn.Module] = None,
        recompute: bool = False,
        recompute_input_norm: bool = False,
        recompute_silu: bool = False,
    ):
        super().__init__()
        for name, value in (("recompute", recompute), ("recompute_input_norm", recompute_input_norm),
                            ("recompute_silu", recompute_silu)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.embedding_dim, self.num_heads, self.qk_dim, self.v_dim = embedding_dim, num_heads, qk_dim, v_dim
        self.alpha = 1.0 / math.sqrt(qk_dim) if alpha is None else float(alpha)
        self.scaling_seqlen = scaling_seqlen
        self.target_group_size = target_group_size
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.recompute = recompute  # checkpoint the whole layer (keeps x only)
        self.recompute_input_norm = recompute_input_norm  # keep x instead of LayerNorm(x) for uvqk_proj's backward
        self.recompute_silu = recompute_silu  # keep uvqk_proj's output instead of u, v, q, k (SiLU's output)
        self.deterministic = False  # reproducible attention backward (set by the trainer)
        self.input_norm = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.uvqk_proj = nn.Linear(embedding_dim, num_heads * (2 * v_dim + 2 * qk_dim), bias=True)
        self.attention_norm = nn.LayerNorm(num_heads * v_dim, eps=layer_norm_eps)
        self.output_proj = nn.Linear(num_heads * v_dim, embedding_dim, bias=False)
        self.relative_attention_bias = relative_attention_bias
        # Meta's reference initialises the fused u|v|q|k weight with N(0, 0.02) and the output with Xavier.
        nn.init.normal_(self.uvqk_proj.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.uvqk_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)

    def split_uvqk(self, projected: torch.Tensor):
        return split_uvqk(projected, self.num_heads, self.qk_dim, self.v_dim)

    def project(self, x: torch.Tensor):
        """The layer's input side: (u, v, q, k) of the tokens x, u as (T, H * Dv), v / q / k as (T, H, D)."""
        return self._project(x, recompute_parts=True)[0]

    def _project(self, x: torch.Tensor, recompute_parts: bool):
        """project(x), and the hooks under which the consumers of u, v, q, k save them (None: no hooks).

        recompute_parts: apply recompute_input_norm / recompute_silu (when autograd records)."""
        recording = recompute_parts and torch.is_grad_enabled()
        norm = self.input_norm
        proj = self.uvqk_proj
        if uvqk_op.kernels_apply(x, norm.weight, norm.bias, proj.weight, proj.bias, self.num_heads, self.qk_dim,
                                 self.v_dim):  # fmt: skip
            return self._fused_project(x, recording)
        if recording and self.recompute_input_norm:
            normed = self._projection_input(x, norm.weight, norm.bias)
            kept = _RecomputedTensors(lambda *inputs: (self._projection_input(*inputs),), (x, norm.weight, norm.bias),
                                      (normed,))  # fmt: skip
            with kept.hooks():
                projected = self.uvqk_proj(normed)
        else:
            projected = self.uvqk_proj(norm(x))
        if not (recording and self.recompute_silu):
            return self.split_uvqk(F.silu(projected)), None
        # Contiguous, as the consumers would copy them otherwise (hstu_attention does): the copies they save are then
        # these tensors, which the hooks recognise.
        parts = self._contiguous_parts(projected)
        return parts, _RecomputedTensors(self._contiguous_parts, (projected,), parts)

    def _fused_project(self, x: torch.Tensor, recording: bool):
        """_project through the fused kernels (``uvqk_projection``): they keep the projection's output (pre-SiLU)
        for their own backward, and x_norm unless recompute_input_norm; with recompute_silu the consumers' saved
        u, v, q, k are recomputed from that output."""
        norm, proj = self.input_norm, self.uvqk_proj
        *parts, pre = uvqk_op.uvqk_projection(
            x, norm.weight, norm.bias, proj.weight, proj.bias, num_heads=self.num_heads, qk_dim=self.qk_dim,
            v_dim=self.v_dim, eps=norm.eps, recompute_input_norm=recording and self.recompute_input_norm,
            return_pre=True)  # fmt: skip
        if not (recording and self.recompute_silu):
            return tuple(parts), None
        heads, dim = self.num_heads, self.qk_dim
        return tuple(parts), _RecomputedTensors(lambda p: uvqk_cuda.silu_parts(p, heads, dim), (pre,), parts)

    def _projection_input(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """LayerNorm(x) as input_norm computes it, in the dtype that autocast gives uvqk_proj."""
        norm = self.input_norm
        return _in_autocast_dtype(F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps))

    def _contiguous_parts(self, projected: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.contiguous() for t in self.split_uvqk(F.silu(projected)))

    def combine(self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The layer's output side: x + output_proj(dropout(LayerNorm(attn) * u)) for the attention output attn.

        LayerNorm, product and dropout are one op (``layer_norm_mul_dropout``: fused kernels on CUDA, in u's dtype;
        elsewhere the same composition as torch's LayerNorm, product and F.dropout, bit for bit)."""
        attn = attn.reshape(-1, self.num_heads * self.v_dim)
        norm = self.attention_norm
        gated = layer_norm_mul_dropout(attn.to(u.dtype), u, norm.weight, norm.bias, eps=norm.eps,
                                       dropout_p=self.dropout, training=self.training)  # fmt: skip
        return x + self.output_proj(gated)

    def _forward(self, x: torch.Tensor, inputs: AttentionInputs, recompute_parts: bool = True) -> torch.Tensor:
        (u, v, q, k), kept = self._project(x, recompute_parts)
        with kept.hooks() if kept is not None else contextlib.nullcontext():
            return self.combine(x, layer_attention(self, q, k, v, inputs), u)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG, so dropout masks match in the recomputation. It keeps
            # only x, so recompute_input_norm / recompute_silu have nothing left to drop: they stay off inside.
            return checkpoint(self._forward, x, inputs, False, use_reentrant=False)
        return self._forward(x, inputs)


def layer_attention(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    inputs: AttentionInputs) -> torch.Tensor:
    """The attention step of an HSTU layer (``HSTULayer`` or its tensor-parallel twin, which holds the same
    attributes): relative bias from the batch's timestamps and positions (as weight tables; as a dense bias when the
    inputs carry the dense bucket / position matrices), masks from the batch, dropout in training."""
    rab = rab_tables = None
    bias = layer.relative_attention_bias
    if bias is not None and inputs.time_buckets is None and inputs.relative_positions is None:
        rab_tables = bias.tables(inputs.max_seqlen, inputs.timestamps, inputs.next_timestamps,
                                 inputs.shared_positions)  # fmt: skip
    elif bias is not None:
        batch = inputs.seq_offsets.numel() - 1
        rab = bias(inputs.time_buckets, batch, inputs.max_seqlen, inputs.relative_positions)
        rab = rab.to(q.dtype) if q.dtype != torch.float32 else rab
    if inputs.attention_backend == "fused":
        attention = hstu_attention  # looked up at call time
    elif inputs.attention_backend == "reference":
        attention = reference_attention
    else:
        attention = functools.partial(triton_attention, num_contextual=inputs.num_contextual)
    return attention(
        q, k, v, inputs.seq_offsets, inputs.max_seqlen,
        alpha=layer.alpha,
        scaling_seqlen=layer.scaling_seqlen,
        causal=inputs.causal,
        num_contexts=inputs.num_contexts,
        num_targets=inputs.num_targets,
        target_group_size=layer.target_group_size,
        rab=rab,
        dropout_p=layer.attention_dropout if layer.training else 0.0,
        deterministic=layer.deterministic,
        rab_tables=rab_tables,
    )  # fmt: skip


class HSTUStack(nn.Module):
    def __init__(self, layers: list[HSTULayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, inputs)
        return x
