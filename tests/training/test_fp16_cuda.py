"""fp16 training with dynamic loss scaling on a GPU (skipped without CUDA): a short example-style ranking run with
NetworkArgs.dtype_str='float16' trains with finite losses, logs the loss scale and resumes bit-exactly."""

import json
import os

import gin
import pytest
import torch

from tests.training.test_example_features import _example_args, bitmask_data  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs CUDA")


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _run(data, run_dir, *bindings, resume=False):
    from hstu.training.trainer import Trainer

    trainer = Trainer("ranking", _example_args(data, run_dir, "NetworkArgs.dtype_str='float16'",
                                               "TrainerArgs.device='cuda'", *bindings), resume=resume)
    try:
        trainer.train()
        final = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()], final


def test_fp16_trains_on_a_gpu_and_resumes_bit_exactly(bitmask_data, tmp_path):
    scaling = ("TrainerArgs.loss_scale_init=1024.0", "TrainerArgs.loss_scale_growth_interval=3",
               "TrainerArgs.deterministic=True")
    whole, expected = _run(bitmask_data, tmp_path / "whole", *scaling)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in whole)
    assert [r["loss_scale"] for r in whole] == [1024.0, 1024.0, 2048.0, 2048.0]
    _run(bitmask_data, tmp_path / "split", *scaling, "TrainerArgs.stop_after_steps=2")
    parts, final = _run(bitmask_data, tmp_path / "split", *scaling, resume=True)
    assert [(r["loss"], r["loss_scale"]) for r in parts] == [(r["loss"], r["loss_scale"]) for r in whole]
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)
