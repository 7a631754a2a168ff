"""Masks select on CUDA: a NaN / inf in a key, value, query, output gradient or rab entry that a row does not see
changes neither that row's output nor any gradient it contributes to (the CPU counterpart is in
test_hstu_attention_reference.py; the sm80-style kernels also run on the CPU emulator in
test_hstu_attention_cuda_emulation.py).

Each case runs the public op twice on the GPU, on clean inputs and with one poisoned entry, and compares what the
poisoned entry must not reach: the rows that do not see the poisoned key (forward, dq), every other key's dk / dv,
and the rab gradient outside the poisoned key's column. Those must be finite and equal to the clean run (exactly,
except dq of the atomic backward, whose float32 atomics vary in the last bits). Sequences span several tiles and end
inside one, so the poisoned key sits in tiles that rows which cannot see it still visit. bfloat16 runs the fused
kernels (when the extension is built; else the reference), float32 the PyTorch reference on the GPU. Paths: the
default (on sm_90 the wgmma kernels where they apply), the mma.sync kernels, the single-role wgmma forward, and the
atomic-free backward (deterministic=True), and both backwards of the mma.sync kernels, chosen with
``cuda.kernel_variant``; ``cuda.kernel_plan`` says which kernels a case runs.
"""

from __future__ import annotations

import pytest
import torch

from hstu.ops import hstu_attention, lengths_to_offsets
from hstu.ops._extension import load_extension
from hstu.ops.hstu_attention.cuda import KernelVariant, kernel_plan, kernel_variant
from tests.conftest import requires_cuda
from tests.ops.dense_attention import mask_matrix

pytestmark = requires_cuda

# The mma.sync (sm80-style) kernels zero the non-finite entries of the tiles their products read on tiles with
# masked entries and add the selected terms back (csrc/hstu_attention/utils.h). The Hopper wgmma kernels still
# multiply an invisible entry by an exact zero in their products over keys (P·V in the forward, dS·K for dq, and the
# backward's dS = dP · SiLU'), so a NaN / inf there reaches rows that do not see it (measured on an H100, issue 20).
HOPPER_PRODUCTS_LEAK = "wgmma kernels: products over keys multiply invisible non-finite entries by zero"

LENGTHS = [300, 1, 77, 203]
HEADS, DIM = 2, 64
FAMILIES = {
    "causal": dict(causal=True),
    "causal_window": dict(causal=True, window_size=24),
    "contexts_targets_groups": dict(causal=True, contexts=[20, 0, 5, 3], targets=[60, 1, 10, 40], target_group_size=7),
    "noncausal_window": dict(causal=False, window_size=10),
    "noncausal": dict(causal=False),
}
# Keys of sequence 0 (length 300) to poison: history keys some rows of their own tiles do not see, a target key
# (rows 240..299 are targets with 60 targets), and the sequence's last key.
POISONED_KEYS = [70, 200, 250, 299]
PATHS = {  # KernelVariant fields, deterministic
    "default": ({}, False),
    "mma_sync": (dict(sm90_forward=False, sm90_backward=False), False),
    "wgmma_single_role_forward": (dict(forward_warp_specialized=False), False),
    "deterministic": ({}, True),
    "mma_sync_deterministic": (dict(sm90_forward=False, sm90_backward=False), True),
}


def _runs_hopper_kernel(path, with_rab: bool) -> bool:
    """Whether a bfloat16 case of this test runs a wgmma kernel (forward or backward) on the current device."""
    fields, deterministic = path
    shape = dict(head_dim=DIM, batch=len(LENGTHS), heads=HEADS, max_seqlen=max(LENGTHS), dtype=torch.bfloat16,
                 rab=with_rab, variant=KernelVariant(**fields))  # fmt: skip
    forward = kernel_plan("forward", **shape)
    backward = kernel_plan("backward", rab_grad=with_rab, deterministic=deterministic, **shape)
    return forward["kernel"] != "sm80" or backward["kernel"] != "sm80"


def _mark_hopper_leak(request, dtype, path, with_rab: bool) -> None:
    if dtype != torch.float32 and load_extension() is not None and _runs_hopper_kernel(path, with_rab):
        request.applymarker(pytest.mark.xfail(reason=HOPPER_PRODUCTS_LEAK, strict=False))


def _kwargs(family: str) -> dict:
    spec = FAMILIES[family]
    kwargs = dict(causal=spec["causal"], window_size=spec.get("window_size", -1),
                  target_group_size=spec.get("target_group_size", 1), alpha=DIM**-0.5)  # fmt: skip
    for name in ("contexts", "targets"):
        if name in spec:
            kwargs[f"num_{name}"] = torch.tensor(spec[name], dtype=torch.int32, device="cuda")
    return kwargs


