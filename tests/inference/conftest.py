"""Tiny synthetic datasets and models built from the repo's synthetic configs for the inference tests."""

import os

import pytest
import torch

from hstu.inference import InferenceModel
from hstu.inference.loading import _single_process_context
from hstu.training.config import parse_gin
from hstu.training.tasks import TASKS
from tests.launching import ROOT, write_tiny_datasets

TINY_DATA = dict(num_users=60, num_items=80, num_topics=4, mean_length=14, min_length=6, max_length=24, seed=3)
SMALL = ["NetworkArgs.hidden_dim=16", "NetworkArgs.qk_dim=8", "NetworkArgs.v_dim=8", "NetworkArgs.num_heads=2",
         "DatasetArgs.max_seqlen=12"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_data")
    write_tiny_datasets(root, **TINY_DATA)
    return root


def build_inference_model(config: str, data_dir, overrides=(), cache_bytes=None, seed=0, page_size=32,
                          dtype=torch.float32, device="cpu") -> InferenceModel:
    """The task's model of ``configs/<config>`` (random weights: the biases and norms perturbed so that every
    parameter matters) on ``device``, wrapped for inference in ``dtype``."""
    args = parse_gin([os.path.join(ROOT, "configs", config)],
                     [f"DatasetArgs.dataset_dir='{data_dir}'", *SMALL, *overrides])
    task = "ranking" if "ranking" in config else "retrieval"
    torch.manual_seed(seed)
    model = TASKS[task](args, _single_process_context()).build_model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embeddings" not in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return InferenceModel(model.to(device), task, cache_bytes=cache_bytes, page_size=page_size, dtype=dtype)
