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
    actions = torch.randn(items.shape[0], items.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
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