def _seen(kwargs: dict, b: int):
    c = int(kwargs["num_contexts"][b]) if "num_contexts" in kwargs else 0
    t = int(kwargs["num_targets"][b]) if "num_targets" in kwargs else 0
    return mask_matrix(LENGTHS[b], c, t, kwargs["target_group_size"], kwargs["window_size"], kwargs["causal"])


def _rows_that_see(kwargs: dict, b: int, j: int) -> list[int]:
    """Rows (jagged indices) of sequence b that see its key j, from the independent dense formulation."""
    seen = _seen(kwargs, b)
    return [sum(LENGTHS[:b]) + i for i in range(LENGTHS[b]) if seen[i, j]]


def _keys_seen_by(kwargs: dict, b: int, i: int) -> list[int]:
    """Keys (jagged indices) of sequence b that its row i sees."""
    seen = _seen(kwargs, b)
    return [sum(LENGTHS[:b]) + j for j in range(LENGTHS[b]) if seen[i, j]]


def _inputs(dtype: torch.dtype, with_rab: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total, n = sum(LENGTHS), max(LENGTHS)
    q, k, v = (torch.randn(total, HEADS, DIM, device="cuda", generator=gen).to(dtype) for _ in range(3))
    rab = torch.randn(len(LENGTHS), HEADS, n, n, device="cuda", generator=gen).to(dtype) if with_rab else None
    grad_out = torch.randn(total, HEADS, DIM, device="cuda", generator=gen).to(dtype)
    return q, k, v, rab, grad_out


def _run(q, k, v, rab, grad_out, kwargs, path):
    fields, deterministic = path
    offsets = lengths_to_offsets(torch.tensor(LENGTHS, dtype=torch.int32, device="cuda"))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    rab_leaf = None if rab is None else rab.clone().requires_grad_(True)
    with kernel_variant(**fields):
        out = hstu_attention(*leaves, offsets, max(LENGTHS), rab=rab_leaf, deterministic=deterministic, **kwargs)
        inputs = leaves + ([rab_leaf] if rab_leaf is not None else [])
        grads = list(torch.autograd.grad(out, inputs, grad_out))
    torch.cuda.synchronize()
    return out.detach(), grads + ([None] if rab is None else [])


def _assert_untouched(got, want, tainted, what, exact=True):
    keep = torch.ones(got.shape[0], dtype=torch.bool, device=got.device)
    keep[list(tainted)] = False
    bad = (~torch.isfinite(got[keep])).flatten(1).any(dim=1)
    if bool(bad.any()):
        rows = keep.nonzero().squeeze(1)[bad].tolist()
        raise AssertionError(f"{what}: {len(rows)} rows that must not see the poisoned entry are not finite, e.g. "
                             f"{rows[:8]}")  # fmt: skip
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[keep], want[keep], **tolerance, msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=sorted(PATHS))
def path(request):
    """(KernelVariant fields, deterministic) of a kernel path."""
    if request.node.callspec.params.get("dtype") == torch.float32 and request.param != "default":
        pytest.skip("float32 runs the reference: the kernel paths do not apply")
    return PATHS[request.param]


