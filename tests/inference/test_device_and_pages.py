"""The inference model's device and dtype: named errors for a device the machine lacks or does not know, the
default dtype from the run's precision, cached == full recompute with the users' rows spread over interleaved pages
of the paged cache, and (GPU) the model on CUDA in bf16 against the fp32 full recompute under the 2x rule."""

from types import SimpleNamespace

import pytest
import torch

from hstu.inference import UserEvents, load_inference_model
from hstu.inference.loading import resolve_device, training_dtype
from hstu.training.config import TrainerArgs
from tests.inference.conftest import build_inference_model

INCREMENTAL = ["DatasetArgs.num_candidates=4", "NetworkArgs.position_encoding='absolute'",
               "NetworkArgs.num_time_buckets=0", "NetworkArgs.relative_attention_bias=True",
               "NetworkArgs.contextual_mask=False", "NetworkArgs.num_layers=2", "DatasetArgs.max_seqlen=40"]


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_on_a_cpu_only_machine_is_a_named_error(monkeypatch, tmp_path, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device.*CUDA is not available"):
        load_inference_model(str(tmp_path), device=device)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("device, message", [("gpu0", "not a device name"), ("meta", "'cpu' or 'cuda'"),
                                             (3, "device must be")])
def test_unknown_device_is_a_named_error(tmp_path, device, message):
    with pytest.raises(ValueError, match=message):
        load_inference_model(str(tmp_path), device=device)


def test_unknown_dtype_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_inference_model(str(tmp_path), dtype=torch.int32)


def test_default_dtype_is_the_runs_training_precision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    args = SimpleNamespace(trainer=TrainerArgs())
    assert training_dtype(args, cuda) == torch.bfloat16  # TrainerArgs.bf16 is the default
    assert training_dtype(args, cpu) == torch.float32  # the trainer autocasts on CUDA only
    args.trainer.bf16, args.trainer.fp16 = False, True
    assert training_dtype(args, cuda) == torch.float16
    args.trainer.fp16 = False
    assert training_dtype(args, cuda) == torch.float32
    args.trainer.bf16, args.trainer.device = True, "cpu"
    assert training_dtype(args, cuda) == torch.float32  # a CPU run trained in float32


def _fill(model, users, rounds, seed):
    """Interleaved appends (every user a few events per round), so that the users' pages alternate in the pools."""
    g = torch.Generator().manual_seed(seed)
    for step in range(rounds):
        batch = []
        for u, user in enumerate(users):
            n = int(torch.randint(2, 6, (1,), generator=g))
            batch.append(UserEvents(user, torch.randint(1, 80, (n,), generator=g),
                                    100_000 * (step + 1) + torch.arange(n) * 7, torch.randint(0, 255, (n,), generator=g),
                                    torch.tensor([u % 4]) if step == 0 else None))
        model.append(batch)


def test_cached_scores_read_through_interleaved_pages(tiny_data):
    model = build_inference_model("synthetic_ranking.gin", tiny_data / "bitmask", INCREMENTAL, page_size=16)
    assert model.incremental and model.cache.page_size == 16
    users = ["a", "b", "c"]
    _fill(model, users, rounds=5, seed=1)
    pages = [model.cache.pages(u) for u in users]
    assert all(len(p) >= 2 for p in pages) and any(p != list(range(p[0], p[0] + len(p))) for p in pages)
    candidates = [torch.tensor([3, 9, 27, 50, 1]), torch.tensor([7]), torch.tensor([11, 12])]
    times = [1_000_000 + torch.arange(len(c)) for c in candidates]
    for got, want in zip(model.rank(users, candidates, times), model.rank_full(users, candidates, times)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config, overrides", [
    ("synthetic_ranking.gin", INCREMENTAL),  # appends extend the cache (the paged cached attention)
    ("synthetic_ranking.gin", ["DatasetArgs.num_candidates=3", "DatasetArgs.max_seqlen=40"]),  # appends rebuild
])
def test_bf16_model_on_cuda_within_the_parity_rule(tiny_data, monkeypatch, config, overrides):
    """|cached bf16 - fp32 full| <= 2 x |bf16 full - fp32 full| + a floor of one bf16 rounding, with the CUDA
    cached kernel on (head dim 32)."""
    from hstu.ops.cached_attention import op
    from hstu.testing.parity import FORWARD_FACTOR, assert_parity

    monkeypatch.setattr(op, "USE_CUDA_KERNELS", True)
    dims = ["NetworkArgs.hidden_dim=64", "NetworkArgs.qk_dim=32", "NetworkArgs.v_dim=32"]
    built = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_inference_model(config, tiny_data / "bitmask", overrides + dims, dtype=dtype, device="cuda")
        assert model.device.type == "cuda" and model.cache.keys[0].device.type == "cuda"
        _fill(model, ["a", "b", "c"], rounds=4, seed=2)
        built[dtype] = model
    assert built[torch.bfloat16].cache.keys[0].dtype == torch.bfloat16
    candidates = [torch.randint(1, 80, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 1, 4)]
    want = torch.cat(built[torch.float32].rank_full(["a", "b", "c"], candidates))
    same_dtype = torch.cat(built[torch.bfloat16].rank_full(["a", "b", "c"], candidates))
    got = torch.cat(built[torch.bfloat16].rank(["a", "b", "c"], candidates))
    assert got.device.type == "cuda" and torch.isfinite(got).all()
    floor = torch.finfo(torch.bfloat16).eps * float(want.abs().max())
    assert_parity("bf16 cached scores on CUDA", got.float(), want.float(), same_dtype.float(), factor=FORWARD_FACTOR,
                  abs_floor=floor)
