"""The features that the fields of NVIDIA's recsys-examples HSTU example switch on, each from its gin field to the
model: non-causal attention, the contextual mask switch, the ranking head's activation / bias and metrics, the
attention backend, item / contextual embedding widths projected to the hidden size, and starting a run from the
checkpoint of another run directory."""

import re

import gin
import pytest
import torch

from hstu.modules.encoder import EncoderConfig, EncoderInputs, HSTUEncoder
from hstu.training.config import parse_gin

EXAMPLE = ["TrainerArgs.train_batch_size=8", "DatasetArgs.dataset_name='ml-1m'", "DatasetArgs.max_history_seqlen=20",
           "NetworkArgs.scaling_seqlen=60", "NetworkArgs.num_position_buckets=512"]


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _encoder(**overrides):
    config = dict(embedding_dim=8, num_layers=2, num_heads=2, qk_dim=4, v_dim=4, dropout=0.0, input_dropout=0.0,
                  max_tokens=40, interleave_actions=True, position_encoding="absolute")
    config.update(overrides)
    torch.manual_seed(0)
    return HSTUEncoder(EncoderConfig(**config)).double().eval()


def _inputs(items, contexts=None, num_contextual=0):
    lengths = torch.tensor([5, 4])
    generator = torch.Generator().manual_seed(2)
    actions = torch.randn(items.shape[0], items.shape[1], dtype=torch.float64, generator=generator)
    return EncoderInputs(item_embeddings=items, seq_lengths=lengths, timestamps=torch.arange(9) * 10,
                         num_candidates=torch.tensor([2, 1]), action_embeddings=actions,
                         contextual_embeddings=contexts, num_contextual=num_contextual)


