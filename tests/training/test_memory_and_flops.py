"""The run summary's memory report and the MFU FLOP count's embedding-width projections, against hand counts."""

from types import SimpleNamespace

import gin
import pytest
import torch
from torch import nn

from hstu.modules.embeddings import EmbeddingProjection
from hstu.modules.encoder import EncoderConfig, HSTUEncoder
from hstu.training.flops import input_projection_flops, train_step_flops
from hstu.training.memory import activation_bytes_estimate
from hstu.training.tasks import build_encoder_config
from tests.training.test_example_features import _example_args, _train, bitmask_data  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _jagged(n):
    return SimpleNamespace(values=lambda: torch.zeros(n, dtype=torch.long))


def test_train_step_flops_by_hand():
    config = EncoderConfig(embedding_dim=4, num_layers=1, num_heads=1, qk_dim=2, v_dim=2)
    # linears 2*3*4*1*(2*2 + 2*2) + 2*3*1*2*4 = 240, attention 2*5*1*(2+2)/2 = 20; heads 10 and inputs 7 forward
    assert train_step_flops(config, 3, 5, 10.0, 7.0) == 3 * 240 + 3.5 * 20 + 3 * 17


def test_projection_flops_by_hand():
    model = nn.Module()
    model.item_projection = EmbeddingProjection(4, 8)
    model.contextual_projection = EmbeddingProjection(3, 8)
    model.contextual_keys = ["age", "gender"]
    batch = SimpleNamespace(sequence={"item": _jagged(10), "action": _jagged(10)},
                            contextual={"age": _jagged(2), "gender": _jagged(2)})
    # 20 item/action rows through 4->8->8, 4 contextual rows through 3->8->8
    assert input_projection_flops(model, batch) == 2 * 20 * (4 * 8 + 8 * 8) + 2 * 4 * (3 * 8 + 8 * 8)
    assert input_projection_flops(nn.Module(), batch) == 0.0


def test_the_step_counts_the_projections_of_the_model(bitmask_data, tmp_path, monkeypatch):
    from hstu.training import trainer as trainer_module

    seen = []
    monkeypatch.setattr(trainer_module, "train_step_flops",
                        lambda config, tokens, ssl, head, inputs=0.0: seen.append(inputs) or 1.0)
    trainer = trainer_module.Trainer("ranking", _example_args(
        bitmask_data, tmp_path / "run", "NetworkArgs.item_embedding_dim=8", "NetworkArgs.contextual_embedding_dim=4"))
    try:
        batch = next(iter(trainer.train_loader))
        rows = batch.sequence["item"].values().numel()
        contextual = batch.batch_size * len(trainer.model.contextual_keys)
        trainer.train_step(batch)
    finally:
        trainer.close()
    assert contextual > 0
    assert seen == [2 * 2 * rows * (8 * 16 + 16 * 16) + 2 * contextual * (4 * 16 + 16 * 16)]


def test_activation_estimate_by_hand():
    config = EncoderConfig(embedding_dim=4, num_layers=3, num_heads=2, qk_dim=2, v_dim=3, recompute_layers=[1])
    # a kept layer: 3*4 + 2*2*(2*2 + 2*3) + 3*2*3 = 12 + 40 + 18 = 70 values per token; the recomputed one keeps its input (4)
    assert activation_bytes_estimate(config, 10, 2) == 10 * (2 * 70 + 4) * 2


def test_the_summary_reports_memory(bitmask_data, tmp_path):
    _, summary = _train(bitmask_data, tmp_path / "run")
    assert summary["memory_parameter_bytes"] > 0 and summary["memory_activation_bytes_estimate"] > 0
    # Adam keeps two moments per trained value: at least twice the dense parameters' bytes
    assert summary["memory_optimizer_state_bytes"] >= 2 * 4 * 16 * 16
    assert "memory_peak_allocated_bytes_per_rank" not in summary  # CPU run


def test_activation_estimate_drops_what_the_recompute_options_drop():
    base = dict(embedding_dim=4, num_layers=3, num_heads=2, qk_dim=2, v_dim=3, recompute_layers=[1])
    plain = activation_bytes_estimate(EncoderConfig(**base), 10, 2)
    # two kept layers each drop LayerNorm(x) (4 values per token) and u, v, q, k (2 * (2*2 + 2*3) = 20)
    assert activation_bytes_estimate(EncoderConfig(**base, recompute_input_norm=True), 10, 2) == plain - 10 * 2 * 4 * 2
    assert activation_bytes_estimate(EncoderConfig(**base, recompute_silu=True), 10, 2) == plain - 10 * 2 * 20 * 2


def test_the_example_recompute_fields_reach_every_layer(bitmask_data, tmp_path):
    args = _example_args(bitmask_data, tmp_path / "run", "NetworkArgs.recompute_input_layernorm=True",
                         "NetworkArgs.recompute_input_silu=True")
    config = build_encoder_config(args, 64, interleave_actions=False, l2_normalize=False)
    assert config.recompute_input_norm and config.recompute_silu
    layers = HSTUEncoder(config).layers.layers
    assert all(layer.recompute_input_norm and layer.recompute_silu for layer in layers)