def _poisoning_failures(family: str, target: str, with_rab: bool, dtype: torch.dtype, path) -> list[str]:
    """Poisons entry (r, head 1, column 5) of `target` for every r in POISONED_KEYS (sequence 0 starts at row 0),
    NaN then inf, and lists what it reached beyond what may depend on it: a key / value row j reaches the output and
    dq rows that see key j, dk_j, dv_j and drab column j; a query (output gradient) row i reaches output row i (query
    only), dq_i, the dk / dv rows of the keys row i sees, and drab row i."""
    deterministic = path[1]
    kwargs = _kwargs(family)
    inputs = dict(zip(("q", "k", "v", "rab", "grad_out"), _inputs(dtype, with_rab)))
    rab = inputs["rab"]
    clean_out, clean_grads = _run(*inputs.values(), kwargs, path)
    failures = []
    for r in POISONED_KEYS:
        for poison in (float("nan"), float("inf")):
            poisoned = dict(inputs, **{target: inputs[target].clone()})
            poisoned[target][r, 1, 5] = poison
            out, grads = _run(*poisoned.values(), kwargs, path)
            if target in ("k", "v"):
                sees = _rows_that_see(kwargs, 0, r)
                tainted = dict(output=sees, dq=sees, dk=[r], dv=[r])
            else:
                keys = _keys_seen_by(kwargs, 0, r)
                tainted = dict(output=[r] if target == "q" else [], dq=[r], dk=keys, dv=keys)
            checks = [(what, got, want, tainted[what], what != "dq" or deterministic)
                      for what, got, want in zip(("output", "dq", "dk", "dv"), [out, *grads], [clean_out, *clean_grads])]
            if rab is not None:
                drab, want = grads[3].clone(), clean_grads[3].clone()
                if target in ("k", "v"):
                    drab[0, :, :, r] = want[0, :, :, r] = 0  # only column r depends on the poisoned key / value
                else:
                    drab[0, :, r, :] = want[0, :, r, :] = 0  # only row r depends on the poisoned query / gradient
                checks.append(("drab", drab.flatten(0, 1), want.flatten(0, 1), [], True))
            for what, got, want, rows, exact in checks:
                try:
                    _assert_untouched(got, want, rows, what, exact)
                except AssertionError as error:
                    failures.append(f"{target}[{r}] = {poison}: {str(error).splitlines()[0]}")
    return failures


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32_reference"])
@pytest.mark.parametrize("with_rab", [False, True], ids=["norab", "rab"])
@pytest.mark.parametrize("target", ["k", "v"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_invisible_nonfinite_key_or_value(family, target, with_rab, dtype, path, request):
    _mark_hopper_leak(request, dtype, path, with_rab)
    failures = _poisoning_failures(family, target, with_rab, dtype, path)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32_reference"])
@pytest.mark.parametrize("with_rab", [False, True], ids=["norab", "rab"])
@pytest.mark.parametrize("target", ["q", "grad_out"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_invisible_nonfinite_query_or_output_grad(family, target, with_rab, dtype, path, request):
    _mark_hopper_leak(request, dtype, path, with_rab)
    failures = _poisoning_failures(family, target, with_rab, dtype, path)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32_reference"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_invisible_nonfinite_rab_entries(family, dtype, path):
    # Every rab entry no row sees is NaN (masked entries, and the padding past each shorter sequence); then every
    # such entry is -inf. Nothing may change.
    kwargs = _kwargs(family)
    q, k, v, rab, grad_out = _inputs(dtype, with_rab=True)
    n = max(LENGTHS)
    hidden = torch.ones(len(LENGTHS), 1, n, n, dtype=torch.bool, device="cuda")
    for b, length in enumerate(LENGTHS):
        c = int(kwargs["num_contexts"][b]) if "num_contexts" in kwargs else 0
        t = int(kwargs["num_targets"][b]) if "num_targets" in kwargs else 0
        m = mask_matrix(length, c, t, kwargs["target_group_size"], kwargs["window_size"], kwargs["causal"])
        hidden[b, 0, :length, :length] = ~m.bool().cuda()
    clean_out, clean_grads = _run(q, k, v, rab.masked_fill(hidden, 0), grad_out, kwargs, path)
    for poison in (float("nan"), float("-inf")):
        out, grads = _run(q, k, v, rab.masked_fill(hidden, poison), grad_out, kwargs, path)
        _assert_untouched(out, clean_out, [], f"output (rab {poison})")
        for what, got, want in zip(("dq", "dk", "dv", "drab"), grads, clean_grads):
            got, want = (got.flatten(0, 1), want.flatten(0, 1)) if what == "drab" else (got, want)
            _assert_untouched(got, want, [], f"{what} (rab {poison})", exact=what != "dq" or path[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32_reference"])
def test_rab_minus_inf_above_the_diagonal(dtype, path):
    kwargs = _kwargs("causal")
    q, k, v, rab, grad_out = _inputs(dtype, with_rab=True)
    above = torch.ones(max(LENGTHS), max(LENGTHS), dtype=torch.bool, device="cuda").triu(1)
    clean_out, clean_grads = _run(q, k, v, rab.masked_fill(above, 0), grad_out, kwargs, path)
    out, grads = _run(q, k, v, rab.masked_fill(above, float("-inf")), grad_out, kwargs, path)
    _assert_untouched(out, clean_out, [], "output")
    for what, got, want in zip(("dq", "dk", "dv", "drab"), grads, clean_grads):
        got, want = (got.flatten(0, 1), want.flatten(0, 1)) if what == "drab" else (got, want)
        _assert_untouched(got, want, [], what, exact=what != "dq" or path[1])