def _items():
    return torch.randn(9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


# ---- NetworkArgs.is_causal / NetworkArgs.causal --------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_non_causal_attention_lets_earlier_tokens_see_later_ones(causal):
    encoder = _encoder(causal=causal)
    items = _items()
    changed = items.clone()
    changed[2] = -changed[2]  # the third history event of the first sequence
    with torch.no_grad():
        before, after = (encoder(_inputs(x)).item_outputs for x in (items, changed))
    earlier_moved = not torch.equal(before[:2], after[:2])
    assert earlier_moved == (not causal)
    torch.testing.assert_close(before[5:], after[5:], rtol=0, atol=0)  # the other sequence never sees it


def test_is_causal_maps_onto_our_field_and_retrieval_refuses_it():
    from hstu.training.tasks import check_task_config

    args = parse_gin([], EXAMPLE + ["NetworkArgs.is_causal=False"])
    assert args.network.causal is False
    assert parse_gin([], ["NetworkArgs.causal=False"]).network.causal is False
    with pytest.raises(ValueError, match=re.escape("NetworkArgs.causal=False")):
        check_task_config("retrieval", args)


# ---- NetworkArgs.disable_contextual_mask / NetworkArgs.contextual_mask ----------------------------------------------
@pytest.mark.parametrize("contextual_mask", [True, False])
def test_without_the_contextual_mask_contextual_tokens_no_longer_carry_later_history(contextual_mask):
    # With the mask, a contextual token sees the whole history in layer 1, and the first item sees that token in
    # layer 2; as a plain causal token it sees nothing after itself.
    encoder = _encoder(contextual_mask=contextual_mask)
    contexts = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    items = _items()
    changed = items.clone()
    changed[2] = -changed[2]
    with torch.no_grad():
        before, after = (encoder(_inputs(x, contexts, num_contextual=2)).item_outputs for x in (items, changed))
    assert (not torch.equal(before[:2], after[:2])) == contextual_mask


def test_disable_contextual_mask_maps_onto_our_field():
    assert parse_gin([], EXAMPLE + ["NetworkArgs.disable_contextual_mask=True"]).network.contextual_mask is False
    gin.clear_config()
    assert parse_gin([], EXAMPLE).network.contextual_mask is True
    gin.clear_config()
    with pytest.raises(ValueError, match="NetworkArgs.disable_contextual_mask.*NetworkArgs.contextual_mask"):
        parse_gin([], EXAMPLE + ["NetworkArgs.disable_contextual_mask=True", "NetworkArgs.contextual_mask=False"])


# ---- RankingArgs.prediction_head_act_type / prediction_head_bias / eval_metrics --------------------------------------
@pytest.mark.parametrize("act_type, bias", [("relu", True), ("gelu", False), ("GELU", True)])
def test_the_ranking_head_has_the_example_activation_and_bias(act_type, bias):
    from hstu.models.ranking import MLPHead

    args = parse_gin([], EXAMPLE + [f"RankingArgs.prediction_head_act_type={act_type!r}",
                                    f"RankingArgs.prediction_head_bias={bias}"])
    k = args.ranking
    assert (k.head_activation, k.head_bias) == (act_type.lower(), bias)
    torch.manual_seed(0)
    head = MLPHead(6, [5], 3, activation=k.head_activation, bias=k.head_bias).double()
    norm, first, _, _, last = head.net
    assert all((layer.bias is not None) == bias for layer in (first, last))
    x = torch.randn(4, 6, dtype=torch.float64)
    hidden = first(norm(x))
    expected = last(torch.relu(hidden) if k.head_activation == "relu" else torch.nn.functional.gelu(hidden))
    torch.testing.assert_close(head(x), expected, rtol=0, atol=0)


def test_our_head_defaults_stay_silu_with_biases():
    k = parse_gin([], []).ranking
    assert (k.head_activation, k.head_bias, tuple(k.eval_metrics)) == ("silu", True, ("AUC",))
    gin.clear_config()
    with pytest.raises(ValueError, match="RankingArgs.head_activation"):
        parse_gin([], ["RankingArgs.head_activation='tanh'"])


def test_accuracy_counts_bits_and_rating_classes():
    from types import SimpleNamespace

    from hstu.training.tasks import RankingTask, _Accuracy

    bitmask = SimpleNamespace(task_type="bitmask", task_names=["click", "like"])
    probabilities = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.6, 0.51]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    accuracy = _Accuracy(RankingTask.accuracy_names(bitmask), torch.device("cpu"))
    accuracy.update(RankingTask.correct_predictions(bitmask, None, None, probabilities, labels))
    assert accuracy.compute(None) == {"ACC/click": pytest.approx(1 / 3), "ACC/like": pytest.approx(2 / 3)}
    rating = SimpleNamespace(task_type="rating", task_names=["rating_positive"])
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    accuracy = _Accuracy(RankingTask.accuracy_names(rating), torch.device("cpu"))
    accuracy.update(RankingTask.correct_predictions(rating, logits, torch.tensor([1, 2]), None, None))
    assert accuracy.compute(None) == {"ACC/rating": 0.5}


def test_the_example_ranking_metric_names():
    assert tuple(parse_gin([], EXAMPLE + ["RankingArgs.eval_metrics=['auc', 'ACC']"]).ranking.eval_metrics) == \
        ("AUC", "ACC")
    for name in ("NDCG", "RECALL"):
        gin.clear_config()
        with pytest.raises(ValueError, match=f"RankingArgs.eval_metrics \\['{name}'\\].*not supported yet"):
            parse_gin([], EXAMPLE + [f"RankingArgs.eval_metrics=['AUC', '{name}']"])


# ---- a few training steps on CPU -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bitmask_data(tmp_path_factory):
    from hstu.data.synthetic import write_synthetic

    path = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic(str(path), show_progress=False, actions="bitmask", num_users=120, num_items=100, num_topics=4,
                    mean_length=20, min_length=8, max_length=40, seed=3)
    return str(path)


