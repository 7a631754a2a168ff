"""fp16 training with dynamic loss scaling (TrainerArgs.fp16; the NVIDIA example's NetworkArgs.dtype_str='float16'):
steps whose gradients overflow are skipped and halve the scale, finite runs of steps grow it, and the scale is part
of the checkpoint so that a resumed run matches an uninterrupted one bit for bit.

fp16 is refused on CPU; these tests let the CPU through (FP16_DEVICE_TYPES) to run the real loop, autocast to
float16 and torch.amp.GradScaler included. tests/training/test_fp16_cuda.py runs it on a GPU."""

import json
import os

import gin
import pytest
import torch

from hstu.training import precision
from hstu.training.config import parse_gin
from tests.training.test_example_features import _example_args, bitmask_data  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    monkeypatch.setattr(precision, "FP16_DEVICE_TYPES", ("cuda", "cpu"))


def test_dtype_str_float16_maps_onto_fp16_and_the_bad_combinations_are_named():
    t = parse_gin([], ["NetworkArgs.dtype_str='float16'", "DatasetArgs.dataset_name='ml-1m'",
                       "DatasetArgs.max_history_seqlen=20"]).trainer
    assert (t.fp16, t.bf16) == (True, False)
    gin.clear_config()
    with pytest.raises(ValueError, match=r"TrainerArgs\.fp16=True and TrainerArgs\.bf16=True"):
        parse_gin([], ["TrainerArgs.fp16=True"])
    gin.clear_config()
    with pytest.raises(ValueError, match=r"NetworkArgs\.dtype_str.*TrainerArgs\.bf16"):
        parse_gin([], ["NetworkArgs.dtype_str='float16'", "TrainerArgs.bf16=False", "DatasetArgs.dataset_name='ml-1m'",
                       "DatasetArgs.max_history_seqlen=20"])
    with pytest.raises(ValueError, match=r"TrainerArgs\.fp16=True .* needs a CUDA device"):
        precision.Precision(torch.device("cpu"), bf16=False, fp16=True)


def test_fp16_on_cpu_is_refused_when_the_run_starts(bitmask_data, tmp_path):
    from hstu.training.trainer import Trainer

    with pytest.raises(ValueError, match=r"TrainerArgs\.fp16=True .* needs a CUDA device"):
        Trainer("ranking", _example_args(bitmask_data, tmp_path / "run", "NetworkArgs.dtype_str='float16'"))


def _run(data, run_dir, *bindings, resume=False):
    from hstu.training.trainer import Trainer

    trainer = Trainer("ranking", _example_args(data, run_dir, "NetworkArgs.dtype_str='float16'", *bindings),
                      resume=resume)
    try:
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records, initial, final


def test_overflowing_steps_are_skipped_and_halve_the_scale(bitmask_data, tmp_path, fp16_on_cpu):
    # A scale of 2^40 makes every fp16 gradient overflow: no step updates anything, each one halves the scale.
    records, initial, final = _run(bitmask_data, tmp_path / "run", "TrainerArgs.loss_scale_init=1099511627776.0")
    assert [r["loss_scale"] for r in records] == [2.0 ** 39, 2.0 ** 38, 2.0 ** 37, 2.0 ** 36]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    for name, value in initial.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)


def test_finite_steps_train_and_grow_the_scale(bitmask_data, tmp_path, fp16_on_cpu):
    records, initial, final = _run(bitmask_data, tmp_path / "run", "TrainerArgs.loss_scale_init=1024.0",
                                   "TrainerArgs.loss_scale_growth_interval=2")
    assert [r["loss_scale"] for r in records] == [1024.0, 2048.0, 2048.0, 4096.0]
    changed = [name for name, value in initial.items() if value.is_floating_point() and not torch.equal(final[name], value)]
    assert changed  # the updates were applied


def test_a_resumed_fp16_run_matches_an_uninterrupted_one(bitmask_data, tmp_path, fp16_on_cpu):
    # growth interval 3: the scale doubles after step 3 only if the growth count of steps 1-2 is restored.
    scaling = ("TrainerArgs.loss_scale_init=1024.0", "TrainerArgs.loss_scale_growth_interval=3")
    whole, _, expected = _run(bitmask_data, tmp_path / "whole", *scaling)
    _run(bitmask_data, tmp_path / "split", *scaling, "TrainerArgs.stop_after_steps=2")
    parts, _, final = _run(bitmask_data, tmp_path / "split", *scaling, resume=True)
    assert [r["loss_scale"] for r in whole] == [1024.0, 1024.0, 2048.0, 2048.0]
    assert [(r["loss"], r["loss_scale"]) for r in parts] == [(r["loss"], r["loss_scale"]) for r in whole]
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)