def _example_args(data, run_dir, *bindings):
    gin.clear_config()
    return parse_gin([], [
        "TrainerArgs.train_batch_size=16", "TrainerArgs.eval_batch_size=32", "TrainerArgs.max_train_iters=4",
        "TrainerArgs.log_interval=1", "TrainerArgs.eval_interval=4", "TrainerArgs.max_eval_iters=1",
        "DatasetArgs.dataset_name='synthetic'", f"DatasetArgs.dataset_path={data!r}",
        "DatasetArgs.max_history_seqlen=16",
        "DatasetArgs.max_num_candidates=3", "NetworkArgs.num_layers=1", "NetworkArgs.hidden_size=16",
        "NetworkArgs.num_attention_heads=2", "NetworkArgs.kv_channels=8", "NetworkArgs.scaling_seqlen=60",
        "NetworkArgs.hidden_dropout=0.1", "OptimizerArgs.optimizer_str='adam'", "OptimizerArgs.learning_rate=1e-2",
        "RankingArgs.prediction_head_arch=[16, 8]", "RankingArgs.num_tasks=8", f"TrainerArgs.run_dir={str(run_dir)!r}",
        "TrainerArgs.device='cpu'", "TrainerArgs.progress_bar=False", "TrainerArgs.tensorboard=False",
        "TrainerArgs.plot=False", "TrainerArgs.compute_baseline=False", *bindings])


def _train(data, run_dir, *bindings):
    """Losses of a 4-step example-style ranking run on CPU (train_log.jsonl) and its summary."""
    import json
    import os

    from hstu.training.trainer import run

    summary = run("ranking", _example_args(data, run_dir, *bindings))
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()], summary


# ---- NetworkArgs.kernel_backend / NetworkArgs.attention_backend ------------------------------------------------------
def test_the_pytorch_backend_trains_as_the_default_on_cpu(bitmask_data, tmp_path, monkeypatch):
    import hstu.modules.hstu_layer as hstu_layer

    default, _ = _train(bitmask_data, tmp_path / "cutlass")
    called = []
    reference = hstu_layer.reference_attention
    monkeypatch.setattr(hstu_layer, "reference_attention", lambda *a, **k: called.append(1) or reference(*a, **k))
    pytorch, _ = _train(bitmask_data, tmp_path / "pytorch", "NetworkArgs.kernel_backend='pytorch'")
    assert called  # the layers called the reference, not the dispatching op
    assert pytorch[0] == default[0]  # same forward; the backward differs from the op's formula in rounding only
    assert pytorch == pytest.approx(default, rel=1e-5)


def test_the_triton_backend_without_its_package_is_a_named_error_at_config_time(monkeypatch):
    import sys

    from hstu.modules import attention_backends

    monkeypatch.setitem(sys.modules, "generative_recommenders", None)  # not importable, even where installed
    attention_backends.load_triton_attention.cache_clear()
    try:
        with pytest.raises(ValueError, match=re.escape("NetworkArgs.attention_backend='triton' (the example's "
                                                       "NetworkArgs.kernel_backend='triton') needs Meta's")):
            parse_gin([], EXAMPLE + ["NetworkArgs.kernel_backend='triton'"])
    finally:
        attention_backends.load_triton_attention.cache_clear()


def test_the_triton_backend_calls_metas_kernel_with_our_arguments(monkeypatch):
    import sys
    import types

    from hstu.modules import attention_backends
    from hstu.ops import hstu_attention_reference

    calls = []

    def triton_hstu_mha(N, alpha, q, k, v, seq_offsets, num_targets=None, max_attn_len=0, contextual_seq_len=0,
                        sort_by_length=False, enable_tma=False):
        # Meta's semantics: N bounds the sequences and divides the weights; one contextual count for all.
        calls.append((N, contextual_seq_len))
        contexts = torch.full((seq_offsets.numel() - 1,), contextual_seq_len, dtype=torch.int64)
        return hstu_attention_reference(q, k, v, seq_offsets, N, alpha=alpha, scaling_seqlen=N,
                                        num_contexts=contexts if contextual_seq_len else None, num_targets=num_targets)

    module = types.ModuleType(attention_backends._TRITON_MODULE)
    module.triton_hstu_mha = triton_hstu_mha
    monkeypatch.setitem(sys.modules, attention_backends._TRITON_MODULE, module)
    attention_backends.load_triton_attention.cache_clear()
    try:
        contexts = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        outputs = []
        for backend in ("fused", "triton"):
            with torch.no_grad():
                outputs.append(_encoder(attention_backend=backend)(_inputs(_items(), contexts, 2)).item_outputs)
        torch.testing.assert_close(outputs[1], outputs[0])
        assert calls == [(40, 2), (40, 2)]  # max_tokens (the scaling length) and the contexts, in both layers
        with pytest.raises(ValueError, match=re.escape("NetworkArgs.relative_attention_bias=True")):
            _encoder(attention_backend="triton", relative_attention_bias=True)
        with pytest.raises(ValueError, match=re.escape("NetworkArgs.scaling_seqlen >= the longest token sequence")):
            _encoder(attention_backend="triton", scaling_seqlen=20)
    finally:
        attention_backends.load_triton_attention.cache_clear()


# ---- NetworkArgs.item_embedding_dim / contextual_embedding_dim -------------------------------------------------------
def test_tables_of_their_own_width_are_projected_to_the_hidden_size():
    from hstu.models.losses import MultiTaskLoss
    from hstu.models.ranking import RankingModel

    config = EncoderConfig(embedding_dim=8, num_layers=1, num_heads=2, qk_dim=4, v_dim=4, max_tokens=40,
                           interleave_actions=True)
    model = RankingModel(30, 4, config, MultiTaskLoss("bitmask", 2), (8,), contextual_vocab_sizes={"age": 5, "city": 7},
                         item_embedding_dim=6, contextual_embedding_dim=3)
    weights = {name: tuple(p.shape) for name, p in model.embeddings.named_parameters()}
    assert weights == {"collection.embeddings.item.weight": (30, 6), "collection.embeddings.action.weight": (4, 6),
                       "extra_collections.width_3.embeddings.age.weight": (5, 3),
                       "extra_collections.width_3.embeddings.city.weight": (7, 3)}
    ids = {"item": (torch.tensor([1, 2, 3]), torch.tensor([3])), "action": (torch.tensor([0, 1, 2]), torch.tensor([3])),
           "age": (torch.tensor([4]), torch.tensor([1])), "city": (torch.tensor([6]), torch.tensor([1]))}
    values = model.embeddings(model.embeddings.make_features(ids))
    assert {k: tuple(v.shape) for k, v in values.items()} == {"item": (3, 6), "action": (3, 6), "age": (1, 3),
                                                              "city": (1, 3)}
    age_table = model.embeddings.extra_collections["width_3"].embeddings["age"].weight
    torch.testing.assert_close(values["age"], age_table[4:5])
    projected = model.item_projection(values["item"])
    first, _, second = model.item_projection.net
    torch.testing.assert_close(projected, second(torch.relu(first(values["item"]))))
    assert projected.shape == (3, 8) and model.contextual_projection(values["age"]).shape == (1, 8)


def test_embedding_widths_map_onto_ours_and_retrieval_refuses_them():
    from hstu.training.tasks import check_task_config

    args = parse_gin([], EXAMPLE + ["NetworkArgs.item_embedding_dim=12", "NetworkArgs.contextual_embedding_dim=-1"])
    assert (args.network.item_embedding_width, args.network.contextual_embedding_width) == (12, None)
    with pytest.raises(ValueError, match=re.escape("NetworkArgs.item_embedding_width=12 (the example's")):
        check_task_config("retrieval", args)
    gin.clear_config()
    with pytest.raises(ValueError, match="NetworkArgs.contextual_embedding_width must be >= 1"):
        parse_gin([], ["NetworkArgs.contextual_embedding_width=0"])


def test_a_run_with_every_new_network_and_head_option(bitmask_data, tmp_path):
    losses, summary = _train(bitmask_data, tmp_path / "all", "NetworkArgs.item_embedding_dim=12",
                             "NetworkArgs.contextual_embedding_dim=6", "NetworkArgs.disable_contextual_mask=True",
                             "RankingArgs.prediction_head_act_type='gelu'", "RankingArgs.prediction_head_bias=False",
                             "RankingArgs.eval_metrics=['AUC', 'ACC']", "NetworkArgs.kernel_backend='pytorch'")
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)
    accuracies = {k: v for k, v in summary.items() if k.startswith("ACC/")}
    assert len(accuracies) == 8 and all(0.0 <= v <= 1.0 for v in accuracies.values())


# ---- TrainerArgs.ckpt_load_dir / TrainerArgs.init_from ---------------------------------------------------------------
def _state(trainer):
    dense = trainer.parallel.dense
    return trainer.model.state_dict(), dense.optimizer.state_dict()["state"]


def test_a_run_starts_from_the_model_and_optimizer_state_of_another_run_directory(bitmask_data, tmp_path):
    import shutil

    from hstu.training.trainer import Trainer
    from tests.training.test_fault_injection import tree

    source = tmp_path / "source"
    _train(bitmask_data, source, "TrainerArgs.ckpt_save_interval=2")  # checkpoints at steps 2 and 4
    before = tree(source)
    shutil.copytree(source, tmp_path / "copy")
    resumed = Trainer("ranking", _example_args(bitmask_data, tmp_path / "copy", "TrainerArgs.ckpt_save_interval=2"),
                      resume=True)
    trainer = Trainer("ranking", _example_args(bitmask_data, tmp_path / "new",
                                               f"TrainerArgs.ckpt_load_dir={str(source)!r}"))
    try:
        assert (resumed.state.step, trainer.state.step) == (4, 0)  # the step starts afresh
        (model, optimizer), (expected_model, expected_optimizer) = _state(trainer), _state(resumed)
        assert model.keys() == expected_model.keys() and optimizer.keys() == expected_optimizer.keys()
        for name, value in model.items():
            torch.testing.assert_close(value, expected_model[name], rtol=0, atol=0, msg=name)
        for index, state in optimizer.items():
            for key, value in state.items():
                torch.testing.assert_close(value, expected_optimizer[index][key], rtol=0, atol=0)
        trainer.train()
    finally:
        trainer.close()
        resumed.close()
    assert tree(source) == before  # nothing in the loaded directory was written, moved or deleted


def test_init_from_a_step_directory_and_the_named_errors(bitmask_data, tmp_path):
    from hstu.training.checkpoint import CheckpointError, choose_init_checkpoint

    source = tmp_path / "source"
    _train(bitmask_data, source, "TrainerArgs.ckpt_save_interval=2")
    step = source / "checkpoints" / "step_00000002"
    assert choose_init_checkpoint(str(step))[0] == str(step)
    assert choose_init_checkpoint(str(source))[0].endswith("step_00000004")
    (source / "checkpoints" / "step_00000004" / "rank0.pt").write_bytes(b"corrupt")
    path, _, notes = choose_init_checkpoint(str(source))  # the newest checkpoint that verifies
    assert path.endswith("step_00000002") and "step_00000004" in notes[0]
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=re.escape(f"TrainerArgs.init_from={nowhere!r}: no such")):
        _train(bitmask_data, tmp_path / "b", f"TrainerArgs.ckpt_load_dir={nowhere!r}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"TrainerArgs.init_from={str(empty)!r}: no checkpoint")):
        _train(bitmask_data, tmp_path / "c", f"TrainerArgs.ckpt_load_dir={str(empty)!r}")
    with pytest.raises(ValueError, match="TrainerArgs.init_from=.*TrainerArgs.run_dir=.*overlap"):
        _example_args(bitmask_data, source, f"TrainerArgs.ckpt_load_dir={str(source)!r}")
